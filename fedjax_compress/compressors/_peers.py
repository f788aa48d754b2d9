"""Compressors the peers ship: TernGrad, natural compression and dithering, casting,
threshold sparsification and DGC (FedJAX, GRACE, FL_PyTorch, PyTorch DDP hooks)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, EmptyState, Field, stateless_init
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._quantize import _buckets, bucket_norms, hash_uniform
from fedjax_compress.compressors._rotated import per_tensor
from fedjax_compress.compressors._sparsify import MAX_SIZE, _scatter_sum, top_indices


def _max_abs(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x), initial=0.0)


def _scaled_std(x: jax.Array) -> jax.Array:
  """Standard deviation as `m std(x / m)` (`m = max|x|`): no overflow for finite `x`."""
  m = _max_abs(x)
  return m * jnp.std(checks.ratio(x, jnp.where(m > 0, m, 1.0))) if x.size else m


# ------------------------------------------------------------------------------- TernGrad

TRITS_PER_BYTE = 5
"""`3^5 = 243 <= 256`: five ternary digits fit one byte (1.6 bits per element)."""


def pack_trits(t: jax.Array) -> jax.Array:
  """uint8 codes of `t` (ints in {0, 1, 2}), 5 per byte: `sum_j t_{5i+j} 3^j` (zero-padded)."""
  n = t.shape[0]
  groups = -(-n // TRITS_PER_BYTE)
  t = jnp.pad(t.astype(jnp.int32), (0, groups * TRITS_PER_BYTE - n))
  powers = jnp.asarray([3**j for j in range(TRITS_PER_BYTE)], jnp.int32)
  return (t.reshape(groups, TRITS_PER_BYTE) @ powers).astype(jnp.uint8)


def unpack_trits(codes: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack_trits`: int32 trits of the first `n` elements."""
  c = codes.astype(jnp.int32)[:, None]
  powers = jnp.asarray([3**j for j in range(TRITS_PER_BYTE)], jnp.int32)
  return ((c // powers[None, :]) % 3).reshape(-1)[:n]


def terngrad(*, clip: Optional[float] = 2.5) -> Compressor:
  """TernGrad (Wen et al. 2017), per tensor: `s * sign(g_i) * Bernoulli(|g_i| / s)`.

  `s = max|g|` after clipping `g` to `[-clip sigma, clip sigma]` (`sigma` = the tensor's
  standard deviation; the paper's and FedJAX's 2.5), so `E[decoded] = clip(g)`; with
  `clip=None`, `E[decoded] = g`. The ternary values are packed five to a byte (`3^5 = 243`).
  Bits per non-empty tensor: `8 ceil(n/5) + 32` (FedJAX bills `log2(3) n + 64` per round).
  """
  if clip is not None:
    clip = float(clip)
    if not clip > 0 or math.isinf(clip):
      raise ValueError(f"clip must be a positive finite number of standard deviations or "
                       f"None, got {clip}")

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    g = vec.astype(jnp.float32)
    if clip is not None:
      bound = clip * _scaled_std(g)
      g = jnp.where(jnp.abs(g) > bound, bound * jnp.sign(g), g)  # NaN stays NaN
    s = _max_abs(g) if g.size else jnp.zeros((), jnp.float32)
    s = jnp.where(jnp.all(jnp.isfinite(g)), s, jnp.nan)
    p = checks.ratio(jnp.abs(g), jnp.where(s > 0, s, 1.0))
    keep = hash_uniform(keys.private, g.shape) < p
    trit = jnp.where(keep, jnp.where(g > 0, 2, 0), 1)  # 0: -1, 1: 0, 2: +1
    n = 1 if g.size else 0
    return {"scale": Field(jnp.broadcast_to(s, (n,)), 32),
            "trits": Field(pack_trits(trit), 8)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    n = like.shape[0]
    t = unpack_trits(payload["trits"].data, n).astype(jnp.float32) - 1.0
    s = payload["scale"].data[0] if n else jnp.zeros((), jnp.float32)
    return checks.cast_finite(t * s, like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    dec = jax.vmap(lambda p: decode_fn(p, None, keys, jax.ShapeDtypeStruct(
        like.shape, jnp.float32))[0])(payloads)
    return checks.cast_finite(checks.saturate(jnp.tensordot(weights, dec, axes=1)), like.dtype)

  return per_tensor(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


# ------------------------------------------------------------------- natural compression

def _rand23(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform int32 in [0, 2^23) (the 2^-24 grid of `hash_uniform`, halved: exact)."""
  return (hash_uniform(key, shape) * 2.0**23).astype(jnp.int32)


def natural_compression() -> Compressor:
  """Natural compression (Horvath et al. 2019): `|x|` rounded randomly to a power of two.

  For `2^e <= |x| < 2^(e+1)` send `2^(e+1)` with probability `|x| / 2^e - 1` (the float32
  mantissa fraction) else `2^e`, so `E[decoded] = x`; the message is the sign bit and the
  8-bit float32 exponent (subnormals round to 0 or 2^-126 the same way): 9 bits per
  element. Exception, to stay finite: values in `[2^127, max]` round down to `2^127`
  (biased). Inf and NaN keep exponent 255 and decode to +-inf.
  """

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    bits = jax.lax.bitcast_convert_type(vec.astype(jnp.float32), jnp.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    up = _rand23(keys.private, vec.shape) < mant
    exp = jnp.where(exp == 255, 255, jnp.minimum(exp + up.astype(jnp.int32), 254))
    return {"sign": Field(bits < 0, 1), "exponent": Field(exp.astype(jnp.uint8), 8)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    e = payload["exponent"].data.astype(jnp.int32) << 23
    out = jax.lax.bitcast_convert_type(e, jnp.float32)
    out = jnp.where(payload["sign"].data, -out, out)
    return checks.cast_finite(out, like.dtype), state

  return flattened(Compressor(stateless_init, encode_fn, decode_fn))


def natural_dithering(levels: int = 8, *, bucket_size: int = 512) -> Compressor:
  """Natural dithering (Horvath et al. 2019): QSGD-style rounding onto powers of two.

  Per bucket `v` with `n = ||v||_2`, `r_i = |v_i| / n` is rounded stochastically (unbiased)
  between its neighbours in `{0, 2^(1-s), ..., 1/2, 1}` (`s = levels`), so
  `E[decoded] = v`. Sends a sign and a level index in `[0, s]` per element and one float32
  norm per bucket: bits `32 ceil(D/b) + D (ceil(log2(s+1)) + 1)`. `1 <= levels <= 126`.
  """
  levels = checks.check_positive_int(levels, "levels")
  if levels > 126:
    raise ValueError(f"levels must be <= 126 (2^(1-s) stays a normal float32), got {levels}")
  bucket_size = checks.check_positive_int(bucket_size, "bucket_size")
  width = math.ceil(math.log2(levels + 1)) + 1

  def _level(l):
    """Magnitude of level index `l` (0 -> 0, l -> 2^(l - s))."""
    return jnp.where(l > 0, jnp.ldexp(jnp.ones_like(l, jnp.float32), l - levels), 0.0)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    size = vec.shape[0]
    b = _buckets(vec.astype(jnp.float32), bucket_size)  # QSGD's buckets and norms
    norms = bucket_norms(b)
    r = jnp.minimum(checks.ratio(jnp.abs(b), jnp.where(norms > 0, norms, 1.0)[:, None]), 1.0)
    _, e = jnp.frexp(r)                     # r = f 2^e, f in [1/2, 1): floor(log2 r) = e - 1
    low = jnp.where(r > 0, jnp.clip(e - 1 + levels, 0, levels), 0)
    lo, hi = _level(low), _level(jnp.minimum(low + 1, levels))
    p = jnp.where(hi > lo, (r - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)
    idx = low + (hash_uniform(keys.private, b.shape) < p)
    q = jnp.where(b < 0, -idx, idx).reshape(-1)[:size].astype(jnp.int8)
    return {"norms": Field(norms, 32), "levels": Field(q, width)}, state

  def decode_fn(payload, state, keys, like):
    del keys
    size = like.shape[0]
    q = _buckets(payload["levels"].data.astype(jnp.int32), bucket_size)
    norms = payload["norms"].data
    mag = _level(jnp.abs(q)) * jnp.sign(q).astype(jnp.float32)
    out = checks.saturate(mag * norms[:, None], jnp.isfinite(norms)[:, None])
    return checks.cast_finite(out.reshape(-1)[:size], like.dtype), state

  return flattened(Compressor(stateless_init, encode_fn, decode_fn))


# ------------------------------------------------------------------------------- casting

CAST_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16,
               "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


def cast(dtype: str = "float16", *, scaled: Optional[bool] = None) -> Compressor:
  """Send each tensor cast to a narrower float (fp16 / bf16 / 8-bit float): round to nearest.

  `dtype` in `CAST_DTYPES`. Finite values beyond the target's range saturate at its largest
  value (PyTorch's fp16 hook would send inf). `scaled=True` (default for the 8-bit formats,
  whose ranges are +-448 / +-57344 with coarse subnormals) also sends one float32 scale per
  tensor, `max|x| / max(dtype)`, and casts `x / scale` (the per-tensor scaling of fp8
  training). Bits: `width(dtype) n` per tensor, `+ 32` when scaled.
  """
  if dtype not in CAST_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(CAST_DTYPES)}, got {dtype!r}")
  target = CAST_DTYPES[dtype]
  width = jnp.dtype(target).itemsize * 8
  if scaled is None:
    scaled = width == 8
  if not isinstance(scaled, bool):
    raise ValueError(f"scaled must be a bool or None, got {scaled!r}")
  fmax = float(jnp.finfo(target).max)

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)

    def leaf(x):
      x = jnp.asarray(x).astype(jnp.float32)
      out = {}
      if scaled:
        s = _max_abs(x) / fmax
        s = jnp.where(jnp.all(jnp.isfinite(x)), s, jnp.nan)
        out["scale"] = Field(jnp.broadcast_to(s, (1 if x.size else 0,)), 32)
        x = checks.ratio(x, jnp.where(s > 0, s, 1.0))
      out["value"] = Field(checks.saturate(x, limit=fmax).astype(target), width)
      return out

    return layout.stamp(jax.tree.map(leaf, updates), updates), state

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)

    def leaf(msg, l):
      v = msg["value"].data.astype(jnp.float32)
      if scaled and np.size(l):
        s = msg["scale"].data[0]
        v = checks.saturate(v * s, jnp.isfinite(s) & jnp.isfinite(v))
      return checks.cast_finite(v.reshape(np.shape(l)), l.dtype)

    treedef = jax.tree.structure(like)
    msgs = treedef.flatten_up_to(payload)
    return jax.tree.unflatten(treedef, [leaf(m, l) for m, l in
                                        zip(msgs, jax.tree.leaves(like))]), state

  return Compressor(stateless_init, encode_fn, decode_fn)


# ------------------------------------------------------------------ threshold sparsify

def _sparse_payload(vec: jax.Array, mask: jax.Array) -> dict:
  """Variable-length `{values, indices}` of `vec` where `mask` (increasing index order)."""
  size = vec.shape[0]
  if size == 0:  # nothing to send, not even a count
    empty = jnp.zeros((0,), jnp.float32)
    return {"values": Field(empty, 32), "indices": Field(empty.astype(jnp.uint32), 1)}
  if size > MAX_SIZE:
    raise ValueError(f"at most 2^32 - 1 parameters (uint32 indices), got {size}")
  count = jnp.sum(mask.astype(jnp.int32))
  idx = jnp.nonzero(mask, size=size, fill_value=0)[0].astype(jnp.uint32)
  vals = jnp.where(jnp.arange(size) < count, vec[idx], 0.0).astype(jnp.float32)
  return {"values": Field(vals, 32, count), "indices": Field(idx, _bits.index_bits(size), count)}


def _sparse_decode(payload: dict, size: int) -> jax.Array:
  if payload["values"].count is None:
    return jnp.zeros((size,), jnp.float32)
  count = _bits.check_count(payload["values"])
  live = jnp.arange(size) < count
  idx = jnp.where(live, payload["indices"].data.astype(jnp.int32), size)  # dropped
  return _scatter_sum(jnp.where(live, payload["values"].data, 0.0), idx, size)


def threshold(tau: float) -> Compressor:
  """Threshold sparsification (GRACE's `threshold`): send every `g_i` with `|g_i| > tau`.

  A variable-length message: the count (`ceil(log2(D+1))` bits, twice: values and indices
  are separate fields), the selected float32 values and their `ceil(log2 D)`-bit indices,
  in increasing order. Bits: `c (32 + ceil(log2 D)) + 2 ceil(log2(D+1))` for `c` selected
  (0 when none: the empty payload of GRACE #16 is just the headers). NaN is selected (its
  `|g| > tau` is False, so it is added explicitly) and propagates under `jit`.
  """
  tau = float(tau)
  if not tau >= 0 or math.isinf(tau):
    raise ValueError(f"tau must be a finite number >= 0, got {tau}")

  def encode_fn(vec, state, keys, params=None):
    del keys, params
    checks.check_finite(vec)
    v = vec.astype(jnp.float32)
    return _sparse_payload(v, (jnp.abs(v) > tau) | jnp.isnan(v)), state

  def decode_fn(payload, state, keys, like):
    del keys
    return checks.cast_finite(_sparse_decode(payload, like.shape[0]), like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    dec = jax.vmap(lambda p: _sparse_decode(p, like.shape[0]))(payloads)
    return checks.cast_finite(checks.saturate(jnp.tensordot(weights, dec, axes=1)), like.dtype)

  return flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))


# --------------------------------------------------------------------------------- DGC

class DgcState(NamedTuple):
  """Sender state of `dgc`: momentum `u` and accumulated (not yet sent) velocity `v`."""

  momentum: jax.Array
  accumulated: jax.Array


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a + b` saturated where both are finite (NaN/Inf propagate)."""
  return checks.saturate(a + b, jnp.isfinite(a) & jnp.isfinite(b))


def dgc(fraction: float = 0.001, *, momentum: float = 0.9, clip_norm: Optional[float] = None,
        masking: bool = True) -> Compressor:
  """Deep Gradient Compression (Lin et al. 2018) on the raveled update, per client.

  Momentum correction: `u <- m u + g`, `v <- v + u`; send the top `k = ceil(fraction D)`
  of `|v|` (values and `ceil(log2 D)`-bit indices) and keep the rest in `v`. Momentum factor
  masking (`masking=True`): `u` and `v` are zeroed where sent. `clip_norm` (local gradient
  clipping) rescales `g` to at most that L2 norm first. Biased (delayed, not dropped,
  coordinates). Bits: `k (32 + ceil(log2 D))`; the receiver is stateless.
  """
  fraction = checks.check_fraction(fraction, "fraction")
  momentum = float(momentum)
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if clip_norm is not None and not float(clip_norm) > 0:
    raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
  if not isinstance(masking, bool):
    raise ValueError(f"masking must be a bool, got {masking!r}")

  def init_fn(params):
    z = jnp.zeros(params.shape, jnp.float32)
    return DgcState(z, z), EmptyState()

  def encode_fn(vec, state, keys, params=None):
    del keys, params
    checks.check_finite(vec)
    if not isinstance(state, DgcState) or state.momentum.shape != vec.shape:
      raise ValueError("dgc: state must be the DgcState of init(params) for updates of "
                       f"this size ({vec.shape[0]} parameters)")
    size = vec.shape[0]
    g = vec.astype(jnp.float32)
    if clip_norm is not None:
      m = _max_abs(g)
      nrm = m * jnp.linalg.norm(checks.ratio(g, jnp.where(m > 0, m, 1.0)))
      g = g * jnp.minimum(1.0, float(clip_norm) / jnp.where(nrm > 0, nrm, 1.0))
    u = _add(momentum * state.momentum, g)
    v = _add(state.accumulated, u)
    k = 0 if size == 0 else max(1, math.ceil(fraction * size))
    idx = top_indices(v, k)
    sent = jnp.zeros((size,), bool).at[idx].set(True)
    payload = {"values": Field(v[idx], 32), "indices": Field(idx, _bits.index_bits(size))}
    v = jnp.where(sent, 0.0, v)
    if masking:
      u = jnp.where(sent, 0.0, u)
    return payload, DgcState(u, v)

  def decode_fn(payload, state, keys, like):
    del keys
    out = _scatter_sum(payload["values"].data, payload["indices"].data, like.shape[0])
    return checks.cast_finite(out, like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    vals = payloads["values"].data * weights[:, None].astype(jnp.float32)
    out = _scatter_sum(checks.saturate(vals, jnp.isfinite(vals)), payloads["indices"].data,
                       like.shape[0])
    return checks.cast_finite(checks.saturate(out), like.dtype)

  return flattened(Compressor(init_fn, encode_fn, decode_fn, aggregate_fn))


__all__ = ["terngrad", "natural_compression", "natural_dithering", "cast", "CAST_DTYPES",
           "threshold", "dgc", "DgcState", "pack_trits", "unpack_trits"]
