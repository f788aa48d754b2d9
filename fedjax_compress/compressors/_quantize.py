"""Scalar quantizers: QSGD (stochastic uniform levels on bucket norms) and signSGD."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress.ops._fastfood import _mix32


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


def _uniform_at(seed: jax.Array, idx: jax.Array) -> jax.Array:
  """`hash_uniform`'s value at uint32 indices `idx` for `seed = jax.random.bits(key, (2,))`."""
  return (_mix32(_mix32(idx ^ seed[0]) ^ seed[1]) >> 8).astype(jnp.float32) * 2.0**-24


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
  return _uniform_at(seed, jax.lax.iota(jnp.uint32, n).reshape(shape))


def bucket_norms(b: jax.Array) -> jax.Array:
  """L2 norm of each row of `b`, without overflow: `m ||b/m||_2` with `m = max|b|` per row.

  Saturates at float32's max (rows whose norm exceeds it); `>= max|b|` always, so QSGD with
  these norms stays unbiased. NaN/Inf rows give NaN/Inf.
  """
  m = jnp.max(jnp.abs(b), axis=1, initial=0.0)
  safe = jnp.where(m > 0, m, 1.0)
  nrm = m * jnp.sqrt(jnp.sum(jnp.square(checks.ratio(b, safe[:, None])), axis=1))
  return jnp.minimum(jnp.maximum(nrm, m), checks.float_max(jnp.float32))


# ----------------------------------------------------------- QSGD on the leaves, no ravel
#
# QSGD's buckets are `b` consecutive coordinates of `ravel(updates)` (zero-padded past D).
# Materialising that vector costs several memory passes on XLA:CPU (a 40 MB buffer at
# D = 10M is also a fresh mmap, page-faulted on every call), so the leaves are read in
# place: each leaf's buckets that lie wholly inside it are a free (rows, b) view of the
# leaf, and the few buckets that straddle leaf boundaries (at most #leaves + 1) are
# gathered into a small (rows, b) array. Levels are written into a (ceil(D/b), b) buffer
# in bucket order, and `levels` is its first D entries: the message is the one `ravel`
# would give.


class _Buckets:
  """Static bucket layout of leaves of `shapes` (pytree order) for bucket size `b`.

  `body[l] = (h, k)`: leaf l's `k` whole buckets start at its local index `h`; `mixed`:
  the buckets not inside one leaf, ascending.
  """

  def __init__(self, shapes, b: int):
    self.shapes = [tuple(int(n) for n in s) for s in shapes]
    self.sizes = [math.prod(s) for s in self.shapes]
    self.offsets = [int(o) for o in np.cumsum([0] + self.sizes[:-1])] if self.sizes else []
    self.d, self.b = sum(self.sizes), b
    self.nb = -(-self.d // b)
    if self.nb * b > 2**32 or self.nb >= 2**31:  # uint32 dither index, int32 bucket index
      raise ValueError(f"qsgd: at most 2^32 coordinates (padded to whole buckets) in under "
                       f"2^31 buckets, got {self.nb * b} in {self.nb}")
    covered = np.zeros(self.nb, bool)
    self.body = []
    for o, n in zip(self.offsets, self.sizes):
      h = min(n, (-o) % b)
      k = (n - h) // b
      self.body.append((h, k))
      covered[(o + h) // b:(o + h) // b + k] = True
    self.mixed = [int(j) for j in np.flatnonzero(~covered)]

  def rows(self, flat: list[jax.Array]) -> list[tuple[int, jax.Array]]:
    """(first bucket, (rows, b) float32) pieces covering every bucket once, in bucket order."""
    pieces = []
    for x, o, (h, k) in zip(flat, self.offsets, self.body):
      if k:
        rows = x if (h == 0 and k * self.b == x.shape[0]) else x[h:h + k * self.b]
        pieces.append(((o + h) // self.b, rows.reshape(k, self.b)))
    if self.mixed:
      mixed = []
      for j in self.mixed:
        lo, hi = j * self.b, (j + 1) * self.b
        parts = [x[max(lo, o) - o:min(hi, o + n) - o]
                 for x, o, n in zip(flat, self.offsets, self.sizes) if max(lo, o) < min(hi, o + n)]
        if hi > self.d:
          parts.append(jnp.zeros((hi - self.d,), jnp.float32))
        mixed.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
      pieces.append((-1, jnp.stack(mixed)))  # first bucket -1: rows at `self.mixed`
    return pieces

  def per_element(self, per_bucket: jax.Array, l: int) -> jax.Array:
    """Leaf `l`'s shape; element `i` is `per_bucket[(offset_l + i) // b]`."""
    o, n, b = self.offsets[l], self.sizes[l], self.b
    j0, j1 = o // b, -(-(o + n) // b)
    rep = jnp.broadcast_to(per_bucket[j0:j1, None], (j1 - j0, b)).reshape(-1)
    return rep[o - j0 * b:o - j0 * b + n].reshape(self.shapes[l])


def _row_reduce(operands, inits, ops):
  """Row reductions of (rows, b) operands in one variadic `reduce`.

  A variadic reduce runs as one native XLA:CPU loop that reads its (sliced) operands in
  place; a single-output reduce goes to a library kernel that first copies a sliced
  operand (here: a leaf's bucket view) to a temporary.
  """
  return jax.lax.reduce(tuple(operands), tuple(jnp.float32(i) for i in inits),
                        lambda x, y: tuple(op(a, c) for op, a, c in zip(ops, x, y)), (1,))


_SSQ_LANES = 8  # independent partial sums per bucket: a shorter dependency chain, 2x faster


def _scale_parts(nrm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(c, r) with `a * c * r == checks.ratio(a, where(nrm > 0, nrm, 1))` under jit (per bucket).

  `c` is 2^-64 where the divisor exceeds 2^64 (else 1, both exact) and `r` the reciprocal
  of the pre-scaled divisor, which is what `ratio`'s division by a broadcast compiles to.
  """
  safe = jnp.where(nrm > 0, nrm, 1.0)
  big = safe > 2.0**64
  return jnp.where(big, 2.0**-64, 1.0), 1.0 / jnp.where(big, safe * 2.0**-64, safe)


def _rows_norms(rows: jax.Array) -> jax.Array:
  """`bucket_norms(rows)` (the same formula: `m ||rows/m||`, clipped) in two native passes."""
  k, b = rows.shape
  mx, mn = _row_reduce((rows, rows), (-np.inf, np.inf), (jnp.maximum, jnp.minimum))
  m = jnp.maximum(mx, -mn)
  m = jnp.where(m == 0, 0.0, m)  # +0 for all-zero rows; NaN stays NaN
  c, r = _scale_parts(m)
  t = jnp.square((rows * c[:, None]) * r[:, None])
  lanes = _SSQ_LANES if b % _SSQ_LANES == 0 else 1
  t = t.reshape(k, b // lanes, lanes)
  parts = list(_row_reduce([t[:, :, i] for i in range(lanes)], [0.0] * lanes,
                           [jnp.add] * lanes))
  while len(parts) > 1:  # pairwise
    parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
  nrm = m * jnp.sqrt(parts[0])
  return jnp.minimum(jnp.maximum(nrm, m), checks.float_max(jnp.float32))


def _quantize_rows(rows, norms, starts, seed, levels: int, dtype) -> jax.Array:
  """QSGD levels of (k, b) rows with bucket `norms`; row `i` starts at global index `starts[i]`.

  `starts` is an int (rows consecutive from there) or a NumPy array of row starts.
  """
  k, b = rows.shape
  c, r = _scale_parts(norms)
  scaled = (jnp.abs(rows) * c[:, None]) * r[:, None] * levels
  low = jnp.floor(scaled)
  col = jax.lax.broadcasted_iota(jnp.uint32, (k, b), 1)
  if isinstance(starts, int):
    idx = jax.lax.broadcasted_iota(jnp.uint32, (k, b), 0) * jnp.uint32(b) + col + jnp.uint32(starts)
  else:
    idx = jnp.asarray(np.asarray(starts, np.uint32))[:, None] + col
  mag = jnp.minimum(low + (_uniform_at(seed, idx) < scaled - low), levels)
  return (jnp.sign(rows) * mag).astype(dtype)


def qsgd(levels: int, *, bucket_size: int = 512) -> Compressor:
  """QSGD (Alistarh et al. 2017): unbiased stochastic rounding to `s` levels per bucket.

  For a bucket `v` with norm `n = ||v||_2`: `q_i = n sign(v_i) xi_i / s`, where
  `xi_i = l + Bernoulli(s|v_i|/n - l)` and `l = floor(s|v_i|/n)`; so `E[q] = v` and
  `E||q - v||^2 <= min(b/s^2, sqrt(b)/s) ||v||^2` for bucket size `b`.
  Bits: `32 * ceil(D/b) + D * (ceil(log2(s+1)) + 1)`. `1 <= levels <= 2^23`.

  Buckets are `b` consecutive coordinates of the model raveled in pytree leaf order
  (zero-padded past D); the leaves are read in place, never raveled. Dithering:
  `hash_uniform(keys.private)` of the raveled index (a keyed integer hash, one fused
  pass; Bernoulli probabilities are resolved to 2^-24). Norms are computed as
  `m ||v/m||` (`m = max|v|`), so no finite input overflows; a norm beyond float32's
  range is sent as float32's max (still `>= max|v|`, so still unbiased). Decoded values
  saturate at the output dtype's range (float16's 65504) instead of becoming inf.
  """
  levels = checks.check_positive_int(levels, "levels")
  if levels > MAX_LEVELS:
    raise ValueError(f"levels must be <= 2**23 (float32 resolution of s|v|/||v||), got {levels}")
  bucket_size = checks.check_positive_int(bucket_size, "bucket_size")
  width = level_width(levels)
  dtype = _level_dtype(width)

  def encode_fn(updates, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(updates)
    leaves = jax.tree.leaves(updates)
    lay = _Buckets([np.shape(x) for x in leaves], bucket_size)
    flat = [jnp.ravel(x).astype(jnp.float32) for x in leaves]
    pieces = lay.rows(flat)
    norm_parts = [(a, _rows_norms(rows)) for a, rows in pieces]
    by_bucket = [(a, v) for a, v in norm_parts if a >= 0]
    for a, v in norm_parts:
      if a < 0:
        by_bucket += [(j, v[i:i + 1]) for i, j in enumerate(lay.mixed)]
    by_bucket.sort(key=lambda p: p[0])
    norms = (jnp.concatenate([v for _, v in by_bucket]) if by_bucket
             else jnp.zeros((0,), jnp.float32))
    seed = jax.random.bits(keys.private, (2,), jnp.uint32)
    out = jnp.zeros((lay.nb, bucket_size), dtype)
    for a, rows in pieces:
      if a >= 0:
        q = _quantize_rows(rows, norms[a:a + rows.shape[0]], a * bucket_size, seed, levels,
                           dtype)
        out = jax.lax.dynamic_update_slice(out, q, (a, 0))
      else:
        mixed = np.asarray(lay.mixed)
        q = _quantize_rows(rows, jnp.concatenate([norms[j:j + 1] for j in lay.mixed]),
                           mixed * bucket_size, seed, levels, dtype)
        for i, j in enumerate(lay.mixed):
          out = jax.lax.dynamic_update_slice(out, q[i:i + 1], (j, 0))
    if lay.nb * bucket_size != lay.d:
      # A no-op one-element update, last before the slice to D: XLA:CPU fuses the last
      # update into the slice, and an expensive one (a bucket's quantization) would then
      # run as a slow 1-D loop over all D elements (~6x slower at D = 10M, measured).
      out = out.at[0, 0].set(out[0, 0])
    levels_out = out.reshape(-1)[:lay.d]
    payload = {"norms": Field(norms, 32), "levels": Field(levels_out, width)}
    return layout.stamp(payload, updates), state

  def decode_f32(norms, q, like):
    """float32 leaves of `like`'s shapes: `q n / s` per element, saturated where `n` is finite."""
    leaves = jax.tree.leaves(like)
    lay = _Buckets([np.shape(x) for x in leaves], bucket_size)
    scale, finite = norms / levels, jnp.isfinite(norms)
    out = []
    for l, o in enumerate(lay.offsets):
      n, shape = lay.sizes[l], lay.shapes[l]
      if n == 0:
        out.append(jnp.zeros(shape, jnp.float32))
        continue
      y = q[o:o + n].reshape(shape).astype(jnp.float32) * lay.per_element(scale, l)
      out.append(checks.saturate(y, lay.per_element(finite, l)))
    return out

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)
    leaves, treedef = jax.tree.flatten(like)
    out = decode_f32(payload["norms"].data, payload["levels"].data, like)
    return jax.tree.unflatten(treedef, [checks.cast_finite(y, l.dtype)
                                        for y, l in zip(out, leaves)]), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    payloads = layout.unstamp(payloads, like)
    leaves, treedef = jax.tree.flatten(like)
    decoded = jax.vmap(lambda nr, q: decode_f32(nr, q, like))(payloads["norms"].data,
                                                             payloads["levels"].data)
    return jax.tree.unflatten(treedef, [
        checks.cast_finite(jnp.tensordot(weights, d, axes=1), l.dtype)
        for d, l in zip(decoded, leaves)])

  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


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
