"""Native CPU HSQ kernels (ops/_hsq_native.py): greedy search and decode against NumPy float64,
ties, non-finite rows, tail chunks, batch rows / vmap, extreme scales, grads, and the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, compressors as C
from fedjax_compress.compressors import _hsq
from fedjax_compress.ops import _hsq_native as H

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not H.available(),
    reason="native HSQ kernels need the CPU backend and a C++ compiler")

KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _chunks(vec, t, dc):
  """float64 chunks of `vec[..., numel] * 2^-t`, the tail zero-padded: `[..., n, dc]`."""
  vec = np.asarray(vec, np.float64) * np.exp2(-np.asarray(t, np.float64))[..., None]
  n = -(-vec.shape[-1] // dc)
  pad = np.zeros(vec.shape[:-1] + (n * dc,))
  pad[..., :vec.shape[-1]] = vec
  return pad.reshape(vec.shape[:-1] + (n, dc))


def _check_search(vec, t, cb, k, u):
  """k within search_tolerance of the float64 max |score|, u = float64 <c_k, x> to rounding."""
  x = _chunks(vec, t, cb.shape[1])
  p = x @ cb.astype(np.float64).T                                   # [..., n, K]
  k, u = np.asarray(k), np.asarray(u, np.float64)
  assert k.shape == p.shape[:-1] and k.dtype == np.int32 and np.all((k >= 0) & (k < cb.shape[0]))
  chosen = np.take_along_axis(p, k[..., None], -1)[..., 0]
  best = np.abs(p).max(-1)
  tol = _hsq.search_tolerance(cb.shape[0])
  assert np.all(np.abs(chosen) >= best * (1 - tol) - 1e-30)
  bound = np.abs(x * cb.astype(np.float64)[k]).sum(-1) * cb.shape[1] * 2.0**-23
  assert np.all(np.abs(u - chosen) <= bound + 1e-38)


@pytest.mark.parametrize("size,dc,numel", [(64, 8, 1003), (256, 16, 600), (32, 5, 333),
                                           (6, 70, 300)])
def test_search_matches_float64(size, dc, numel):
  # dc = 8 / 16 / 5 / 70: the fixed-width, generic and scalar kernels; rows with own scales.
  cb = _hsq.codebook(size, dc) if dc <= 16 else np.linalg.qr(
      np.random.default_rng(1).normal(size=(dc, size)))[0].T.astype(np.float32)
  vec = np.random.default_rng(0).normal(size=(3, numel)).astype(np.float32)
  vec *= np.float32([[1.0], [1e-3], [300.0]])
  t = np.int32([1, -9, 9])
  k, u = jax.jit(lambda v, t: H.greedy_search(v, t, cb))(vec, t)
  _check_search(vec, t, cb, k, u)


def test_ties_zero_and_nonfinite_rows():
  e = np.eye(4, dtype=np.float32)
  cb = np.stack([e[0], -e[0], e[1], e[0], e[2]])                  # K=5, dc=4, rows 0, 1, 3 tie
  chunks = np.stack([e[0], -e[1], np.zeros(4), [np.nan, 0, 0, 0], [0, np.inf, 0, 0],
                     [0.5, 0.5, 0.5, 0.25]]).astype(np.float32)
  k, u = H.greedy_search(chunks.reshape(-1), 0, cb)
  np.testing.assert_array_equal(np.asarray(k), [0, 2, 0, 4, 4, 0])   # ties: lowest index
  u = np.asarray(u)
  np.testing.assert_array_equal(u[[0, 1, 2, 5]], [1.0, -1.0, 0.0, 0.5])
  assert np.isnan(u[3]) and np.isnan(u[4])                # u = <c_{K-1}, x>: nan, 0 * inf


def test_extreme_scales_are_exact_and_finite():
  # 2^-t is applied exactly where it is not a normal float (t = 127: 2^-127; t = -130:
  # 2^130): two factors. Scores stay finite for a layer maximum near float32's max.
  cb = _hsq.codebook(64, 8)
  rng = np.random.default_rng(2)
  huge = (rng.uniform(-1, 1, 200) * 3.0e38).astype(np.float32)
  small = (rng.uniform(-1, 1, 200) * 2.0**-120).astype(np.float32)
  small[np.abs(small) < 2.0**-126] = 2.0**-126                     # normal entries only
  for vec, t in ((huge, 127), (small, -121), (small, -130)):
    k, u = H.greedy_search(vec, t, cb)
    assert np.all(np.isfinite(np.asarray(u)))
    _check_search(vec, t, cb, k, u)
  assert int(_hsq._pow2_exponent(jnp.float32(3.0e38))) == 127
  m1, m2 = H.multipliers(jnp.int32([127, -149, 3]))
  np.testing.assert_array_equal(np.float64(m1) * np.float64(m2), [2.0**-127, 2.0**149, 0.125])


def test_codec_extreme_leaves_finite():
  # XLA:CPU flushes subnormals to zero, so a subnormal leaf encodes as zero on both paths.
  c = C.hsq(codebook_size=64, chunk=8, raw_layer_size=0)
  rng = np.random.default_rng(3)
  g = {"huge": jnp.asarray((rng.uniform(-1, 1, 300) * 3.0e38).astype(np.float32)),
       "tiny": jnp.asarray((rng.integers(-40, 40, 300) * 2.0**-149).astype(np.float32))}
  payload, _ = c.encode(g, c.init(g)[0], KEYS)
  out = c.decode(payload, None, KEYS, g)[0]
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  rel = np.linalg.norm(np.float64(out["huge"]) - np.float64(g["huge"])) / np.linalg.norm(
      np.float64(g["huge"]))
  assert rel < 0.9


def test_vmap_rows_and_xla_search_agree():
  cb = _hsq.codebook(64, 8)
  vec = jax.random.normal(jax.random.key(4), (3, 1003), jnp.float32)
  t = jnp.int32([2, 2, 2])
  k, u = H.greedy_search(vec, t, cb)
  kv, uv = jax.vmap(lambda v, s: H.greedy_search(v, s, cb))(vec, t)
  np.testing.assert_array_equal(np.asarray(kv), np.asarray(k))
  np.testing.assert_array_equal(np.asarray(uv), np.asarray(u))
  # The XLA key search: the same codeword, except where the two top scores are within its
  # tolerance.
  n = k.shape[-1]
  x = jnp.pad(vec[0] / 4.0, (0, n * 8 - 1003)).reshape(n, 8)
  kx, _ = _hsq._search_greedy(x, jnp.asarray(cb))
  p = np.abs(np.asarray(x, np.float64) @ cb.astype(np.float64).T)
  diff = np.asarray(kx) != np.asarray(k[0])
  assert diff.mean() < 0.01
  rows = np.flatnonzero(diff)
  gap = np.abs(p[rows, np.asarray(kx)[rows]] - p[rows, np.asarray(k[0])[rows]])
  assert np.all(gap <= 2 * _hsq.search_tolerance(64) * p[rows].max(1))


def test_decode_matches_numpy_and_saturates():
  cb = _hsq.codebook(32, 5)
  rng = np.random.default_rng(5)
  numel, n = 333, 67
  index = rng.integers(0, 32, (2, n)).astype(np.uint8)
  index[0, 0] = 200                                                # out of range: clamped to 31
  level = rng.integers(-31, 32, (2, n)).astype(np.int8)
  scale = np.float32([0.01, 3.0e37])                              # row 1 saturates
  y = jax.jit(lambda i, l, s: H.decode(i, l, s, cb, numel))(index, level, scale)
  with np.errstate(over="ignore"):
    ref = (level[..., None].astype(np.float32) * cb[np.minimum(index, 31)]) * scale[:, None, None]
  ref = np.clip(ref, -3.4028235e38, 3.4028235e38).reshape(2, -1)[:, :numel]
  np.testing.assert_array_equal(np.asarray(y), ref)
  yv = jax.vmap(lambda i, l, s: H.decode(i, l, s, cb, numel))(index, level, scale)
  np.testing.assert_array_equal(np.asarray(yv), ref)
  y_inf = H.decode(index[0], level[0], np.float32(np.inf), cb, numel)   # not saturated
  assert np.all(np.isinf(np.asarray(y_inf))[np.asarray(level[0]).repeat(5)[:numel] != 0])


def test_grads_of_search_and_decode():
  cb = _hsq.codebook(64, 8)
  vec = jax.random.normal(jax.random.key(6), (100,), jnp.float32)
  w = jax.random.normal(jax.random.key(7), (13,), jnp.float32)
  k, _ = H.greedy_search(vec, 1, cb)
  g = jax.grad(lambda v: jnp.sum(H.greedy_search(v, 1, cb)[1] * w))(vec)
  ref = (np.asarray(w)[:, None] * cb[np.asarray(k)] / 2.0).reshape(-1)[:100]
  np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6)
  level = jnp.asarray(np.random.default_rng(8).normal(size=13), jnp.float32)
  gl, gs = jax.grad(lambda l, s: jnp.sum(H.decode(k, l, s, cb, 100)), argnums=(0, 1))(level, 2.0)
  c = np.zeros((13, 8))
  c.reshape(-1)[:100] = cb[np.asarray(k)].reshape(-1)[:100]
  np.testing.assert_allclose(np.asarray(gl), 2.0 * c.sum(1), rtol=1e-5)
  np.testing.assert_allclose(float(gs), np.sum(np.asarray(level) * c.sum(1)), rtol=1e-5)


def test_codec_native_vs_xla_and_grad(monkeypatch):
  c = C.hsq(codebook_size=64, chunk=8, raw_layer_size=0, error_feedback=True)
  g = {"w": jax.random.normal(jax.random.key(9), (37, 29), jnp.float32), "b": jnp.ones((3,))}
  state = c.init(g)[0]

  def roundtrip(g):
    payload, _ = c.encode(g, state, KEYS)
    return payload, c.decode(payload, None, KEYS, g)[0]

  pn, yn = roundtrip(g)
  grad = jax.grad(lambda g: sum(jnp.sum(v) for v in jax.tree.leaves(roundtrip(g)[1])))(g)
  assert all(bool(jnp.all(jnp.isfinite(v))) and v.shape == g[n].shape
             for n, v in grad.items())
  monkeypatch.setattr(_hsq, "_use_native_search", lambda: False)
  px, yx = roundtrip(g)                                      # a fresh trace: the XLA path
  for mn, mx in zip(pn, px):
    kn, kx = np.asarray(mn["index"].data), np.asarray(mx["index"].data)
    assert (kn != kx).mean() < 0.02
    same = kn == kx
    # Same codeword: u equal to float32 rounding, so the same level but for rare roundings
    # that land on the other side of the stochastic threshold.
    dl = np.abs(np.asarray(mn["scalar"].data, np.int32) - np.asarray(mx["scalar"].data, np.int32))
    assert np.all(dl[same] <= 1) and (dl[same] != 0).mean() < 0.01
  for a, b in zip(jax.tree.leaves(yn), jax.tree.leaves(yx)):
    assert a.shape == b.shape and a.dtype == b.dtype
