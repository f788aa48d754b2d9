"""Count sketch (FetchSGD style): a linear sketch of the whole model, decoded by a median."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._sparsify import top_indices
from fedjax_compress.ops._fastfood import _keyed_hash, _mix32


_SIGN_SALT = 0x9E3779B9  # floor(2^32 / golden ratio): separates the sign stream


def _hashes(key: jax.Array, rows: int, cols: int, size: int) -> tuple[jax.Array, jax.Array]:
  """Bucket `int32[rows, size]` in [0, cols) and sign `float32[rows, size]` in {-1, +1}.

  Counter-based, elementwise (no random stream of `rows * size` draws): two uint32 seeds
  per row `(a_r, b_r)` come from `key`; coordinate `i` of row `r` hashes to
  `h = F(F(i ^ a_r) + b_r)` (`F = _mix32`: Fastfood's `_keyed_hash`), bucket `h mod cols`,
  and sign from the top bit of `F(h ^ c)`. `F` is a bijection, so within a row distinct
  coordinates get distinct `h`; buckets are uniform up to the modulo bias `cols / 2^32`. The hash is not a proven
  pairwise-independent family (FetchSGD's `(a i + b) mod p`); its collision rate, bucket
  balance and sign balance are tested against those of one. `size < 2^32`.
  Previously `jax.random.randint`/`rademacher` streams, ~60 memory passes at D = 10M.
  """
  if size >= 2**32:
    raise ValueError(f"count sketch: at most 2^32 - 1 coordinates, got {size}")
  seeds = jax.random.bits(key, (2, rows, 1), jnp.uint32)
  i = jax.lax.broadcasted_iota(jnp.uint32, (rows, size), 1)
  h = _keyed_hash(i, seeds)
  buckets = (h % jnp.uint32(cols)).astype(jnp.int32)
  top = (_mix32(h ^ jnp.uint32(_SIGN_SALT)) >> 31).astype(jnp.int32)
  signs = (1 - 2 * top).astype(jnp.float32)
  return buckets, signs


def _pow2(j: jax.Array) -> jax.Array:
  """Exact float32 `2^j` for an int32 `-126 <= j <= 127` (built from its exponent bits)."""
  return jax.lax.bitcast_convert_type((j.astype(jnp.int32) + 127) << 23, jnp.float32)


def row_scatter(buckets: jax.Array, values: jax.Array, cols: int) -> jax.Array:
  """`S[r, c] = sum_{i: buckets[r, i] = c} values[r, i]` (float32; out-of-range buckets dropped).

  One 1-D scatter-add per row: XLA:CPU runs a scatter with `(row, bucket)` index pairs
  1.8x slower.
  """
  return jnp.stack([jnp.zeros((cols,), jnp.float32).at[buckets[r]].add(
      values[r].astype(jnp.float32), mode="drop") for r in range(buckets.shape[0])])


def row_gather(table: jax.Array, buckets: jax.Array) -> jax.Array:
  """`table[r, buckets[r, i]]` per row (0 where a bucket is out of range).

  One 1-D gather per row: 3.6x faster on XLA:CPU than a gather of `(row, bucket)` pairs at
  D = 10M.
  """
  table = jnp.asarray(table)
  return jnp.stack([table[r].at[buckets[r]].get(mode="fill", fill_value=0.0)
                    for r in range(buckets.shape[0])])


_NETWORK_ROWS = 9  # up to this many rows the median uses a compare-exchange network


def _sort_rows(rows: list[jax.Array]) -> list[jax.Array]:
  """Odd-even transposition sort of equal-shaped arrays (elementwise; NaN last, as `jnp.sort`)."""
  rows = list(rows)
  r = len(rows)
  for p in range(r):
    for i in range(p % 2, r - 1, 2):
      a, b = rows[i], rows[i + 1]
      swap = (a > b) | (jnp.isnan(a) & ~jnp.isnan(b))
      rows[i], rows[i + 1] = jnp.where(swap, b, a), jnp.where(swap, a, b)
  return rows


def _median_rows(x: jax.Array) -> jax.Array:
  """Median over axis 0, the two middle values averaged as `a/2 + b/2` (no overflow).

  Up to `_NETWORK_ROWS` rows, an elementwise sorting network (one fused pass; XLA:CPU's
  `sort` along a short axis 0 took ~90 memory passes at D = 10M); above, `jnp.sort`.
  Same values either way (NaN sorts last; `-0` and `+0` may trade places).
  """
  r = x.shape[0]
  if r == 1:
    return x[0]
  srt = _sort_rows([x[i] for i in range(r)]) if r <= _NETWORK_ROWS else jnp.sort(x, axis=0)
  mid = srt[r // 2]
  return mid if r % 2 else srt[r // 2 - 1] * 0.5 + mid * 0.5


def count_sketch(rows: int, cols: int, *, k: Optional[int] = None) -> Compressor:
  """Count sketch of the raveled model (Charikar et al. 2002; FetchSGD, Rothchild et al. 2020).

  Each row `r` hashes coordinate `i` to bucket `h_r(i)` with sign `s_r(i)` (both from
  `keys.shared`, so every client uses the same sketch and sketches add):
  `S[r, c] = sum_{i: h_r(i) = c} s_r(i) g_i`. Decoding estimates
  `g_i ~ median_r s_r(i) S[r, h_r(i)]` and, with `k`, keeps only the `k` largest
  estimates in magnitude (ties to the lowest index). With one row and no `k` the
  estimate is linear and unbiased over the hashes; otherwise it is biased (pair with
  `error_feedback`, as FetchSGD does on the server).

  The server follows FetchSGD: `reduce` sums the weighted sketches (linear) and `decode`
  unsketches that sum once, which differs from the weighted sum of per-client decodes
  because the median is nonlinear.

  Bits: `32 * rows * cols` (hashes cost nothing: both ends derive them from the keys);
  an empty model sends nothing (0 bits).

  Finite inputs give a finite sketch: where `D max|g|` could exceed float32's range the
  sum runs on `g 2^-j` (an exact power of two, `D max|g| 2^-j < 2^126`) and is scaled back,
  saturating at float32's max; ordinary inputs use `j = 0`, the plain sum.

  Args:
    rows: number of independent hash rows (median over them).
    cols: buckets per row.
    k: optional number of coordinates kept after unsketching (static, `<= D`).

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.count_sketch(5, 256, k=2)
  >>> g = {'w': jnp.zeros(1000).at[7].set(5.0).at[900].set(-2.0)}
  >>> keys = Keys(jax.random.key(0), jax.random.key(1))
  >>> p, _ = c.encode(g, None, keys)
  >>> out, _ = c.decode(p, None, keys, g)
  >>> bool(jnp.all(out['w'] == g['w'])), int(bits.count(p))
  (True, 40960)
  """
  rows = checks.check_positive_int(rows, "rows")
  cols = checks.check_positive_int(cols, "cols")
  if k is not None:
    k = checks.check_positive_int(k, "k")

  def _sketch(vec, key):
    size = vec.shape[0]
    buckets, signs = _hashes(key, rows, cols, size)
    v = vec.astype(jnp.float32)
    m = jnp.max(jnp.abs(v))
    # |sum| <= D m < 2^(log2 D + e) for m < 2^e: shift by j = max(0, e + ceil(log2 D) - 126).
    _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, 0.0))
    j = jnp.clip(e + math.ceil(math.log2(size)) - 126, 0, 126)
    sketch = row_scatter(buckets, signs * (v * _pow2(-j))[None, :], cols)
    return checks.saturate(sketch * _pow2(j), jnp.isfinite(m))

  def _unsketch(sketch, key, like):
    size = like.shape[0]
    if size == 0:
      return jnp.zeros((0,), like.dtype)
    if k is not None and k > size:
      raise ValueError(f"k={k} exceeds the number of parameters {size}")
    buckets, signs = _hashes(key, rows, cols, size)
    est = _median_rows(signs * row_gather(sketch, buckets))
    if k is not None:  # exact top-k, ties to the lowest index (as lax.top_k), no sort of D
      idx = top_indices(est, k)
      est = jnp.zeros_like(est).at[idx].set(est[idx], unique_indices=True)
    return est.astype(like.dtype)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    if vec.shape[0] == 0:  # an empty model: nothing to send
      return {}, state
    if k is not None and k > vec.shape[0]:
      raise ValueError(f"k={k} exceeds the number of parameters {vec.shape[0]}")
    return {"sketch": Field(_sketch(vec, keys.shared), 32)}, state

  def decode_fn(payload, state, keys, like):
    checks.check_keys(keys)
    if ("sketch" in payload) != (like.shape[0] > 0):
      raise ValueError(f"decode: payload {'of' if 'sketch' in payload else 'without'} a sketch "
                       f"for a template of {like.shape[0]} parameters")
    if not payload:
      return jnp.zeros((0,), like.dtype), state
    return _unsketch(payload["sketch"].data, keys.shared, like), state

  def reduce_fn(payloads, weights):
    if "sketch" not in payloads:  # an empty model sends nothing
      return payloads
    sketch = payloads["sketch"]
    return {"sketch": sketch.replace(
        data=jnp.tensordot(weights.astype(jnp.float32), sketch.data, axes=1))}

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, reduce=reduce_fn))
