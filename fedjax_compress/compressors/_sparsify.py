"""Sparsifiers: global top-k and random-k over the whole (raveled) model."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened


def _resolve_k(k: Optional[int], fraction: Optional[float]) -> tuple[Optional[int], Optional[float]]:
  if (k is None) == (fraction is None):
    raise ValueError("give exactly one of k (count) or fraction (of the model size)")
  if k is not None:
    return checks.check_positive_int(k, "k"), None
  return None, checks.check_fraction(fraction, "fraction")


def _static_k(k: Optional[int], fraction: Optional[float], size: int) -> int:
  """Number of kept coordinates for a vector of `size` elements (shape-static)."""
  if k is None:
    return max(1, math.ceil(fraction * size))
  if k > size:
    raise ValueError(f"k={k} exceeds the number of parameters {size}")
  return k


def _scatter_sum(values: jax.Array, indices: jax.Array, size: int) -> jax.Array:
  return jnp.zeros((size,), jnp.float32).at[indices.reshape(-1)].add(
      values.reshape(-1).astype(jnp.float32))


def top_k(k: Optional[int] = None, *, fraction: Optional[float] = None) -> Compressor:
  """Global top-k by magnitude: send `k` float32 values and their `ceil(log2 D)`-bit indices.

  Ties are broken by lowest index (`lax.top_k`). Biased; pair with `error_feedback`.
  Bits: `k * (32 + ceil(log2 D))`.
  """
  k, fraction = _resolve_k(k, fraction)

  def encode_fn(vec, state, keys, params=None):
    del keys, params
    checks.check_finite(vec)
    size = vec.shape[0]
    kk = _static_k(k, fraction, size)
    _, idx = jax.lax.top_k(jnp.abs(vec), kk)
    return {"values": Field(vec[idx].astype(jnp.float32), 32),
            "indices": Field(idx.astype(jnp.uint32), _bits.index_bits(size))}, state

  def decode_fn(payload, state, keys, like):
    del keys
    out = _scatter_sum(payload["values"].data, payload["indices"].data.astype(jnp.int32),
                       like.shape[0])
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    vals = payloads["values"].data * weights[:, None]
    return _scatter_sum(vals, payloads["indices"].data.astype(jnp.int32),
                        like.shape[0]).astype(like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


def random_k(k: Optional[int] = None, *, fraction: Optional[float] = None,
             shared_mask: bool = False, unbiased: bool = True) -> Compressor:
  """Random-k: `k` coordinates drawn without replacement from the message keys.

  The indices come from `keys.private` (or `keys.shared` with `shared_mask=True`, the
  same coordinates for all clients), which the receiver derives too, so only the `k`
  float32 values are sent: bits = `32 k`. With `unbiased=True` values are scaled by
  `D/k`, so `E[decode(encode(g))] = g`.
  """
  k, fraction = _resolve_k(k, fraction)

  def _indices(key, size):
    kk = _static_k(k, fraction, size)
    return jax.random.choice(key, size, (kk,), replace=False)

  def _key(keys):
    return keys.shared if shared_mask else keys.private

  def _scale(size):
    return size / _static_k(k, fraction, size) if unbiased else 1.0

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_finite(vec)
    idx = _indices(_key(keys), vec.shape[0])
    return {"values": Field(vec[idx].astype(jnp.float32), 32)}, state

  def decode_fn(payload, state, keys, like):
    size = like.shape[0]
    idx = _indices(_key(keys), size)
    out = _scatter_sum(payload["values"].data * _scale(size), idx, size)
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    size = like.shape[0]
    if shared_mask:
      idx = _indices(keys.shared, size)
      vals = jnp.tensordot(weights, payloads["values"].data, axes=1)
    else:
      idx = jax.vmap(lambda kk: _indices(kk, size))(keys.private)
      vals = payloads["values"].data * weights[:, None]
    return (_scatter_sum(vals, idx, size) * _scale(size)).astype(like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))
