"""Kashin representation (`compressors.kashin`) against a float64 NumPy reference and its invariants.

Conformance (honest bits == packed bytes, jit/vmap, bad inputs, unbiasedness, aggregate)
comes from the registry; here the frame, the clipping iterations and the quantizer are
recomputed in float64 from the same randomness (signs and permutation from `keys.shared`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_compress import Keys, bits, compressors as C
from fedjax_compress.compressors import _kashin

KEYS = Keys(jax.random.key(3), jax.random.key(4))


def _vec(n, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (n,), jnp.float32)


def _np_frame(key, nb, d, n):
  """Per-block `F = H_N[:, slots] diag(s)` in float64 (`N x d`), as the codec draws it."""
  fr = _kashin.Frame(key, nb, d, n)
  h = scipy.linalg.hadamard(n).astype(np.float64) / math.sqrt(n)
  s = np.asarray(fr.signs, np.float64)
  slots = np.asarray(fr.slots)
  return [h[:, slots] * s[i][None, :] for i in range(nb)]


def _np_kashin(f, y, iterations, clip_level, eta):
  """Kashin coefficients of `y` in the frame `f` (float64), L&V's iteration."""
  c, r = np.zeros(f.shape[0]), y.copy()
  level = clip_level * np.linalg.norm(y) / math.sqrt(f.shape[0])
  for k in range(iterations - 1):
    b = np.clip(f @ r, -level * eta**k, level * eta**k)
    c, r = c + b, r - f.T @ b
  return c + f @ r


def _np_encode(x, key, *, bits_, redundancy, iterations, clip_level, eta, block_size):
  """Deterministic (nearest) path: `(scale[nb], index[nb, N], frames)` in float64."""
  nb, d, n = _kashin.frame_shape(x.size, redundancy, block_size)
  xb = np.zeros(nb * d)
  xb[:x.size] = x
  xb = xb.reshape(nb, d)
  frames = _np_frame(key, nb, d, n)
  top = 2**bits_ - 1
  scales, idx = [], []
  for f, xi in zip(frames, xb):
    mx = np.abs(xi).max()
    c = _np_kashin(f, xi / (mx if mx > 0 else 1.0), iterations, clip_level, eta)
    m = np.abs(c).max()
    t = (c / m + 1.0) * top / 2 if m > 0 else np.full(n, top / 2)
    idx.append(np.clip(np.round(t), 0, top))
    scales.append(m * mx)
  return np.asarray(scales), np.stack(idx), frames


def _np_decode(scales, idx, frames, size, bits_):
  top = 2**bits_ - 1
  out = [s * f.T @ (q * 2.0 / top - 1.0) for s, q, f in zip(scales, idx, frames)]
  return np.concatenate(out)[:size]


def _roundtrip(c, g, keys=KEYS):
  sender, receiver = c.init(g)
  p, _ = jax.jit(c.encode)(g, sender, keys)
  return p, jax.jit(c.decode)(p, receiver, keys, g)[0]


# --------------------------------------------------------------------- frame


def test_frame_shape():
  assert _kashin.frame_shape(100, 2.0, 2**16) == (1, 100, 256)
  assert _kashin.frame_shape(64, 2.0, 2**16) == (1, 64, 128)
  assert _kashin.frame_shape(1000, 2.0, 256) == (8, 128, 256)
  assert _kashin.frame_shape(1000, 1.5, 256) == (6, 170, 256)
  assert _kashin.frame_shape(7, 1.0, 2**16) == (1, 7, 8)
  assert _kashin.frame_shape(0, 2.0, 64)[0] == 0


def test_frame_is_tight_and_matches_numpy():
  nb, d, n = 3, 40, 64
  fr = _kashin.Frame(KEYS.shared, nb, d, n)
  fs = _np_frame(KEYS.shared, nb, d, n)
  y = np.asarray(_vec(nb * d, 1)).reshape(nb, d).astype(np.float64)
  c = np.asarray(fr.analysis(jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(c, np.stack([f @ yi for f, yi in zip(fs, y)]), atol=1e-5)
  back = np.asarray(fr.synthesis(jnp.asarray(c)))
  np.testing.assert_allclose(back, y, atol=1e-5)                       # F^T F = I_d
  for f in fs:
    np.testing.assert_allclose(f.T @ f, np.eye(d), atol=1e-12)
    assert np.linalg.matrix_rank(f) == d
  assert sorted(np.asarray(fr.perm).tolist()) == list(range(n))      # a permutation


# --------------------------------------------------------------------- reference


@pytest.mark.parametrize("nbits,redundancy,size,block", [(2, 2.0, 300, 128), (4, 1.5, 100, 2**16),
                                                         (1, 2.0, 77, 64)])
def test_nearest_encode_decode_matches_numpy(nbits, redundancy, size, block):
  kw = dict(redundancy=redundancy, iterations=4, clip_level=1.0, eta=0.6, block_size=block)
  c = C.kashin(nbits, stochastic=False, **kw)
  g = {"w": _vec(size, 7, 3.0)}
  p, d = _roundtrip(c, g)
  scales, idx, frames = _np_encode(np.asarray(g["w"], np.float64), KEYS.shared, bits_=nbits,
                                   **kw)
  got_idx = np.asarray(p["index"].data, np.float64)
  np.testing.assert_allclose(np.asarray(p["scale"].data), scales, rtol=1e-5)
  assert np.max(np.abs(got_idx - idx)) <= 1                   # float32 ties at most one level
  assert np.mean(got_idx == idx) >= 0.99
  # decode: float64 synthesis of the codec's own indices
  ref = _np_decode(np.asarray(p["scale"].data, np.float64), got_idx, frames, size, nbits)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  assert int(bits.count(p)) == len(frames) * (nbits * frames[0].shape[0] + 32)


def test_coefficients_match_numpy_and_represent_exactly():
  nb, d, n = 2, 100, 256
  fr = _kashin.Frame(KEYS.shared, nb, d, n)
  y = np.asarray(_vec(nb * d, 2)).reshape(nb, d)
  c = np.asarray(_kashin.kashin_coefficients(fr, jnp.asarray(y), 5, 0.8, 0.5))
  fs = _np_frame(KEYS.shared, nb, d, n)
  ref = np.stack([_np_kashin(f, yi.astype(np.float64), 5, 0.8, 0.5) for f, yi in zip(fs, y)])
  np.testing.assert_allclose(c, ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(fr.synthesis(jnp.asarray(c))), y, atol=1e-5)


# --------------------------------------------------------------------- Kashin's level


def _inputs(d, rng):
  """Random inputs of several shapes: Gaussian, heavy-tailed, sparse, one-hot, constant."""
  one_hot = np.zeros(d)
  one_hot[rng.integers(d)] = 1.0
  sparse = np.where(rng.random(d) < 0.05, rng.standard_normal(d), 0.0)
  sparse[0] = 1.0
  return [rng.standard_normal(d), rng.standard_normal(d)**3, rng.standard_cauchy(d),
          sparse, one_hot, np.ones(d)]


def _level(c, y):
  """`K = sqrt(N) ||c||_inf / ||y||_2`, Kashin's level of the coefficients `c` of `y`."""
  return np.abs(c).max(axis=-1) * math.sqrt(c.shape[-1]) / np.linalg.norm(y, axis=-1)


def test_kashin_level_is_bounded_over_random_inputs():
  """L&V: `||c||_inf <= K ||y||_2 / sqrt(N)` with `K` a constant of the frame's redundancy."""
  rng = np.random.default_rng(0)
  levels, plain = [], []
  for d, n in [(128, 256), (500, 1024), (1000, 2048)]:
    y = np.stack(_inputs(d, rng))
    for seed in range(3):
      key = jax.random.key(100 + seed)
      fr = _kashin.Frame(key, y.shape[0], d, n)
      c = np.asarray(_kashin.kashin_coefficients(fr, jnp.asarray(y, jnp.float32), 5, 1.0, 0.5))
      np.testing.assert_allclose(np.asarray(fr.synthesis(jnp.asarray(c))), y,
                                 atol=1e-5 * np.abs(y).max())
      levels.append(_level(c, y))
      # the redundancy-free rotation of the same vectors (`N = d` rounded to a power of two)
      rot = _kashin.Frame(key, y.shape[0], d, 1 << (d - 1).bit_length())
      plain.append(_level(np.asarray(rot.analysis(jnp.asarray(y, jnp.float32))), y))
  levels, plain = np.concatenate(levels), np.concatenate(plain)
  assert levels.max() <= 2.6, levels.max()      # measured ~2.1 at redundancy 2
  assert levels.mean() < 0.75 * plain.mean()    # smaller dynamic range than the rotation


def test_first_columns_frame_gains_nothing_at_redundancy_two():
  """Why the frame subsamples random columns: `H_2d[:, :d] = [H_d; H_d] / sqrt(2)` is the
  rotation repeated, whose (unique) representation Kashin's iteration just reproduces."""
  rng = np.random.default_rng(1)
  d = 128
  h2 = scipy.linalg.hadamard(2 * d) / math.sqrt(2 * d)
  h1 = scipy.linalg.hadamard(d) / math.sqrt(d)
  s = rng.choice([-1.0, 1.0], d)
  first = h2[:, :d] * s
  rand = h2[:, rng.permutation(2 * d)[:d]] * s
  ys = _inputs(d, rng)
  k_first = np.array([_level(_np_kashin(first, y, 5, 1.0, 0.5), y) for y in ys])
  k_rot = np.array([_level(h1 @ (s * y), y) for y in ys])
  k_rand = np.array([_level(_np_kashin(rand, y, 5, 1.0, 0.5), y) for y in ys])
  np.testing.assert_allclose(k_first, k_rot, rtol=1e-9)        # sqrt(2d)/sqrt(2) = sqrt(d)
  assert k_rand.mean() < 0.8 * k_first.mean()


# --------------------------------------------------------------------- codec


@pytest.mark.parametrize("nbits", [1, 3])
def test_stochastic_is_unbiased_over_keys(nbits):
  c = C.kashin(nbits, block_size=64)
  g = {"w": _vec(90, 5)}
  sender, receiver = c.init(g)
  privates = jax.random.split(jax.random.key(11), 3000)

  def one(private):
    k = Keys(KEYS.shared, private)
    p, _ = c.encode(g, sender, k)
    return c.decode(p, receiver, k, g)[0]["w"]

  dec = np.asarray(jax.jit(jax.vmap(one))(privates), np.float64)
  x = np.asarray(g["w"], np.float64)
  se = dec.std(axis=0) / math.sqrt(dec.shape[0])
  z = (dec.mean(axis=0) - x) / np.maximum(se, 1e-7)
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  assert np.mean(np.abs(z)) < 1.2                      # ~0.8 for a standard normal
  # and the nearest path is biased but deterministic: same decode for every private key
  n = C.kashin(nbits, block_size=64, stochastic=False)
  d1 = _roundtrip(n, g)[1]["w"]
  d2 = _roundtrip(n, g, Keys(KEYS.shared, jax.random.key(99)))[1]["w"]
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))


def test_error_falls_with_bits_and_zero_is_exact():
  g = {"w": _vec(500, 3)}
  errs = []
  for b in (1, 3, 8):
    d = _roundtrip(C.kashin(b, stochastic=False), g)[1]["w"]
    errs.append(float(jnp.linalg.norm(d - g["w"]) / jnp.linalg.norm(g["w"])))
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 0.02
  z = {"w": jnp.zeros((50,))}
  np.testing.assert_array_equal(np.asarray(_roundtrip(C.kashin(), z)[1]["w"]), 0.0)


def _bits(c, g):
  """Exact bits of `c`'s message for `g`, from the traced payload (no compile)."""
  p, _ = jax.eval_shape(c.encode, g, c.init(g)[0], KEYS)
  return int(bits.count(p))


def test_bits_flattened_and_per_tensor():
  g = {"a": _vec(100, 1), "b": jnp.ones((3, 3)), "e": jnp.zeros((0,))}
  assert _bits(C.kashin(3), g) == 3 * 256 + 32            # 109 -> N = 256, one block
  assert _bits(C.kashin(2, redundancy=1.5, per_tensor=True), g) == (
      (2 * 256 + 32) + (2 * 16 + 32))                     # 150 -> 256, 13.5 -> 16, empty: 0
  assert _bits(C.kashin(1, block_size=64), {"w": _vec(100)}) == 4 * (64 + 32)  # d = 32
  assert _bits(C.kashin(8, redundancy=1.25, block_size=1024), {"w": _vec(3000)}) == (
      4 * (8 * 1024 + 32))                                # d = 819 per block


def test_aggregate_sums_coefficients_in_the_shared_frame():
  c = C.kashin(2, block_size=64)
  gs = [{"w": _vec(150, s)} for s in range(3)]
  w = jnp.asarray([0.2, 0.5, 0.3])
  privates = [jax.random.key(20 + i) for i in range(3)]
  ps, ds = zip(*[_roundtrip(c, g, Keys(KEYS.shared, k)) for g, k in zip(gs, privates)])
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ps)
  keys = Keys(KEYS.shared, jnp.stack(privates))
  got = jax.jit(c.aggregate)(stacked, w, keys, gs[0])
  ref = sum(float(wi) * np.asarray(d["w"], np.float64) for wi, d in zip(w, ds))
  np.testing.assert_allclose(np.asarray(got["w"]), ref, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_naming_them():
  for make, name in [(lambda: C.kashin(0), "bits"), (lambda: C.kashin(9), "bits"),
                     (lambda: C.kashin(redundancy=0.5), "redundancy"),
                     (lambda: C.kashin(redundancy=float("nan")), "redundancy"),
                     (lambda: C.kashin(iterations=0), "iterations"),
                     (lambda: C.kashin(clip_level=0.0), "clip_level"),
                     (lambda: C.kashin(clip_level=float("inf")), "clip_level"),
                     (lambda: C.kashin(eta=1.5), "eta"),
                     (lambda: C.kashin(block_size=100), "block_size"),
                     (lambda: C.kashin(redundancy=4.0, block_size=2), "block_size"),
                     (lambda: C.kashin(stochastic=1), "stochastic"),
                     (lambda: C.kashin(per_tensor="yes"), "per_tensor")]:
    with pytest.raises(ValueError, match=name):
      make()
