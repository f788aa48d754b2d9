"""Kashin's representation in a randomly signed, subsampled Hadamard frame, then b-bit quantization.

After Lyubarskii & Vershynin, "Uncertainty principles and vector quantization" (2010), and
TFF's `KashinHadamardEncodingStage` (tensorflow_model_optimization). The raveled model (or,
with `per_tensor=True`, each tensor) is cut into blocks of `d` coordinates (zero-padded),
each represented by `N >= redundancy * d` coefficients (`N` a power of two, see
`frame_shape`) in the tight frame

    F y = H_N P [s * y; 0] / sqrt(N),      F^T c = s * (P^T H_N c / sqrt(N))[:d],

with Rademacher signs `s` and a uniformly random permutation `P` of the `N` slots (a random
subset of `d` of the columns of the orthonormal Hadamard matrix; TFF uses the first `d`,
which for `N = 2d` is the rotation repeated twice and gives no smaller dynamic range).
`F^T F = I_d`. Signs and permutation come from `keys.shared`: both ends derive them, so the
frame costs 0 bits, and all clients of a round share it (`aggregate` sums coefficients and
synthesizes once). Each block is divided by its `max|x|` first (no overflow).

Kashin's representation by iterative clipping (L&V Sec. III.A; level `M_0 = clip_level
||y||_2 / sqrt(N)`, `M_{k+1} = eta M_k`):

    c = 0, r = y;  repeat iterations - 1 times: b = clip(F r, M_k); c += b; r -= F^T b
    c += F r      (the last step unclipped: F^T c = y exactly, a lossless representation)

so `||c||_inf <= M_0 (1 - eta^(T-1)) / (1 - eta) + ||F r_{T-1}||_inf`, in practice
`~2 ||y||_2 / sqrt(N)` at redundancy 2 (vs `~3 ||y|| / sqrt(d)`-ish for a plain rotation's
largest coefficient). The coefficients are then quantized per block to `2^bits` equally
spaced values in `[-m, m]`, `m = max|c|`, stochastically (unbiased: `E[decode] = x`) or to
the nearest (`stochastic=False`). Bits: `nb * (bits * N + 32)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._quantize import hash_uniform
from fedjax_compress.compressors._rotated import _safe_div, _times, scaled_decoders
from fedjax_compress.compressors._rotated import per_tensor as _per_tensor
from fedjax_compress.ops import fwht
from fedjax_compress.ops._hadamard import next_power_of_two

MAX_REDUNDANCY = 16.0
MAX_ITERATIONS = 64


def frame_shape(size: int, redundancy: float, block_size: int) -> tuple[int, int, int]:
  """`(nb, d, N)`: `N = min(block_size, next_pow2(ceil(redundancy size)))` coefficients per
  block of `d = min(floor(N / redundancy), size)` coordinates, `nb = ceil(size / d)` blocks."""
  n = min(block_size, next_power_of_two(max(math.ceil(redundancy * size), 1)))
  d = max(1, min(int(n // redundancy), size))
  return -(-size // d), d, n


class Frame:
  """The shared frame of one vector: signs `s[nb, d]` and permutation `P[N]` from `key`."""

  def __init__(self, key: jax.Array, nb: int, d: int, n: int):
    k_sign, k_perm = jax.random.split(key)
    self.d, self.n = d, n
    self.signs = jax.random.rademacher(k_sign, (nb, d), jnp.float32)
    self.perm = jax.random.permutation(k_perm, n)            # slot j holds [s*y; 0][perm[j]]
    self.slots = jnp.argsort(self.perm)[:d]                   # where coordinate i lands

  def analysis(self, y: jax.Array) -> jax.Array:
    """`F y` per row: `H_N P [s * y; 0] / sqrt(N)`, `y[nb, d] -> c[nb, N]`."""
    z = jnp.pad(y * self.signs, ((0, 0), (0, self.n - self.d)))
    return fwht(jnp.take(z, self.perm, axis=1), normalize=True)

  def synthesis(self, c: jax.Array) -> jax.Array:
    """`F^T c` per row: `s * (P^T H_N c / sqrt(N))[:d]`, `c[nb, N] -> y[nb, d]`."""
    return jnp.take(fwht(c, normalize=True), self.slots, axis=1) * self.signs


def kashin_coefficients(frame: Frame, y: jax.Array, iterations: int, clip_level: float,
                        eta: float) -> jax.Array:
  """Kashin coefficients `c[nb, N]` of the rows of `y[nb, d]` (`F^T c = y`), see the module."""
  nrm = jnp.sqrt(jnp.sum(y * y, axis=1, keepdims=True))
  level = clip_level * nrm / math.sqrt(frame.n)

  def step(k, carry):
    c, r = carry
    m = level * jnp.asarray(eta, jnp.float32) ** k.astype(jnp.float32)
    b = jnp.clip(frame.analysis(r), -m, m)
    return c + b, r - frame.synthesis(b)

  c0 = jnp.zeros(y.shape[:1] + (frame.n,), jnp.float32)
  c, r = jax.lax.fori_loop(0, iterations - 1, step, (c0, y))
  return c + frame.analysis(r)


def _check(bits, redundancy, iterations, clip_level, eta, block_size, stochastic, per_tensor_):
  bits = checks.check_positive_int(bits, "bits")
  if bits > 8:
    raise ValueError(f"bits must be in [1, 8], got {bits}")
  redundancy = float(redundancy)
  if not 1.0 <= redundancy <= MAX_REDUNDANCY:
    raise ValueError(f"redundancy must be in [1, {MAX_REDUNDANCY:g}], got {redundancy}")
  iterations = checks.check_positive_int(iterations, "iterations")
  if iterations > MAX_ITERATIONS:
    raise ValueError(f"iterations must be <= {MAX_ITERATIONS}, got {iterations}")
  clip_level = float(clip_level)
  if not clip_level > 0 or math.isinf(clip_level):
    raise ValueError(f"clip_level must be a positive finite number, got {clip_level}")
  eta = float(eta)
  if not 0.0 < eta <= 1.0:
    raise ValueError(f"eta must be in (0, 1], got {eta}")
  block_size = checks.check_positive_int(block_size, "block_size")
  if block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two, got {block_size}")
  if block_size < redundancy:
    raise ValueError(f"block_size ({block_size}) must be >= redundancy ({redundancy}): a "
                     f"block needs at least one coordinate")
  for name, v in (("stochastic", stochastic), ("per_tensor", per_tensor_)):
    if not isinstance(v, bool):
      raise ValueError(f"{name} must be a bool, got {v!r}")
  return bits, redundancy, iterations, clip_level, eta, block_size


def kashin(bits: int = 2, *, redundancy: float = 2.0, iterations: int = 5,
           clip_level: float = 1.0, eta: float = 0.5, block_size: int = 2**16,
           stochastic: bool = True, per_tensor: bool = False) -> Compressor:
  """Kashin representation (TFF's `KashinHadamardEncodingStage`) quantized at `bits` bits.

  Per block of `d` coordinates (`frame_shape`), the `N >= redundancy d` Kashin coefficients
  `c` (frame from `keys.shared`, 0 bits; `iterations` clipping rounds at levels
  `clip_level ||y|| / sqrt(N) eta^k`; see the module docstring) are rounded to
  `2^bits` levels `m (2 q / (2^bits - 1) - 1)` in `[-m, m]`, `m = max|c|`: stochastically
  with dither from `keys.private` (`E[decoded] = x`, the representation being exact), or to
  the nearest level with `stochastic=False`. Decoded as `F^T c_hat`.
  Bits: `nb * (bits N + 32)`, about `redundancy * bits` per coordinate; a vector that fits
  one block pads `N` up to a power of two (effective redundancy `N / size` in
  `[redundancy, 2 redundancy)`), so a smaller `block_size` (e.g. 1024) can cut the padding.
  """
  bits, redundancy, iterations, clip_level, eta, block_size = _check(
      bits, redundancy, iterations, clip_level, eta, block_size, stochastic, per_tensor)
  top = (1 << bits) - 1

  def _frame(key, size):
    nb, d, n = frame_shape(size, redundancy, block_size)
    return Frame(key, nb, d, n)

  def encode_fn(vec, state, keys, params=None):
    del params
    checks.check_keys(keys)
    checks.check_finite(vec)
    size = vec.shape[0]
    fr = _frame(keys.shared, size)
    nb = fr.signs.shape[0]
    x = jnp.pad(vec.astype(jnp.float32), (0, nb * fr.d - size)).reshape(nb, fr.d)
    mx = jnp.max(jnp.abs(x), axis=1, initial=0.0)
    y = checks.ratio(x, jnp.where(mx > 0, mx, 1.0)[:, None])
    c = kashin_coefficients(fr, y, iterations, clip_level, eta)
    m = jnp.max(jnp.abs(c), axis=1, initial=0.0)
    t = (_safe_div(c, m[:, None]) + 1.0) * (top / 2)
    if stochastic:
      low = jnp.floor(t)
      q = low + (hash_uniform(keys.private, t.shape) < t - low)
    else:
      q = jnp.round(t)
    q = jnp.where(jnp.isfinite(t), jnp.clip(q, 0, top), 0).astype(jnp.uint8)
    bad = jnp.where(jnp.all(jnp.isfinite(x), axis=1), 0.0, jnp.nan)  # NaN input: NaN scale
    return {"scale": Field(_times(m, mx) + bad, 32), "index": Field(q, bits)}, state

  def values(p):
    return p["scale"].data, p["index"].data.astype(jnp.float32) * (2.0 / top) - 1.0

  decode_fn, aggregate_fn = scaled_decoders(
      values, lambda v, key, size: _frame(key, size).synthesis(v))
  codec = Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)
  return _per_tensor(codec) if per_tensor else flattened(codec)


__all__ = ["kashin", "kashin_coefficients", "frame_shape", "Frame"]
