"""Scalar quantizers: QSGD (stochastic uniform levels on bucket norms) and signSGD."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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


MAX_LEVELS = 2**23
"""Largest `qsgd` level count: `s |v_i| / n` keeps a fractional part in float32 up to 2^23."""


def _mix32(h: jax.Array) -> jax.Array:
  """A 32-bit integer finalizer (xorshift-multiply, full avalanche); uint32 -> uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """float32 uniforms in [0, 1) on a 2^-24 grid: a keyed hash of each element's index.

  `u_i = (mix(mix(i ^ s0) ^ s1) >> 8) 2^-24` with `(s0, s1) = jax.random.bits(key, (2,))`:
  one fused elementwise pass (no stored random stream; `jax.random.uniform` costs about
  ten memory passes of the array on CPU). Statistical quality is that of a good integer
  hash of a counter, ample for dithering; it is not a cryptographic generator. Needs
  `prod(shape) <= 2^32`.
  """
  n = math.prod(shape)
  if n > 2**32:
    raise ValueError(f"hash_uniform: at most 2^32 elements, got {n}")
  seed = jax.random.bits(key, (2,), jnp.uint32)
  i = jax.lax.iota(jnp.uint32, n).reshape(shape)
  return (_mix32(_mix32(i ^ seed[0]) ^ seed[1]) >> 8).astype(jnp.float32) * 2.0**-24


def bucket_norms(b: jax.Array) -> jax.Array:
  """L2 norm of each row of `b`, without overflow: `m ||b/m||_2` with `m = max|b|` per row.

  Saturates at float32's max (rows whose norm exceeds it); `>= max|b|` always, so QSGD with
  these norms stays unbiased. NaN/Inf rows give NaN/Inf.
  """
  m = jnp.max(jnp.abs(b), axis=1, initial=0.0)
  safe = jnp.where(m > 0, m, 1.0)
  nrm = m * jnp.sqrt(jnp.sum(jnp.square(checks.ratio(b, safe[:, None])), axis=1))
  return jnp.minimum(jnp.maximum(nrm, m), checks.float_max(jnp.float32))


def qsgd(levels: int, *, bucket_size: int = 512) -> Compressor:
  """QSGD (Alistarh et al. 2017): unbiased stochastic rounding to `s` levels per bucket.

  For a bucket `v` with norm `n = ||v||_2`: `q_i = n sign(v_i) xi_i / s`, where
  `xi_i = l + Bernoulli(s|v_i|/n - l)` and `l = floor(s|v_i|/n)`; so `E[q] = v` and
  `E||q - v||^2 <= min(b/s^2, sqrt(b)/s) ||v||^2` for bucket size `b`.
  Bits: `32 * ceil(D/b) + D * (ceil(log2(s+1)) + 1)`. `1 <= levels <= 2^23`.

  Dithering: `hash_uniform(keys.private)` (a keyed integer hash of the coordinate index,
  one fused pass; Bernoulli probabilities are resolved to 2^-24). Norms are computed
  as `m ||v/m||` (`m = max|v|`), so no finite input overflows; a norm beyond float32's
  range is sent as float32's max (still `>= max|v|`, so still unbiased). Decoded values
  saturate at the output dtype's range (float16's 65504) instead of becoming inf.
  """
  levels = checks.check_positive_int(levels, "levels")
  if levels > MAX_LEVELS:
    raise ValueError(f"levels must be <= 2**23 (float32 resolution of s|v|/||v||), got {levels}")
  bucket_size = checks.check_positive_int(bucket_size, "bucket_size")
  width = level_width(levels)
  dtype = _level_dtype(width)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    size = vec.shape[0]
    b = _buckets(vec.astype(jnp.float32), bucket_size)
    norms = bucket_norms(b)
    safe = jnp.where(norms > 0, norms, 1.0)
    scaled = checks.ratio(jnp.abs(b), safe[:, None]) * levels
    low = jnp.floor(scaled)
    u = hash_uniform(keys.private, b.shape)
    mag = jnp.minimum(low + (u < scaled - low), levels)
    q = (jnp.sign(b) * mag).reshape(-1)[:size].astype(dtype)
    return {"norms": Field(norms, 32), "levels": Field(q, width)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    size = like.shape[0]
    norms = payload["norms"].data
    q = _buckets(payload["levels"].data.astype(jnp.float32), bucket_size)
    out = checks.saturate(q * (norms / levels)[:, None], jnp.isfinite(norms)[:, None])
    return checks.cast_finite(out.reshape(-1)[:size], like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    decoded = jax.vmap(lambda p: decode_fn(p, None, None, like)[0].astype(jnp.float32))(
        payloads)
    return checks.cast_finite(jnp.tensordot(weights, decoded, axes=1), like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


def sign_sgd(*, scaled: bool = False) -> Compressor:
  """signSGD (Bernstein et al. 2018), per tensor: one bit per element (`g >= 0` -> +1).

  With `scaled=True` each tensor also sends its mean absolute value `||g||_1 / n` as a
  float32 and decodes to `mean|g| * sign(g)` (the scaled sign of EF-signSGD,
  Karimireddy et al. 2019). Zero maps to +1 (a bit has no third state). The mean is
  taken as `m mean(|g|/m)` (`m = max|g|`), so it never overflows.

  Without `scale`, each tensor sends one more bit, set when all its elements are finite:
  a NaN or Inf (which `jit` cannot reject) then decodes to NaN instead of a finite -1
  (the scaled variant's NaN scale does that already). Empty tensors send nothing.
  Bits: `D + 32 * #tensors` if scaled, else `D + #tensors` (non-empty tensors).

  Unscaled signs decode to `+-1` whatever the update's magnitude, so under
  `error_feedback` the residual grows with the step mismatch and training diverges at
  ordinary server learning rates (`error_feedback` warns); use `scaled=True` there.
  """
  if not isinstance(scaled, bool):
    raise ValueError(f"scaled must be a bool, got {scaled!r}")

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)

    def leaf(x):
      x = jnp.asarray(x)
      n = 1 if x.size else 0
      out = {"sign": Field(x >= 0, 1)}
      if scaled:
        a = jnp.abs(x.astype(jnp.float32))
        m = jnp.max(a, initial=0.0)
        mean = m * jnp.mean(checks.ratio(a, jnp.where(m > 0, m, 1.0))) if x.size else m
        out["scale"] = Field(jnp.broadcast_to(mean, (n,)), 32)
      else:
        out["finite"] = Field(jnp.broadcast_to(jnp.all(jnp.isfinite(x)), (n,)), 1)
      return out

    return layout.stamp(jax.tree.map(leaf, updates), updates), state

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)

    def leaf(msg, l):
      s = jnp.where(msg["sign"].data, 1.0, -1.0)
      if not np.size(l):
        return s.astype(l.dtype)
      if scaled:
        s = s * msg["scale"].data[0]
      else:
        s = jnp.where(msg["finite"].data[0], s, jnp.nan)
      return checks.cast_finite(s, l.dtype)

    treedef = jax.tree.structure(like)
    msgs = treedef.flatten_up_to(payload)
    return jax.tree.unflatten(treedef, [leaf(m, l) for m, l in
                                        zip(msgs, jax.tree.leaves(like))]), state

  encode_fn.unscaled_sign = not scaled  # read by `error_feedback` (warns on unscaled signs)
  return Compressor(stateless_init, encode_fn, decode_fn, None)
