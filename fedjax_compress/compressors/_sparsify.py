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


def top_indices(vec: jax.Array, k: int) -> jax.Array:
  """uint32 indices, in increasing order, of the `k` largest `|vec|` (ties: lowest index)."""
  if k == 0:
    return jnp.zeros((0,), jnp.uint32)
  _, idx = jax.lax.top_k(magnitude_keys(vec), k)  # lax.top_k: equal keys lower index first
  return jnp.sort(idx.astype(jnp.uint32))


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
