"""Hadamard-rotated quantizers: DRIVE, EDEN and rotated uniform (FedJAX's `rotated_uniform`).

All three cut the raveled model (or, with `per_tensor=True`, each tensor) into blocks of
`B = min(block_size, next_pow2(n))` coordinates, zero-padding the last block, and rotate each
block by `R = H_B diag(s) / sqrt(B)` (`H_B` Walsh-Hadamard, `s` Rademacher signs drawn from
`keys.shared`: both ends derive it, so the rotation costs 0 bits, and all clients of a round
share it, so `aggregate` sums in the rotated domain and inverts one rotation). Each block is
first divided by its `max|x|` so the transform never overflows; a scale beyond float32's
range is sent saturated. The padded coordinates are rotated into every coordinate, so all
`nb * B` rotated values are sent: padding costs bits.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, Keys, stateless_init
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._quantize import hash_uniform
from fedjax_compress.ops import fwht
from fedjax_compress.ops._hadamard import next_power_of_two

ValuesFn = Callable[[dict], tuple[jax.Array, jax.Array]]
"""`payload -> (scale f32[nb], v f32[nb, B])`: the rotated-domain message is `scale * v`."""


def block_shape(size: int, block_size: int) -> tuple[int, int]:
  """`(nb, B)`: `B = min(block_size, next_pow2(size))`, `nb = ceil(size / B)` (0 if empty)."""
  b = min(block_size, next_power_of_two(max(size, 1)))
  return -(-size // b), b


def _signs(key: jax.Array, nb: int, b: int) -> jax.Array:
  return jax.random.rademacher(key, (nb, b), jnp.float32)


def rotate(x: jax.Array, key: jax.Array) -> jax.Array:
  """`R x` per row of `x[nb, B]`: `H_B (s * x) / sqrt(B)`, signs `s` from `key`."""
  return fwht(x * _signs(key, *x.shape), normalize=True)


def unrotate(y: jax.Array, key: jax.Array) -> jax.Array:
  """`R^T y` per row (`R` is orthogonal): `s * H_B y / sqrt(B)`."""
  return fwht(y, normalize=True) * _signs(key, *y.shape)


def _blocks(vec: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """`(y[nb, B], m[nb])`: the zero-padded blocks divided by their `max|x|` (`m`; 1 if zero)."""
  n = vec.shape[0]
  nb, b = block_shape(n, block_size)
  x = jnp.pad(vec.astype(jnp.float32), (0, nb * b - n)).reshape(nb, b)
  m = jnp.max(jnp.abs(x), axis=1, initial=0.0)
  return checks.ratio(x, jnp.where(m > 0, m, 1.0)[:, None]), m


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a / b`, 0 where `b == 0`."""
  return jnp.where(b != 0, a / jnp.where(b != 0, b, 1.0), 0.0)


def _times(a: jax.Array, m: jax.Array) -> jax.Array:
  """`a * m` saturated at float32's range when both are finite (NaN/Inf propagate)."""
  return checks.saturate(a * m, jnp.isfinite(a) & jnp.isfinite(m))


def _rotated_codec(encode_blocks: Callable, values: ValuesFn, block_size: int) -> Compressor:
  """A vector codec from `encode_blocks(y, m, r, keys) -> payload` and `values(payload)`."""

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    y, m = _blocks(vec, block_size)
    return encode_blocks(y, m, rotate(y, keys.shared), keys), state

  decode_fn, aggregate_fn = scaled_decoders(values, lambda v, key, size: unrotate(v, key))
  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


def scaled_decoders(values: ValuesFn, inverse: Callable[[jax.Array, jax.Array, int], jax.Array]):
  """`(decode_fn, aggregate_fn)` of a vector codec whose message is `scale[:, None] * v`
  in a shared-key domain, mapped back by `inverse(v, keys.shared, size) -> [nb, B']`
  (`size`: the vector's length).

  `aggregate` sums `sum_c w_c scale_c v_c` in that domain and inverts once; the weighted
  scales are divided by their largest magnitude per block first, so the sum cannot overflow.
  """

  def out(scale, v, key, size):
    return _times(inverse(v, key, size), scale[:, None]).reshape(-1)[:size]

  def decode_fn(payload, state, keys, like):
    checks.check_keys(keys)
    scale, v = values(payload)
    return checks.cast_finite(out(scale, v, keys.shared, like.shape[0]), like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    checks.check_keys(keys)
    scale, v = jax.vmap(values)(payloads)                      # [C, nb], [C, nb, B]
    ws = weights.astype(jnp.float32)[:, None] * scale
    top = jnp.max(jnp.abs(ws), axis=0, initial=0.0)            # factored out: no overflow
    v = jnp.einsum("cn,cnb->nb", _safe_div(ws, top[None, :]), v)
    top = jnp.where(jnp.all(jnp.isfinite(ws), axis=0), top, jnp.nan)
    return checks.cast_finite(out(top, v, keys.shared, like.shape[0]), like.dtype)

  return decode_fn, aggregate_fn


def per_tensor(inner: Compressor) -> Compressor:
  """Run the vector codec `inner` on each tensor raveled (keys folded with the leaf index).

  Payloads are stamped with the updates' signature (`layout.stamp`), so `decode` rejects a
  template of another structure or shape. Leaves decode in float32 and are cast to their
  dtype saturating (`checks.cast_finite`).
  """

  def _keys(keys, i, batched=False):
    if not isinstance(keys, Keys):
      return keys  # the inner codec raises a ValueError naming `keys`
    private = keys.private if batched else jax.random.fold_in(keys.private, i)
    return Keys(jax.random.fold_in(keys.shared, i), private)

  def encode_fn(updates, state, keys, params=None):
    del params
    checks.check_keys(keys)
    leaves = jax.tree.leaves(updates)
    msgs = [inner.encode(jnp.ravel(x).astype(jnp.float32), None, _keys(keys, i))[0]
            for i, x in enumerate(leaves)]
    return layout.stamp(msgs, updates), state

  def _unflatten(like, vecs):
    leaves = jax.tree.leaves(like)
    return jax.tree.unflatten(jax.tree.structure(like), [
        checks.cast_finite(v.reshape(np.shape(l)), l.dtype) for v, l in zip(vecs, leaves)])

  def _like(l):
    return jax.ShapeDtypeStruct((int(np.size(l)),), jnp.float32)

  def decode_fn(payload, state, keys, like):
    checks.check_keys(keys)
    msgs = layout.unstamp(payload, like)
    vecs = [inner.decode(p, None, _keys(keys, i), _like(l))[0]
            for i, (p, l) in enumerate(zip(msgs, jax.tree.leaves(like)))]
    return _unflatten(like, vecs), state

  def aggregate_fn(payloads, weights, keys, like):
    msgs = layout.unstamp(payloads, like)
    vecs = [inner.aggregate(p, weights, _keys(keys, i, True), _like(l))
            for i, (p, l) in enumerate(zip(msgs, jax.tree.leaves(like)))]
    return _unflatten(like, vecs)

  return Compressor(stateless_init, encode_fn, decode_fn,
                    None if inner.aggregate is None else aggregate_fn)


def _wrap(codec: Compressor, per_tensor_: bool) -> Compressor:
  return per_tensor(codec) if per_tensor_ else flattened(codec)


def _check_common(block_size, scale, per_tensor_):
  block_size = checks.check_positive_int(block_size, "block_size")
  if block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two, got {block_size}")
  if scale not in ("unbiased", "mse"):
    raise ValueError(f"scale must be 'unbiased' or 'mse', got {scale!r}")
  if not isinstance(per_tensor_, bool):
    raise ValueError(f"per_tensor must be a bool, got {per_tensor_!r}")
  return block_size


def drive(*, scale: str = "mse", block_size: int = 2**16, per_tensor: bool = False) -> Compressor:
  """DRIVE (Vargaftik et al. 2021): one bit per rotated coordinate and one scale per block.

  With `r = R x` (one block): send `sign(r)` and `S`; decode `S R^T sign(r)`.
  `scale='mse'` (DRIVE's optimal scale) `S = ||r||_1 / B` minimizes `||x - S R^T sign(r)||`
  for the sent signs; `scale='unbiased'` `S = ||x||_2^2 / ||r||_1` makes
  `<x, decoded> = ||x||^2` (unbiased over uniformly random rotations; with the randomized
  Hadamard `R` only approximately). Zero maps to `+1`.
  Bits: `nb * (B + 32)` (see the module docstring for `nb`, `B`).
  """
  block_size = _check_common(block_size, scale, per_tensor)

  def encode_blocks(y, m, r, keys):
    del y, keys
    l1 = jnp.sum(jnp.abs(r), axis=1)
    s = _safe_div(jnp.sum(r * r, axis=1), l1) if scale == "unbiased" else l1 / r.shape[1]
    return {"scale": Field(_times(s, m), 32), "sign": Field(r >= 0, 1)}

  def values(p):
    return p["scale"].data, jnp.where(p["sign"].data, 1.0, -1.0)

  return _wrap(_rotated_codec(encode_blocks, values, block_size), per_tensor)


@functools.lru_cache(maxsize=None)
def gaussian_lloyd_max(bits: int, iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd-Max quantizer of N(0, 1) with `2^bits` levels: `(centroids, boundaries)` float64.

  Fixed point of `t_j = (c_{j-1} + c_j) / 2` and `c_j = E[Z | t_j < Z < t_{j+1}] =
  (phi(t_j) - phi(t_{j+1})) / (Phi(t_{j+1}) - Phi(t_j))`. One bit gives `+-sqrt(2/pi)`.
  """
  from scipy import special, stats  # pylint: disable=import-outside-toplevel
  n = 1 << bits
  c = stats.norm.ppf((np.arange(n) + 0.5) / n)
  for _ in range(iters):
    t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    mass = 0.5 * (special.erf(t[1:] / math.sqrt(2)) - special.erf(t[:-1] / math.sqrt(2)))
    c = (pdf[:-1] - pdf[1:]) / mass
  return c, (c[1:] + c[:-1]) / 2


def eden(bits: int = 1, *, scale: str = "unbiased", block_size: int = 2**16,
         per_tensor: bool = False) -> Compressor:
  """EDEN (Vargaftik et al. 2022): rotated coordinates quantized to N(0,1)'s Lloyd-Max levels.

  Per block, `r = R x` is normalized to `z = r sqrt(B) / ||r||_2` (close to N(0, 1) after
  the rotation), each `z_i` is sent as the index of its nearest of the `2^bits` Lloyd-Max
  centroids `c` (`gaussian_lloyd_max`), and decoded as `S R^T c[idx]`. `scale='unbiased'`
  `S = ||r||^2 / <r, c[idx]>` (EDEN's scale: `<x, decoded> = ||x||^2`; unbiased over
  uniform rotations, approximately so for the Hadamard `R`), `scale='mse'`
  `S = <r, c[idx]> / ||c[idx]||^2` (least squares). `bits=1` with the unbiased scale equals
  `drive(scale='unbiased')`. Bits: `nb * (bits * B + 32)`, `1 <= bits <= 8`.
  """
  bits = checks.check_positive_int(bits, "bits")
  if bits > 8:
    raise ValueError(f"bits must be in [1, 8], got {bits}")
  block_size = _check_common(block_size, scale, per_tensor)
  cents, bounds = gaussian_lloyd_max(bits)
  cents32 = np.asarray(cents, np.float32)
  bounds32 = np.asarray(bounds, np.float32)

  def encode_blocks(y, m, r, keys):
    del y, keys
    l2sq = jnp.sum(r * r, axis=1)
    z = r * _safe_div(math.sqrt(r.shape[1]), jnp.sqrt(l2sq))[:, None]
    idx = jnp.searchsorted(jnp.asarray(bounds32), z).astype(jnp.uint8)
    c = jnp.asarray(cents32)[idx]
    dot = jnp.sum(r * c, axis=1)
    s = _safe_div(l2sq, dot) if scale == "unbiased" else _safe_div(dot, jnp.sum(c * c, axis=1))
    s = jnp.where(jnp.isfinite(l2sq), s, jnp.nan)  # NaN input: NaN scale, not a finite one
    return {"scale": Field(_times(s, m), 32), "index": Field(idx, bits)}

  def values(p):
    return p["scale"].data, jnp.asarray(cents32)[p["index"].data.astype(jnp.int32)]

  return _wrap(_rotated_codec(encode_blocks, values, block_size), per_tensor)


def rotated_uniform(levels: int = 256, *, block_size: int = 2**16,
                    per_tensor: bool = False) -> Compressor:
  """Rotated uniform stochastic quantization (FedJAX's `rotated_uniform_stochastic_quantizer`).

  Per block, `r = R x` is rounded stochastically (dither from `keys.private`) to one of
  `levels` equally spaced values in `[min r, max r]`: `E[decoded] = x` (the rotation is
  linear). Sends `min r`, `max r` (float32) and a `ceil(log2 levels)`-bit level per rotated
  coordinate: bits `nb * (ceil(log2 L) B + 64)`. FedJAX rotates each tensor padded to a power
  of two (`per_tensor=True, block_size >= ` the largest tensor) and bills
  `log2(L) D + 64 #tensors` once per round (not per client, not the padding).
  """
  levels = checks.check_positive_int(levels, "levels")
  if not 2 <= levels <= 2**16:
    raise ValueError(f"levels must be in [2, 65536], got {levels}")
  block_size = _check_common(block_size, "mse", per_tensor)
  width = max(1, math.ceil(math.log2(levels)))
  dtype = jnp.uint8 if width <= 8 else jnp.uint16

  def encode_blocks(y, m, r, keys):
    del y
    lo, hi = jnp.min(r, axis=1, initial=jnp.inf), jnp.max(r, axis=1, initial=-jnp.inf)
    t = _safe_div(r - lo[:, None], (hi - lo)[:, None]) * (levels - 1)
    low = jnp.floor(t)
    q = jnp.clip(low + (hash_uniform(keys.private, r.shape) < t - low), 0, levels - 1)
    q = jnp.where(jnp.isfinite(t), q, 0).astype(dtype)
    bad = jnp.where(jnp.all(jnp.isfinite(r), axis=1), 0.0, jnp.nan)  # NaN input: NaN bounds
    return {"lo": Field(_times(lo, m) + bad, 32), "hi": Field(_times(hi, m) + bad, 32),
            "level": Field(q, width)}

  def values(p):
    lo, hi = p["lo"].data, p["hi"].data
    c = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    step = (hi / (levels - 1) - lo / (levels - 1))
    v = lo[:, None] + p["level"].data.astype(jnp.float32) * step[:, None]
    return c, _safe_div(v, c[:, None])

  return _wrap(_rotated_codec(encode_blocks, values, block_size), per_tensor)


__all__ = ["drive", "eden", "rotated_uniform", "gaussian_lloyd_max", "rotate", "unrotate",
           "block_shape", "per_tensor"]
