"""FetchSGD (Rothchild et al. 2020): sketched updates, momentum and error kept in sketch space.

Client: `S_c = A g_c`, a count sketch (`rows x cols`, hashes fixed for the whole training
by `seed`, so sketches of different rounds add). Server, per round (`fetchsgd_server_step`):

  S   = sum_c w_c S_c                       (`reduce`: sketches add)
  u  <- rho u + S                           (momentum in sketch space)
  e  <- e + u                               (error accumulation in sketch space)
  D   = top_k(unsketch(e))                  (median estimate per coordinate, k largest)
  e, u <- 0 on the cells where A D != 0     (CommEfficient's reset; 'subtract': e <- e - A D)
  params <- params - lr D                   (`server_tx = optax.sgd(lr)`)

The learning rate sits outside the error sum (as in CommEfficient's `_server_helper_sketched`,
which returns `lr * D`): with a constant `lr` it equals the paper's `e <- e + lr u`, since
every step is positively homogeneous. `(u, e)` is the *receiver* state of `fetchsgd()`, and
`decode` is the server step. `federated.build_round` decodes the normalized reduced sketch
once per round with `ServerState.aggregator`, which keeps `(u, e)` across rounds.

Byte conventions: CommEfficient bills `4 rows cols` bytes up per participant and `4 *` the
number of weights changed since the client's last round down, no indices
(`fetchsgd_convention_bytes`); the honest download of those weights also carries their
indices (`sparse_download_bits`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, EmptyState, Field
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._sketch import _hashes, _median_rows, row_gather, row_scatter
from fedjax_compress.compressors._sparsify import top_indices

ERROR_RESETS = ("zero", "subtract")


class FetchSGDState(NamedTuple):
  """Server (receiver) state of `fetchsgd`: momentum and error sketches, `f32[rows, cols]`."""

  momentum: jax.Array
  error: jax.Array


def sketch_hashes(seed: int, rows: int, cols: int, size: int) -> tuple[jax.Array, jax.Array]:
  """Buckets `int32[rows, size]` and signs `f32[rows, size]` of the fixed FetchSGD sketch."""
  return _hashes(jax.random.key(seed), rows, cols, size)


def sketch(vec: jax.Array, buckets: jax.Array, signs: jax.Array, cols: int) -> jax.Array:
  """Count sketch `S[r, c] = sum_{i: h_r(i) = c} s_r(i) vec_i` (float32).

  Computed as `m sketch(vec / m)` (`m = max|vec|`), saturating at float32's range, so no
  finite input overflows (NaN/Inf propagate).
  """
  vec = vec.astype(jnp.float32)
  m = jnp.max(jnp.abs(vec), initial=0.0)
  s = row_scatter(buckets, signs * checks.ratio(vec, jnp.where(m > 0, m, 1.0))[None, :], cols)
  return checks.saturate(s * m, jnp.isfinite(m) & jnp.all(jnp.isfinite(s)))


def unsketch(table: jax.Array, buckets: jax.Array, signs: jax.Array) -> jax.Array:
  """Median estimate `g_i ~ median_r s_r(i) S[r, h_r(i)]` of every coordinate.

  The middle of the sorted rows (even rows: `a/2 + b/2`, which cannot overflow), as
  `count_sketch`'s decode (`_sketch._median_rows`).
  """
  return _median_rows(signs * row_gather(table, buckets))


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a + b` saturated at float32's range where both are finite (NaN/Inf propagate)."""
  return checks.saturate(a + b, jnp.isfinite(a) & jnp.isfinite(b))


def fetchsgd_server_step(state: FetchSGDState, table: jax.Array, buckets: jax.Array,
                         signs: jax.Array, *, k: int, momentum: float,
                         error_reset: str = "zero") -> tuple[jax.Array, FetchSGDState]:
  """One FetchSGD server step on the aggregated sketch `table`: `(D f32[size], state')`.

  See the module docstring; `D` is `k`-sparse (ties to the lowest index; NaN counts as the
  largest, so it propagates).
  """
  rows, cols = table.shape
  size = buckets.shape[1]
  u = _add(momentum * state.momentum, table)
  e = _add(state.error, u)
  idx = top_indices(unsketch(e, buckets, signs), min(k, size))
  est = unsketch(e, buckets[:, idx], signs[:, idx])
  delta = jnp.zeros((size,), jnp.float32).at[idx].set(est)
  sd = sketch(est, buckets[:, idx], signs[:, idx], cols)  # = A delta (delta is k-sparse)
  hit = sd != 0
  e = jnp.where(hit, 0.0, e) if error_reset == "zero" else _add(e, -sd)
  return delta, FetchSGDState(jnp.where(hit, 0.0, u), e)


def fetchsgd(rows: int, cols: int, k: int, *, momentum: float = 0.9, seed: int = 0,
             error_reset: str = "zero") -> Compressor:
  """FetchSGD's channel: clients send a fixed count sketch, `decode` is the server step.

  Uplink bits: `32 rows cols` (hashes come from `seed`, known to both ends). `reduce` sums
  the weighted sketches; `decode(table, FetchSGDState, keys, like)` runs
  `fetchsgd_server_step` and returns the `k`-sparse update `D` (use `server_tx =
  optax.sgd(lr)`). Receiver state: `FetchSGDState` (momentum and error sketches).

  In `federated.build_round` the weighted mean of the sketches is decoded once per round
  with the server's receiver state `ServerState.aggregator`, which carries the momentum and
  error sketches across rounds: full FetchSGD with `server_tx = optax.sgd(lr)`.
  """
  rows = checks.check_positive_int(rows, "rows")
  cols = checks.check_positive_int(cols, "cols")
  k = checks.check_positive_int(k, "k")
  momentum = float(momentum)
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if error_reset not in ERROR_RESETS:
    raise ValueError(f"error_reset must be one of {ERROR_RESETS}, got {error_reset!r}")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an int, got {seed!r}")

  def init_fn(params):
    del params
    z = jnp.zeros((rows, cols), jnp.float32)
    return EmptyState(), FetchSGDState(z, z)

  def encode_fn(vec, state, keys, params=None):
    del keys, params
    checks.check_finite(vec)
    b, s = sketch_hashes(seed, rows, cols, vec.shape[0])
    n = rows if vec.shape[0] else 0  # an empty model sends nothing
    return {"sketch": Field(sketch(vec, b, s, cols)[:n], 32)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    size = like.shape[0]
    if size == 0:
      return jnp.zeros((0,), like.dtype), state
    if not isinstance(state, FetchSGDState):
      raise ValueError("fetchsgd decode: state must be the FetchSGDState of init(params)")
    b, s = sketch_hashes(seed, rows, cols, size)
    delta, state = fetchsgd_server_step(state, payload["sketch"].data, b, s, k=k,
                                        momentum=momentum, error_reset=error_reset)
    return checks.cast_finite(delta, like.dtype), state

  def reduce_fn(payloads, weights):
    table = payloads["sketch"]
    w = weights.astype(jnp.float32)
    top = jnp.max(jnp.abs(w)[:, None, None] * jnp.abs(table.data), axis=0, initial=0.0)
    safe = jnp.where(top > 0, top, 1.0)  # summed relative to the largest term: no overflow
    summed = jnp.tensordot(w, checks.ratio(table.data, safe[None]), axes=1)
    return {"sketch": table.replace(data=checks.saturate(
        summed * top, jnp.isfinite(top) & jnp.isfinite(summed)))}

  return flattened(Compressor(init_fn, encode_fn, decode_fn, reduce=reduce_fn))


def fetchsgd_convention_bytes(rows: int, cols: int, changed: int) -> dict:
  """CommEfficient's per-participant byte counts: `4 rows cols` up, `4 changed` down."""
  return {"upload_bytes": 4 * rows * cols, "download_bytes": 4 * int(changed)}


def sparse_download_bits(changed: int, size: int) -> int:
  """Honest bits of sending `changed` of `size` weights: values, indices and a count."""
  return int(changed) * (32 + _bits.index_bits(size)) + _bits.length_bits(size)


def changed_weights(old: jax.Array, new: jax.Array) -> jax.Array:
  """int32 number of coordinates where two parameter pytrees differ (what a client fetches)."""
  diff = [jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(jax.tree.leaves(old),
                                                           jax.tree.leaves(new))]
  return sum(diff, jnp.zeros((), jnp.int32))


__all__ = ["fetchsgd", "FetchSGDState", "fetchsgd_server_step", "sketch_hashes", "sketch",
           "unsketch", "fetchsgd_convention_bytes", "sparse_download_bits", "changed_weights"]
