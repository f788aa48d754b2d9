"""Scalar quantizers: QSGD (stochastic uniform levels on bucket norms) and signSGD."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened


def level_width(levels: int) -> int:
  """Bits of a signed level in [-s, s]: ceil(log2(s+1)) magnitude bits + 1 sign bit."""
  return math.ceil(math.log2(levels + 1)) + 1


def _level_dtype(width: int):
  return jnp.int8 if width <= 8 else (jnp.int16 if width <= 16 else jnp.int32)


def _buckets(vec: jax.Array, bucket_size: int) -> jax.Array:
  size = vec.shape[0]
  n = -(-size // bucket_size)
  return jnp.pad(vec, (0, n * bucket_size - size)).reshape(n, bucket_size)


def qsgd(levels: int, *, bucket_size: int = 512) -> Compressor:
  """QSGD (Alistarh et al. 2017): unbiased stochastic rounding to `s` levels per bucket.

  For a bucket `v` with norm `n = ||v||_2`: `q_i = n sign(v_i) xi_i / s`, where
  `xi_i = l + Bernoulli(s|v_i|/n - l)` and `l = floor(s|v_i|/n)`; so `E[q] = v` and
  `E||q - v||^2 <= min(b/s^2, sqrt(b)/s) ||v||^2` for bucket size `b`.
  Bits: `32 * ceil(D/b) + D * (ceil(log2(s+1)) + 1)`. Dithering uses `keys.private`.
  """
  levels = checks.check_positive_int(levels, "levels")
  bucket_size = checks.check_positive_int(bucket_size, "bucket_size")
  width = level_width(levels)
  dtype = _level_dtype(width)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_finite(vec)
    size = vec.shape[0]
    b = _buckets(vec.astype(jnp.float32), bucket_size)
    norms = jnp.linalg.norm(b, axis=1)
    safe = jnp.where(norms > 0, norms, 1.0)
    scaled = jnp.abs(b) / safe[:, None] * levels
    low = jnp.floor(scaled)
    u = jax.random.uniform(keys.private, b.shape)
    mag = jnp.minimum(low + (u < scaled - low), levels)
    q = (jnp.sign(b) * mag).reshape(-1)[:size].astype(dtype)
    return {"norms": Field(norms, 32), "levels": Field(q, width)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    size = like.shape[0]
    q = _buckets(payload["levels"].data.astype(jnp.float32), bucket_size)
    out = (q * payload["norms"].data[:, None] / levels).reshape(-1)[:size]
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    decoded = jax.vmap(lambda p: decode_fn(p, None, None, like)[0].astype(jnp.float32))(
        payloads)
    return jnp.tensordot(weights, decoded, axes=1).astype(like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


def sign_sgd(*, scaled: bool = False) -> Compressor:
  """signSGD (Bernstein et al. 2018), per tensor: one bit per element (`g >= 0` -> +1).

  With `scaled=True` each tensor also sends its mean absolute value `||g||_1 / n` as a
  float32 and decodes to `mean|g| * sign(g)` (the scaled sign of EF-signSGD,
  Karimireddy et al. 2019). Zero maps to +1 (a bit has no third state).
  Bits: `D + 32 * #tensors` if scaled, else `D`.
  """

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)

    def leaf(x):
      x = x.astype(jnp.float32)
      out = {"sign": Field(x >= 0, 1)}
      if scaled:
        out["scale"] = Field(jnp.mean(jnp.abs(x)).reshape(1), 32)
      return out

    return layout.stamp(jax.tree.map(leaf, updates), updates), state

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)

    def leaf(msg, l):
      s = jnp.where(msg["sign"].data, 1.0, -1.0)
      if scaled:
        s = s * msg["scale"].data[0]
      return s.astype(l.dtype)

    treedef = jax.tree.structure(like)
    msgs = treedef.flatten_up_to(payload)
    return jax.tree.unflatten(treedef, [leaf(m, l) for m, l in
                                        zip(msgs, jax.tree.leaves(like))]), state

  return Compressor(stateless_init, encode_fn, decode_fn, None)


