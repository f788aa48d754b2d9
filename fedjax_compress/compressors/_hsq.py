"""HSQ: hyper-sphere quantization (Dai, Yan, Zhou, Yang, Ng, Cheng, Fan; arXiv 1911.04655).

Spec: ALGORITHMS_M22_HSQ_LAQ.md section 2. Per layer (leaf), as the official
`ps_quantizer.py`: the flattened leaf is cut into chunks of `dc` coordinates; each chunk is
sent as the index of one of `K` unit codewords plus an `n`-bit scalar on that layer's own
grid. Leaves of at most `raw_layer_size` entries are sent raw. The codebook is regenerated
from a seed on both sides and never sent.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import error_feedback as _error_feedback
from fedjax_compress.compressors._quantize import hash_uniform
from fedjax_compress.ops import _hsq_native

MODES = ("greedy", "unbiased")
RAW_LAYER_SIZE = 1000  # official: layers with numel <= 1000 go through IdenticalCompressor


@functools.partial(jax.jit, static_argnames=("size", "dim", "iters", "num_samples"))
def _axial_kmeans(key, size, dim, iters, num_samples):
  """Spherical k-means with sign-invariant assignment: maximises mean_i max_k |<c_k, x_i>|."""
  x = jax.random.normal(key, (num_samples, dim), jnp.float32)
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)

  def step(_, c):
    p = x @ c.T
    k = jnp.argmax(jnp.abs(p), axis=1)
    sign = jnp.sign(jnp.take_along_axis(p, k[:, None], axis=1))
    sums = jax.ops.segment_sum(sign * x, k, size)
    norms = jnp.linalg.norm(sums, axis=1, keepdims=True)
    return jnp.where(norms > 0, sums / jnp.where(norms > 0, norms, 1.0), c)  # empty: keep

  return jax.lax.fori_loop(0, iters, step, x[:size])  # init: the first K samples ('points')


@functools.lru_cache(maxsize=32)
def codebook(size: int = 256, dim: int = 16, *, seed: int = 0, iters: int = 20,
             samples_per_codeword: int = 64) -> np.ndarray:
  """`K x dc` unit-norm codewords, a deterministic function of `(K, dc, seed, iters)`.

  `K == dc`: a random orthogonal matrix (QR of a Gaussian, signs fixed), as the official
  code. Otherwise axial spherical k-means (assign by max |inner product|, centroid =
  normalised signed sum) for `iters` steps on `samples_per_codeword * K` Gaussian
  directions. Departure: the official generator runs plain k-means (scipy `kmeans2`, 10^6
  samples) and normalises afterwards; ours optimises the criterion HSQ uses (max |cos|)
  directly and is cheap enough to run in the factory. Read-only NumPy float32.
  """
  size = checks.check_positive_int(size, "codebook_size")
  dim = checks.check_positive_int(dim, "chunk")
  key = jax.random.key(seed)
  if size == dim:
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, dim), jnp.float32))
    c = (q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]).T
  else:
    num = max(samples_per_codeword * size, size)
    c = _axial_kmeans(key, size, dim, int(iters), num)
  out = np.array(jax.device_get(c), np.float32)
  out /= np.linalg.norm(out, axis=1, keepdims=True)
  out.setflags(write=False)
  return out


def _int_dtype(width: int, signed: bool):
  if width <= 8:
    return jnp.int8 if signed else jnp.uint8
  return jnp.int16 if signed else jnp.uint16


def _pow2_scale(amax: jax.Array) -> jax.Array:
  """The power of two `s` with `amax / s` in `[1, 2)` (1 where `amax` is 0 or not finite)."""
  _, e = jnp.frexp(amax)
  s = jnp.ldexp(jnp.ones_like(amax), e - 1)
  return jnp.where((amax > 0) & jnp.isfinite(amax), s, 1.0)


def _pow2_exponent(amax: jax.Array) -> jax.Array:
  """The int32 `t` with `_pow2_scale(amax) = 2^t` (in `[-149, 127]`)."""
  _, e = jnp.frexp(amax)
  return jnp.where((amax > 0) & jnp.isfinite(amax), e - 1, 0).astype(jnp.int32)


def _use_native_search() -> bool:
  """Whether the native CPU kernels (`ops/_hsq_native.py`: greedy search, decode) are used (at trace time)."""
  return jax.default_backend() == "cpu" and _hsq_native.available()


_NATIVE_INDEX = tuple(jnp.dtype(d) for d in (jnp.uint8, jnp.uint16, jnp.int32))
_NATIVE_LEVEL = tuple(jnp.dtype(d) for d in (jnp.int8, jnp.int16, jnp.float32))


_MIN_NORMAL_BITS = 0x00800000  # bit pattern of float32's smallest normal, 2^-126


def search_tolerance(codebook_size: int) -> float:
  """Relative gap `2^(b - 23)`, `b = ceil(log2 K)`, within which `_greedy_search` may pick a
  non-maximal codeword (K=64: 7.6e-6; K=256: 3.1e-5)."""
  return 2.0**(_bits.index_bits(codebook_size) - 23)


def _stochastic_round(key: jax.Array, v: jax.Array) -> jax.Array:
  """Stochastic rounding `floor(v) + [u < frac(v)]` of a 1-D `v`, `u` = `hash_uniform(key)`.

  `u` lies on a 2^-24 grid, so `P(up) = ceil(2^24 frac)/2^24` and `|E[level] - v| <= 2^-24`.
  The keyed counter hash is one fused elementwise pass; `jax.random.bits` (threefry, lowered
  on CPU as a 5-step loop over the whole stream) cost several memory passes of the layer.
  """
  low = jnp.floor(v)
  return low + (hash_uniform(key, v.shape) < v - low)


def _greedy_search(xb: jax.Array, cb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`k ~ argmax_k |<c_k, x>|`, `u = <c_k, x>` per row of `xb[b, dc]`, with one reduction.

  Keys: the float32 `|p_k|` with its low `b = ceil(log2 K)` mantissa bits replaced by
  `K - 1 - k` (below 2^-126 clamped to 2^-126, so keys are normal floats). Positive floats
  order as their bit patterns, so one float max of the keys picks a `k` with
  `|p_k| > (1 - 2^(b-23)) max_j |p_j|` (`search_tolerance`; rows whose best `|p|` is at
  least 2^-126, i.e. all but chunks ~2^-126 below the layer's maximum), the lowest such
  index when truncated keys tie (exact ties of either sign: the lowest index). One
  reduction instead of max, min and a masked max of the scores. `u` is the float32 score
  `p_k` of the chosen codeword, read from `p`. NaN rows: `k = K-1`.
  """
  size = cb.shape[0]
  mask = 2**_bits.index_bits(size) - 1
  p = xb @ cb.T
  a = jnp.maximum(jax.lax.bitcast_convert_type(jnp.abs(p), jnp.int32), _MIN_NORMAL_BITS)
  code = (size - 1 - jnp.arange(size, dtype=jnp.int32))[None, :]           # < 2^b
  key = jnp.max(jax.lax.bitcast_convert_type((a & ~mask) | code, jnp.float32), axis=1)
  k = size - 1 - (jax.lax.bitcast_convert_type(key, jnp.int32) & mask)
  k = jnp.where(jnp.isnan(key), size - 1, k)
  return k, jnp.take_along_axis(p, k[:, None], axis=1)[:, 0]


def _blocked(search, x: jax.Array, r: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """`search(x, r)` on rows of `x[n, dc]` in blocks of `block` rows (`lax.map`, zero-padded)."""
  n, dc = x.shape
  if n <= block:
    return search(x, r)
  nblk = -(-n // block)
  pad = nblk * block - n
  xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(nblk, block, dc)
  rb = jnp.pad(r, (0, pad)).reshape(nblk, block)
  k, u = jax.lax.map(lambda a: search(*a), (xb, rb))
  return k.reshape(-1)[:n], u.reshape(-1)[:n]


def _search_greedy(x: jax.Array, cb: jax.Array, block: int | None = None):
  """`_greedy_search` over `x[n, dc]` in blocks of `block` rows (default: 4 MiB of scores)."""
  block = default_search_block(cb.shape[0]) if block is None else block
  return _blocked(lambda xb, rb: _greedy_search(xb, cb), x, jnp.zeros(x.shape[:1]), block)


SEARCH_BYTES = 4 * 2**20  # default bound on one block of search scores (fits L2/L3)


def default_search_block(codebook_size: int) -> int:
  """Chunks per search block: `4 MiB / (4 K)` score bytes, at least 256 (K=64: 16384; K=256: 4096)."""
  return max(256, SEARCH_BYTES // (4 * codebook_size))


def hsq(*, codebook_size: int = 256, chunk: int = 16, scalar_bits: int = 6, seed: int = 0,
        error_feedback: bool = False, mode: str = "greedy", stochastic: bool = True,
        kmeans_iters: int = 20, search_block: int | None = None,
        raw_layer_size: int = RAW_LAYER_SIZE) -> Compressor:
  """Hyper-sphere quantization, per layer: one codeword index and one scalar per `dc`-chunk.

  Each leaf with more than `raw_layer_size` entries is flattened and zero-padded to
  `n = ceil(numel/dc)` chunks `x_i` (padding is never sent). With the unit codebook `C`
  (`K x dc`, from `seed`):
  - `mode='greedy'` (released code): `k_i = argmax_k |<c_k, x_i>|` (scores and one
    reduction; up to a relative gap `search_tolerance(K) = 2^(ceil(log2 K) - 23)` between
    the top two float32 scores, K=256: 3.1e-5), `u_i = <c_{k_i}, x_i>` exactly;
    `x^_i = u_i c_{k_i}` is the projection on the chosen line.
  - `mode='unbiased'`: `alpha_i = pinv(C^T) x_i`, `k_i ~ |alpha_ik| / ||alpha_i||_1`,
    `u_i = sign(alpha_ik) ||alpha_i||_1`, so `E[x^_i] = x_i` (needs `K >= dc`).
  Scalars, on the layer's own grid: `h = 2^(n-1) - 1`, `s = max_i |u_i| / h` (max over
  that layer's chunks), `u~_i = s l_i` with integer `l_i in [-h, h]` (stochastic rounding
  from `keys.private` if `stochastic`, with 24-bit hashed uniforms: `|E[l_i] - u_i/s| <=
  2^-24` given `s`, see `_stochastic_round`); `scalar_bits=32` sends `u_i`
  as float32 instead. Departure from the code (spec 2.4): a symmetric grid with one float
  scale instead of `(min u, max u)`, so zero chunks decode to exactly zero and one float
  per layer is saved. Leaves of `<= raw_layer_size` entries (official: 1000) are sent as
  float32 (`raw_layer_size=0`: every non-empty leaf is quantized); empty leaves send
  nothing.

  `error_feedback=False` (default) as the released code's default; `True` wraps the codec
  in `error_feedback` (`e <- y - y^`, scale 1; the code's `tanh(epoch/2)` warm-up of the
  residual, `--ef`, is not implemented).

  Robustness: each layer is divided by a power of two (exact) before the search, so scores
  and scalars never overflow; decoded values saturate at float32's range and then at the
  template's dtype. On the CPU backend, where the native kernel builds
  (`ops/_hsq_native.py`), `mode='greedy'` searches with it: one read of the leaf, the exact
  float32 argmax (lowest index on ties, well within `search_tolerance`). Elsewhere (GPU, TPU,
  no compiler, `FEDJAX_COMPRESS_NATIVE=0`, `mode='unbiased'`) the XLA search forms the
  scores `[chunks, K]` `search_block` chunks at a time (`lax.map` over blocks), bounding
  memory to `4 K search_block` bytes; default (`None`): `max(256, 2^20 / K)` chunks, i.e.
  4 MiB of scores (measured fastest on CPU: 1024-chunk blocks were 1.5-1.7x slower at
  K = 64, 256). `search_block` affects only that XLA search. The native decode (CPU, both
  modes) writes `(l_i c_{k_i}) s` straight into the leaf's entries, the XLA one gathers.

  Bits per quantized layer: `ceil(numel/dc) * (ceil(log2 K) + n) + 32` (`n < 32`),
  `ceil(numel/dc) * (ceil(log2 K) + 32)` for `n = 32`; per raw layer `32 numel`.
  Defaults (K=256, dc=16, n=6) give 0.875 bit/coordinate on large layers.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import Keys, bits
  >>> c = hsq()
  >>> g = {"w": jax.random.normal(jax.random.key(0), (2000,)), "b": jnp.ones((10,))}
  >>> payload, _ = c.encode(g, c.init(g)[0], Keys(jax.random.key(1), jax.random.key(2)))
  >>> int(bits.count(payload)) == 125 * (8 + 6) + 32 + 10 * 32
  True
  """
  size = checks.check_positive_int(codebook_size, "codebook_size")
  if size < 2:
    raise ValueError(f"codebook_size must be >= 2, got {size}")
  if size > 2**16:
    raise ValueError(f"codebook_size must be <= 65536 (uint16 indices), got {size}")
  dc = checks.check_positive_int(chunk, "chunk")
  nb = checks.check_positive_int(scalar_bits, "scalar_bits")
  if not (2 <= nb <= 16 or nb == 32):
    raise ValueError(f"scalar_bits must be in [2, 16] or 32 (float32), got {nb}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "unbiased" and size < dc:
    raise ValueError(f"mode='unbiased' needs codebook_size >= chunk, got {size} < {dc}")
  kmeans_iters = checks.check_positive_int(kmeans_iters, "kmeans_iters")
  search_block = (default_search_block(size) if search_block is None
                  else checks.check_positive_int(search_block, "search_block"))
  if (isinstance(raw_layer_size, bool) or not isinstance(raw_layer_size, (int, np.integer))
      or raw_layer_size < 0):
    raise ValueError(f"raw_layer_size must be an integer >= 0, got {raw_layer_size!r}")
  if not isinstance(error_feedback, (bool, np.bool_)):
    raise ValueError(f"error_feedback must be a bool, got {error_feedback!r}")
  raw_layer_size = int(raw_layer_size)
  cb_np = codebook(size, dc, seed=seed, iters=kmeans_iters)
  pinv_np = (np.linalg.pinv(cb_np.T.astype(np.float64)).astype(np.float32)
             if mode == "unbiased" else None)  # K x dc with C^T pinv = I
  index_width = _bits.index_bits(size)
  half = 2**(nb - 1) - 1
  random = mode == "unbiased" or (stochastic and nb != 32)

  def kind(numel: int) -> str:
    return "empty" if numel == 0 else ("raw" if numel <= raw_layer_size else "hsq")

  def search_all(x: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Index and signed scalar of every row of `x[n, dc]` (`r`: uniforms for sampling)."""
    cb = jnp.asarray(cb_np)
    if mode == "greedy":
      search = lambda xb, rb: _greedy_search(xb, cb)
    else:
      def search(xb, rb):
        a = xb @ jnp.asarray(pinv_np).T              # [b, K]: C^T a_i = x_i
        l1 = jnp.sum(jnp.abs(a), axis=1)
        # Inverse CDF: first index whose cumulative |a| reaches r (zero chunk -> index 0).
        k = jnp.minimum(jnp.sum(jnp.cumsum(jnp.abs(a), axis=1) < (rb * l1)[:, None], axis=1),
                        size - 1)
        return k, jnp.sign(jnp.take_along_axis(a, k[:, None], axis=1)[:, 0]) * l1
    return _blocked(search, x, r, search_block)

  def encode_leaf(leaf: jax.Array, key: jax.Array) -> dict:
    numel = int(np.prod(np.shape(leaf), dtype=np.int64))
    vec = jnp.ravel(leaf).astype(jnp.float32)
    if kind(numel) == "empty":
      return {}
    if kind(numel) == "raw":
      return {"raw": Field(vec, 32)}
    n = -(-numel // dc)
    amax = jnp.max(jnp.abs(jax.lax.stop_gradient(vec)))
    scale_x = _pow2_scale(amax)  # exact rescaling
    k_sample, k_round = jax.random.split(key)
    if mode == "greedy" and _use_native_search():  # one read of vec, no padded copy
      k, u = _hsq_native.greedy_search(vec, _pow2_exponent(amax), cb_np)
    else:
      x = jnp.pad(vec / scale_x, (0, n * dc - numel)).reshape(n, dc)
      r = (jax.random.uniform(k_sample, (n,)) if mode == "unbiased"
           else jnp.zeros((n,), jnp.float32))
      k, u = search_all(x, r)         # u in units of scale_x: |u| <= sqrt(dc) 2 ||pinv||
    out = {"index": Field(k.astype(_int_dtype(index_width, False)), index_width)}
    if nb == 32:
      out["scalar"] = Field(checks.saturate(u * scale_x, jnp.isfinite(u)), 32)
      return out
    step = jnp.max(jnp.abs(u)) / half
    v = u / jnp.where(step > 0, step, 1.0)
    if stochastic:
      level = _stochastic_round(k_round, v)
    else:
      level = jnp.round(v)
    level = jnp.clip(level, -half, half).astype(_int_dtype(nb, True))
    out["scalar"] = Field(level, nb)
    scale = checks.saturate(step * scale_x, jnp.isfinite(step))   # finite for finite input
    out["scale"] = Field(scale.reshape(1).astype(jnp.float32), 32)
    return out

  def decode_leaf(msg: dict, like: Any) -> jax.Array:
    shape, dtype = np.shape(like), jnp.result_type(like)
    numel = int(np.prod(shape, dtype=np.int64))
    if kind(numel) == "empty":
      return jnp.zeros(shape, dtype)
    if kind(numel) == "raw":
      return checks.cast_finite(msg["raw"].data.reshape(shape), dtype)
    index, level = msg["index"].data, msg["scalar"].data
    if (_use_native_search() and index.dtype in _NATIVE_INDEX
        and level.dtype in _NATIVE_LEVEL):  # written straight into the leaf's entries
      scale = jnp.float32(1) if nb == 32 else msg["scale"].data[0]
      y = _hsq_native.decode(index, level, scale, cb_np, numel)
      return checks.cast_finite(y.reshape(shape), dtype)
    cw = jnp.asarray(cb_np)[index.astype(jnp.int32)]          # [n, dc]
    if nb == 32:
      y = msg["scalar"].data[:, None] * cw                 # |y| <= |u|: finite
    else:  # (level * codeword) * scale: |level c| <= h; the one product saturates
      scale = msg["scale"].data[0]
      y = checks.saturate((msg["scalar"].data.astype(jnp.float32)[:, None] * cw) * scale,
                          jnp.isfinite(scale))
    return checks.cast_finite(y.reshape(-1)[:numel].reshape(shape), dtype)

  def encode_fn(updates, state, keys, params=None):
    del params
    if random:
      checks.check_keys(keys)
    checks.check_finite(updates)
    return layout.stamp(encode_core(updates, keys.private if random else None), updates), state

  @jax.jit
  def encode_core(updates, key):
    leaves = jax.tree.leaves(updates)
    key = jax.random.key(0) if key is None else key
    keys = (jax.random.split(key, len(leaves)) if len(leaves) > 1 else [key] * len(leaves))
    return tuple(encode_leaf(x, k) for x, k in zip(leaves, keys))

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)
    return decode_core(payload, like), state  # only like's shapes/dtypes are used

  @jax.jit
  def decode_core(payload, like):
    leaves, treedef = jax.tree.flatten(like)
    if len(payload) != len(leaves):
      raise ValueError(f"hsq: payload has {len(payload)} leaves, template {len(leaves)}")
    return jax.tree.unflatten(treedef, [decode_leaf(m, l) for m, l in zip(payload, leaves)])

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    like32 = layout.zeros_like_f32(like)  # decode in float32, round to like's dtypes once
    decoded = jax.vmap(lambda q: decode_fn(q, None, None, like32)[0])(payloads)
    return jax.tree.map(lambda d, l: checks.cast_finite(jnp.tensordot(weights, d, axes=1),
                                                        jnp.result_type(l)), decoded, like)

  codec = Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)
  return _error_feedback(codec) if error_feedback else codec


def bits_per_message(num_params: int | Sequence[int], *, codebook_size: int = 256,
                     chunk: int = 16, scalar_bits: int = 6,
                     raw_layer_size: int = RAW_LAYER_SIZE) -> int:
  """Wire bits of one HSQ message (spec 2.7) for leaves of `num_params` entries (int: one leaf)."""
  sizes = [num_params] if isinstance(num_params, (int, np.integer)) else list(num_params)
  total = 0
  for numel in sizes:
    if numel == 0:
      continue
    if numel <= raw_layer_size:
      total += 32 * numel
      continue
    n = math.ceil(numel / chunk)
    total += n * (_bits.index_bits(codebook_size) + scalar_bits) + (0 if scalar_bits == 32 else 32)
  return total
