"""HSQ: hyper-sphere quantization (Dai, Yan, Zhou, Yang, Ng, Cheng, Fan; arXiv 1911.04655).

Spec: ALGORITHMS_M22_HSQ_LAQ.md section 2. The raveled update is cut into chunks of `dc`
coordinates; each chunk is sent as the index of one of `K` unit codewords plus an `n`-bit
scalar. The codebook is regenerated from a seed on both sides and never sent.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import error_feedback as _error_feedback
from fedjax_compress._src.combinators import flattened

MODES = ("greedy", "unbiased")


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


def hsq(*, codebook_size: int = 256, chunk: int = 16, scalar_bits: int = 6, seed: int = 0,
        error_feedback: bool = True, mode: str = "greedy", stochastic: bool = True,
        kmeans_iters: int = 20, search_block: int = 8192) -> Compressor:
  """Hyper-sphere quantization: one codeword index and one scalar per `dc`-chunk.

  The model is raveled and zero-padded to `n = ceil(D/dc)` chunks `x_i` (padding is never
  sent). With the unit codebook `C` (`K x dc`, from `seed`):
  - `mode='greedy'` (released code): `k_i = argmax_k |<c_k, x_i>|` (one matmul + argmax),
    `u_i = <c_{k_i}, x_i>`; `x^_i = u_i c_{k_i}` is the projection on the best line.
  - `mode='unbiased'`: `alpha_i = pinv(C^T) x_i`, `k_i ~ |alpha_ik| / ||alpha_i||_1`,
    `u_i = sign(alpha_ik) ||alpha_i||_1`, so `E[x^_i] = x_i` (needs `K >= dc`).
  Scalars: `h = 2^(n-1) - 1`, `s = max_i |u_i| / h`, `u~_i = s l_i` with integer
  `l_i in [-h, h]` (stochastic rounding from `keys.private` if `stochastic`, unbiased given
  `s`); `scalar_bits=32` sends `u_i` as float32 instead.
  Departure from the code (spec 2.4): a symmetric grid with one float scale instead of
  `(min u, max u)`, so zero chunks decode to exactly zero and one float is saved.
  `error_feedback=True` wraps the codec in `error_feedback` (`e <- y - y^`, scale 1;
  the code's `tanh(epoch/2)` warm-up of the residual is not implemented).

  The search scores `[chunks, K]` are formed `search_block` chunks at a time (`lax.map`
  over blocks when there are more), bounding memory to `4 K search_block` bytes.

  Bits: `ceil(D/dc) * (ceil(log2 K) + n) + 32` (`n < 32`), `ceil(D/dc) * (ceil(log2 K) + 32)`
  for `n = 32`. Defaults (K=256, dc=16, n=6) give 0.875 bit/coordinate.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import Keys, bits
  >>> c = hsq(error_feedback=False)
  >>> g = {"w": jax.random.normal(jax.random.key(0), (1000,))}
  >>> payload, _ = c.encode(g, c.init(g)[0], Keys(jax.random.key(1), jax.random.key(2)))
  >>> int(bits.count(payload)) == 63 * (8 + 6) + 32
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
  search_block = checks.check_positive_int(search_block, "search_block")
  cb_np = codebook(size, dc, seed=seed, iters=kmeans_iters)
  pinv_np = (np.linalg.pinv(cb_np.T.astype(np.float64)).astype(np.float32)
             if mode == "unbiased" else None)  # K x dc with C^T pinv = I
  index_width = _bits.index_bits(size)
  half = 2**(nb - 1) - 1

  def chunks_of(vec):
    n = -(-vec.shape[0] // dc)
    return jnp.pad(vec.astype(jnp.float32), (0, n * dc - vec.shape[0])).reshape(n, dc)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_finite(vec)
    x = chunks_of(vec)
    cb = jnp.asarray(cb_np)
    k_sample, k_round = jax.random.split(keys.private)
    n = x.shape[0]
    if mode == "greedy":
      def search(xb, _):
        p = xb @ cb.T                                # [b, K]: the search is one matmul
        k = jnp.argmax(jnp.abs(p), axis=1)           # ties: lowest index
        return k, jnp.take_along_axis(p, k[:, None], axis=1)[:, 0]
      r = jnp.zeros((n,), jnp.float32)
    else:
      def search(xb, rb):
        a = xb @ jnp.asarray(pinv_np).T              # [b, K]: C^T a_i = x_i
        l1 = jnp.sum(jnp.abs(a), axis=1)
        # Inverse CDF: first index whose cumulative |a| reaches r (zero chunk -> index 0).
        k = jnp.minimum(jnp.sum(jnp.cumsum(jnp.abs(a), axis=1) < (rb * l1)[:, None], axis=1),
                        size - 1)
        return k, jnp.sign(jnp.take_along_axis(a, k[:, None], axis=1)[:, 0]) * l1
      r = jax.random.uniform(k_sample, (n,))
    if n <= search_block:
      k, u = search(x, r)
    else:  # bounded memory: blocks of chunks, zero-padded (padding rows are dropped)
      nb_ = -(-n // search_block)
      pad = nb_ * search_block - n
      xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(nb_, search_block, dc)
      rb = jnp.pad(r, (0, pad)).reshape(nb_, search_block)
      k, u = jax.lax.map(lambda a: search(*a), (xb, rb))
      k, u = k.reshape(-1)[:n], u.reshape(-1)[:n]
    payload = {"index": Field(k.astype(_int_dtype(index_width, False)), index_width)}
    if nb == 32:
      payload["scalar"] = Field(u.astype(jnp.float32), 32)
      return payload, state
    scale = jnp.max(jnp.abs(u)) / half
    v = u / jnp.where(scale > 0, scale, 1.0)
    if stochastic:
      low = jnp.floor(v)
      level = low + (jax.random.uniform(k_round, v.shape) < v - low)
    else:
      level = jnp.round(v)
    level = jnp.clip(level, -half, half).astype(_int_dtype(nb, True))
    payload["scalar"] = Field(level, nb)
    payload["scale"] = Field(scale.reshape(1).astype(jnp.float32), 32)
    return payload, state

  def decode_fn(payload, state, keys, like):
    del keys
    u = payload["scalar"].data.astype(jnp.float32)
    if nb != 32:
      u = u * payload["scale"].data[0]
    k = payload["index"].data.astype(jnp.int32)
    out = (u[:, None] * jnp.asarray(cb_np)[k]).reshape(-1)[:like.shape[0]]
    return out.astype(like.dtype), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    decoded = jax.vmap(lambda q: decode_fn(q, None, None, like)[0].astype(jnp.float32))(payloads)
    return jnp.tensordot(weights, decoded, axes=1).astype(like.dtype)

  codec = flattened(Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn))
  return _error_feedback(codec) if error_feedback else codec


def bits_per_message(num_params: int, *, codebook_size: int = 256, chunk: int = 16,
                     scalar_bits: int = 6) -> int:
  """Wire bits of one HSQ message for a model of `num_params` coordinates (spec 2.7 form)."""
  n = math.ceil(num_params / chunk)
  per_chunk = _bits.index_bits(codebook_size) + scalar_bits
  return n * per_chunk + (0 if scalar_bits == 32 else 32)
