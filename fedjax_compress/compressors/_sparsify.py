"""Sparsifiers: global top-k and random-k over the whole (raveled) model."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened

MAX_SIZE = 2**32 - 1
"""Largest model the sparsifiers address (uint32 indices)."""


def _resolve_k(k: Optional[int], fraction: Optional[float]) -> tuple[Optional[int], Optional[float]]:
  if (k is None) == (fraction is None):
    raise ValueError("give exactly one of k (count) or fraction (of the model size)")
  if k is not None:
    return checks.check_positive_int(k, "k"), None
  return None, checks.check_fraction(fraction, "fraction")


def _static_k(k: Optional[int], fraction: Optional[float], size: int) -> int:
  """Number of kept coordinates for a vector of `size` elements (shape-static; 0 if empty)."""
  if size > MAX_SIZE:
    raise ValueError(f"at most 2^32 - 1 parameters (uint32 indices), got {size}")
  if size == 0:
    return 0
  if k is None:
    return max(1, math.ceil(fraction * size))
  if k > size:
    raise ValueError(f"k={k} exceeds the number of parameters {size}")
  return k


def _scatter_sum(values: jax.Array, indices: jax.Array, size: int) -> jax.Array:
  return jnp.zeros((size,), jnp.float32).at[indices.reshape(-1)].add(
      values.reshape(-1).astype(jnp.float32), mode="drop")


def magnitude_keys(vec: jax.Array) -> jax.Array:
  """int32 sort keys of `|vec|`: the float32 bits without the sign bit.

  For non-negative floats the bit pattern orders like the value, so keys order `|v|`
  exactly, with `-0 == +0`, `+-inf` above every finite value and NaN above inf.
  """
  bits = jax.lax.bitcast_convert_type(vec.astype(jnp.float32), jnp.int32)
  return bits & jnp.int32(0x7FFFFFFF)


SAMPLE = 1 << 15
"""Sample size of `top_indices`' threshold estimate (vectors above `4 * SAMPLE` elements)."""
_ROW = 32  # row length of the candidate compaction


def top_indices(vec: jax.Array, k: int, *, sample: int = SAMPLE) -> jax.Array:
  """uint32 indices, in increasing order, of the `k` largest `|vec|` (ties: lowest index).

  Small vectors (`<= 4 sample` elements) or `k > D/4` use `lax.top_k` (on XLA:CPU it costs
  hundreds of memory passes at D = 10M). Otherwise `_threshold_select`: exact, same result.
  """
  if k == 0:
    return jnp.zeros((0,), jnp.uint32)
  keys = magnitude_keys(vec)
  n = keys.shape[0]
  if n <= 4 * sample or 4 * k > n:
    _, idx = jax.lax.top_k(keys, k)  # lax.top_k: equal keys lower index first
    return jnp.sort(idx.astype(jnp.uint32))
  return _threshold_select(keys, k, sample)


def _excl_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _threshold_select(keys: jax.Array, k: int, sample: int) -> jax.Array:
  """Exact top-`k` of int32 `keys` (ties: lowest index) in a few passes, no full sort.

  1. A threshold `t` from a strided sample of `sample` keys, set a few standard deviations
     below the sample's top-`k D/sample` quantile.
  2. One pass counts, per row of `_ROW` keys, `G_r = #{key > t}` and `E_r = #{key == t}`.
     `t` is valid when `G + E >= k` (all of the top `k` are `>= t`) and `G <= cap` (static
     `cap ~ k + 2 margin`); otherwise `t` is bisected over the key range (a `while_loop`,
     one counting pass per step, normally no step; `t = T`, the `k`-th largest key, is
     always valid, so it terminates within 31 steps).
  3. The `m = min(G + E, cap)` candidates (`key > t`, then the lowest-index ties) are
     compacted in index order from the row counts (each output slot gathers its row).
  4. The `k`-th largest candidate `T` and the lowest-index ties at `T` give the result.
  """
  n = keys.shape[0]
  stride = n // sample
  r = k * sample / n
  margin = 4.0 * math.sqrt(r) + 8.0
  rank = min(sample - 1, math.ceil(r + margin))
  cap = min(n, k + math.ceil(2.0 * margin * stride) + 64)
  t0 = jnp.sort(keys[::stride][:sample])[sample - 1 - rank]

  rows = -(-n // _ROW)
  kp = jnp.pad(keys, (0, rows * _ROW - n), constant_values=-1).reshape(rows, _ROW)

  def counts(t):
    return (jnp.sum(kp > t, axis=1, dtype=jnp.int32), jnp.sum(kp == t, axis=1, dtype=jnp.int32))

  def bad(c):
    _, _, t, gt, eq = c
    total = jnp.sum(gt) + jnp.sum(eq)
    return (total < k) | (jnp.sum(gt) > cap)

  def step(c):
    lo, hi, t, gt, eq = c
    few = jnp.sum(gt) + jnp.sum(eq) < k  # t above T: lower it
    lo, hi = jnp.where(few, lo, t + 1), jnp.where(few, t - 1, hi)
    t = lo + (hi - lo) // 2
    return (lo, hi, t) + counts(t)

  init = (jnp.int32(0), jnp.int32(0x7FFFFFFF), t0) + counts(t0)
  _, _, t, gt, eq = jax.lax.while_loop(bad, step, init)

  g = jnp.sum(gt)
  m = jnp.minimum(g + jnp.sum(eq), cap)
  take_eq = jnp.clip(m - g - _excl_cumsum(eq), 0, eq)  # ties taken per row, lowest first
  sel = gt + take_eq
  off = jnp.cumsum(sel)
  j = jax.lax.iota(jnp.int32, cap)
  row = jnp.minimum(jnp.searchsorted(off, j, side="right"), rows - 1).astype(jnp.int32)
  q = j - (off[row] - sel[row])  # rank of slot j inside its row
  rk = kp[row]  # (cap, _ROW)
  tie = rk == t
  mask = (rk > t) | (tie & (_excl_cumsum(tie.astype(jnp.int32), 1) < take_eq[row][:, None]))
  pos = jnp.argmax(jnp.cumsum(mask, axis=1, dtype=jnp.int32) > q[:, None], axis=1)
  valid = j < m
  cidx = jnp.where(valid, row * _ROW + pos.astype(jnp.int32), n)
  ckey = jnp.where(valid, jnp.take_along_axis(rk, pos[:, None], axis=1)[:, 0], -1)

  big = jnp.sort(ckey)[cap - k]  # the k-th largest key
  gt2 = ckey > big
  eq2 = ckey == big
  final = gt2 | (eq2 & (_excl_cumsum(eq2.astype(jnp.int32)) < k - jnp.sum(gt2)))
  (slots,) = jnp.nonzero(final, size=k, fill_value=0)
  return cidx[slots].astype(jnp.uint32)


def top_k(k: Optional[int] = None, *, fraction: Optional[float] = None) -> Compressor:
  """Global top-k by magnitude: send `k` float32 values and their `ceil(log2 D)`-bit indices.

  Keeps the `k` largest `|g_i|`; ties go to the lowest index. NaN counts as larger than
  any number (so a NaN under `jit` is sent and propagates) and `+-inf` as larger than any
  finite value. Indices are sent in increasing order. With `fraction`,
  `k = ceil(fraction D)`; an empty model sends nothing. Biased; pair with `error_feedback`.
  Bits: `k * (32 + ceil(log2 D))`.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.top_k(2)
  >>> g = {'w': jnp.array([0.5, -3.0, 3.0, 1.0, -3.0])}
  >>> keys = Keys(jax.random.key(0), jax.random.key(1))
  >>> p, _ = c.encode(g, None, keys)
  >>> c.decode(p, None, keys, g)[0]['w'].tolist(), int(bits.count(p))
  ([0.0, -3.0, 3.0, 0.0, 0.0], 70)
  """
  k, fraction = _resolve_k(k, fraction)

  def encode_fn(vec, state, keys, params=None):
    del keys, params
    checks.check_finite(vec)
    size = vec.shape[0]
    idx = top_indices(vec, _static_k(k, fraction, size))
    return {"values": Field(vec[idx].astype(jnp.float32), 32),
            "indices": Field(idx, _bits.index_bits(size))}, state

  def decode_fn(payload, state, keys, like):
    del keys
    out = _scatter_sum(payload["values"].data, payload["indices"].data, like.shape[0])
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    vals = payloads["values"].data * weights[:, None]
    return _scatter_sum(vals, payloads["indices"].data, like.shape[0]).astype(like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


def strata(size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Static `(start, length)` of the `k` strata of `random_k(sampling='stratified')`.

  `q, r = divmod(size, k)`: the first `r` strata hold `q + 1` coordinates, the others `q`.
  Returned as int64 NumPy arrays (for references); the codec computes them in-graph.
  """
  q, r = divmod(size, k)
  j = np.arange(k, dtype=np.int64)
  return j * q + np.minimum(j, r), q + (j < r)


def random_k(k: Optional[int] = None, *, fraction: Optional[float] = None,
             shared_mask: bool = False, unbiased: bool = True,
             sampling: str = "stratified") -> Compressor:
  """Random-k: `k` distinct coordinates drawn from the message keys; only their values are sent.

  The coordinates come from `keys.private` (or `keys.shared` with `shared_mask=True`, the
  same coordinates for all clients), which the receiver derives too, so only the `k`
  float32 values are sent: bits = `32 k`.

  `sampling='stratified'` (default, `O(k)` work): the `D` coordinates are cut into `k`
  contiguous strata of `q = floor(D/k)` or `q + 1` coordinates (`strata`) and one coordinate
  is drawn uniformly in each. Coordinate `i` of stratum `j` (length `n_j`) is kept with
  probability `1/n_j` (`k/D` when `k` divides `D`), and with `unbiased=True` its value is
  scaled by `n_j`, so `E[decode(encode(g))] = g`. Unlike a uniform `k`-subset, two
  coordinates of one stratum are never both kept. `sampling='uniform'`: a uniform
  `k`-subset (`jax.random.choice` without replacement, a full sort of `D` keys), scaled by
  `D/k`.

  Under `jit`, a NaN/Inf anywhere in the input makes every sent value NaN (it propagates
  even when its coordinate is not drawn). Decoded values saturate at float32's range.
  """
  k, fraction = _resolve_k(k, fraction)
  if sampling not in ("stratified", "uniform"):
    raise ValueError(f"sampling must be 'stratified' or 'uniform', got {sampling!r}")
  for name, flag in (("shared_mask", shared_mask), ("unbiased", unbiased)):
    if not isinstance(flag, bool):
      raise ValueError(f"{name} must be a bool, got {flag!r}")

  def _indices(key, size):
    """(uint32 indices, float32 unbiasing scale per index) for a vector of `size`."""
    kk = _static_k(k, fraction, size)
    if kk == 0:
      return jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), jnp.float32)
    if sampling == "uniform":
      idx = jax.random.choice(key, size, (kk,), replace=False).astype(jnp.uint32)
      return idx, jnp.full((kk,), size / kk if unbiased else 1.0, jnp.float32)
    q, r = divmod(size, kk)
    j = jax.lax.iota(jnp.uint32, kk)
    length = jnp.uint32(q) + (j < r).astype(jnp.uint32)
    start = j * jnp.uint32(q) + jnp.minimum(j, jnp.uint32(r))
    offset = jnp.floor(jax.random.uniform(key, (kk,)) * length.astype(jnp.float32))
    idx = start + jnp.minimum(offset.astype(jnp.uint32), length - 1)
    return idx, (length.astype(jnp.float32) if unbiased else jnp.ones((kk,), jnp.float32))

  def _key(keys):
    checks.check_keys(keys)
    return keys.shared if shared_mask else keys.private

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_finite(vec)
    idx, _ = _indices(_key(keys), vec.shape[0])
    poison = jnp.where(jnp.all(jnp.isfinite(vec)), 0.0, jnp.nan)
    return {"values": Field(vec[idx].astype(jnp.float32) + poison, 32)}, state

  def decode_fn(payload, state, keys, like):
    size = like.shape[0]
    idx, scale = _indices(_key(keys), size)
    vals = payload["values"].data
    out = _scatter_sum(checks.saturate(vals * scale, jnp.isfinite(vals)), idx, size)
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    size = like.shape[0]
    vals = payloads["values"].data
    if shared_mask:
      idx, scale = _indices(_key(keys), size)
      vals = jnp.tensordot(weights, vals, axes=1)
    else:
      checks.check_keys(keys)
      idx, scale = jax.vmap(lambda kk: _indices(kk, size))(keys.private)
      vals = vals * weights[:, None]
    return _scatter_sum(checks.saturate(vals * scale, jnp.isfinite(vals)), idx,
                        size).astype(like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))
