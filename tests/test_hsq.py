"""HSQ: codebook, greedy projection identities, unbiased sampler, scalar grid, bits, EF
(spec ALGORITHMS_M22_HSQ_LAQ.md 2.10), checked against NumPy float64."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedjax_compress import Keys, bits, compressors as C, wire
from fedjax_compress.compressors import _hsq

KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _unit_rows(n, d, seed):
  u = np.random.default_rng(seed).normal(size=(n, d))
  return u / np.linalg.norm(u, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- codebook


def test_codebook_unit_deterministic_and_covering():
  c = _hsq.codebook(256, 16, seed=0)
  assert c.shape == (256, 16) and np.all(np.isfinite(c))
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)
  _hsq.codebook.cache_clear()
  np.testing.assert_array_equal(_hsq.codebook(256, 16, seed=0), c)  # regenerated, same
  assert not np.allclose(_hsq.codebook(256, 16, seed=1), c)
  # Coverage (spec A.2: official codebooks reach mean best |cos| 0.690 at dc=16, K=256) and
  # k-means must beat random unit vectors (only slightly at dc=16: 0.683 -> 0.689).
  u = _unit_rows(20000, 16, 3)
  cover = np.abs(u @ c.T).max(1).mean()
  random_cover = np.abs(u @ _unit_rows(256, 16, 4).T).max(1).mean()
  assert cover > 0.685 and cover > random_cover + 0.003


def test_codebook_square_is_orthogonal():
  c = _hsq.codebook(8, 8, seed=2).astype(np.float64)
  np.testing.assert_allclose(c @ c.T, np.eye(8), atol=1e-5)


# ----------------------------------------------------------------------------- greedy


class GreedyTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(dict(k=256, dc=16), dict(k=32, dc=8), dict(k=64, dc=5))
  def test_projection_identities(self, k, dc):
    c = C.hsq(raw_layer_size=0, codebook_size=k, chunk=dc, scalar_bits=32, error_feedback=False)
    g = {"w": jax.random.normal(jax.random.key(3), (41, 13))}  # 533: last chunk padded
    payload, _ = self.variant(c.encode)(g, c.init(g)[0], KEYS)
    out, _ = self.variant(c.decode)(payload, None, KEYS, g)
    cb = _hsq.codebook(k, dc).astype(np.float64)
    d = g["w"].size
    n = math.ceil(d / dc)
    x = np.zeros(n * dc)
    x[:d] = np.ravel(g["w"])
    x = x.reshape(n, dc)
    y = np.zeros(n * dc)
    y[:d] = np.ravel(out["w"])
    y = y.reshape(n, dc)
    p = np.abs(x @ cb.T)
    idx = np.asarray(payload[0]["index"].data).astype(int)
    np.testing.assert_array_less(p.max(1) - 1e-5, p[np.arange(n), idx] + 1e-12)  # argmax
    u = np.asarray(payload[0]["scalar"].data, np.float64)
    np.testing.assert_allclose(u, np.sum(x * cb[idx], axis=1), atol=1e-5)
    full = slice(0, n - 1)  # the padded chunk is cut on decode, compare whole chunks only
    np.testing.assert_allclose(y[full], u[full, None] * cb[idx[full]], rtol=1e-5, atol=1e-6)
    resid = x[full] - y[full]
    np.testing.assert_allclose(np.sum(resid * y[full], 1), 0.0, atol=1e-5)
    assert np.all(np.sum(y[full]**2, 1) <= np.sum(x[full]**2, 1) + 1e-5)
    np.testing.assert_allclose(np.sum(resid**2, 1), np.sum(x[full]**2, 1) - u[full]**2,
                               atol=1e-4)

  def test_exact_on_codeword_multiples(self):
    cb = _hsq.codebook(64, 8)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 64, size=30)
    scal = rng.normal(size=30)
    g = jnp.asarray((scal[:, None] * cb[rows]).reshape(-1), jnp.float32)
    c = C.hsq(raw_layer_size=0, codebook_size=64, chunk=8, scalar_bits=32, error_feedback=False)
    out, _ = c.decode(c.encode(g, None, KEYS)[0], None, KEYS, g)
    np.testing.assert_allclose(out, g, atol=1e-5)

  def test_orthonormal_codebook_picks_largest_rotated_coordinate(self):
    cb = _hsq.codebook(16, 16, seed=5).astype(np.float64)
    x = np.random.default_rng(1).normal(size=(20, 16))
    g = jnp.asarray(x.reshape(-1), jnp.float32)
    c = C.hsq(raw_layer_size=0, codebook_size=16, chunk=16, scalar_bits=32, seed=5, error_feedback=False)
    payload, _ = c.encode(g, None, KEYS)
    np.testing.assert_array_equal(payload[0]["index"].data, np.abs(x @ cb.T).argmax(1))


# ----------------------------------------------------------------------------- scalars, zeros


def test_scalar_grid_bounds_and_unbiasedness():
  c = C.hsq(raw_layer_size=0, codebook_size=32, chunk=4, scalar_bits=3, error_feedback=False)
  g = jax.random.normal(jax.random.key(7), (400,))
  exact = C.hsq(raw_layer_size=0, codebook_size=32, chunk=4, scalar_bits=32, error_feedback=False)
  u = np.asarray(exact.encode(g, None, KEYS)[0][0]["scalar"].data, np.float64)
  h = 3
  step = np.abs(u).max() / h

  @jax.jit
  def scalars(key):
    p, _ = c.encode(g, None, Keys(key, key))
    return p[0]["scalar"].data.astype(jnp.float32) * p[0]["scale"].data[0]

  s = np.asarray(jax.vmap(scalars)(jax.random.split(jax.random.key(9), 4000)), np.float64)
  np.testing.assert_allclose(s / step, np.round(s / step), atol=1e-4)  # on the grid
  assert np.all(np.abs(s) <= np.abs(u).max() * (1 + 1e-6))
  # Each draw lies on one of the two grid points around u; mean -> u within 5 sigma, where
  # sigma <= step / 2 / sqrt(N) (Bernoulli variance <= 1/4 step^2).
  assert np.all(np.abs(s - u) <= step * (1 + 1e-5))
  np.testing.assert_array_less(np.abs(s.mean(0) - u), 5 * 0.5 * step / math.sqrt(4000) + 1e-6)
  det = C.hsq(raw_layer_size=0, codebook_size=32, chunk=4, scalar_bits=3, stochastic=False, error_feedback=False)
  p, _ = det.encode(g, None, KEYS)
  sd = np.asarray(p[0]["scalar"].data) * float(p[0]["scale"].data[0])
  assert np.all(np.abs(sd - u) <= step / 2 + 1e-6)


@pytest.mark.parametrize("mode", _hsq.MODES)
def test_zero_chunks_decode_to_zero(mode):
  c = C.hsq(raw_layer_size=0, codebook_size=32, chunk=8, mode=mode, error_feedback=False)
  g = np.random.default_rng(0).normal(size=100).astype(np.float32)
  g[8:24] = 0.0  # chunks 1 and 2
  out, _ = c.decode(c.encode(jnp.asarray(g), None, KEYS)[0], None, KEYS, jnp.asarray(g))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out)[8:24], 0.0)
  z = jnp.zeros((37,))
  payload, _ = c.encode(z, None, KEYS)
  out, _ = c.decode(payload, None, KEYS, z)
  np.testing.assert_array_equal(out, 0.0)
  assert np.all(np.isfinite(payload[0]["scale"].data))


# ----------------------------------------------------------------------------- unbiased mode


def test_unbiased_sampler_mean_and_second_moment():
  k, dc = 32, 8
  cb = _hsq.codebook(k, dc).astype(np.float64)
  x = np.random.default_rng(2).normal(size=(3, dc))
  alpha = np.linalg.pinv(cb.T) @ x.T  # [K, 3]
  np.testing.assert_allclose(cb.T @ alpha, x.T, atol=1e-8)
  c = C.hsq(raw_layer_size=0, codebook_size=k, chunk=dc, scalar_bits=32, mode="unbiased", error_feedback=False)
  g = jnp.asarray(x.reshape(-1), jnp.float32)

  @jax.jit
  def sample(key):
    return c.decode(c.encode(g, None, Keys(key, key))[0], None, None, g)[0]

  n = 40000
  s = np.asarray(jax.vmap(sample)(jax.random.split(jax.random.key(4), n)), np.float64)
  s = s.reshape(n, 3, dc)
  sigma = s.std(0) / math.sqrt(n)
  assert np.all(np.abs(s.mean(0) - x) < 5 * sigma + 1e-6)
  l1 = np.abs(alpha).sum(0)
  np.testing.assert_allclose(np.sum(s**2, 2)[0], l1**2, rtol=1e-4)  # ||x^|| = ||alpha||_1 always


# ----------------------------------------------------------------------------- bits, EF, aggregate


@pytest.mark.parametrize("d,k,dc,nb", [(1000, 256, 16, 6), (533, 64, 5, 4), (16, 256, 16, 6),
                                       (77, 512, 8, 10), (50, 32, 8, 32)])
@pytest.mark.parametrize("raw", [0, 200])
def test_bits_formula_and_packed_length(d, k, dc, nb, raw):
  c = C.hsq(raw_layer_size=raw, codebook_size=k, chunk=dc, scalar_bits=nb)
  sizes = (d - d // 3, d // 3)
  g = {"a": jax.random.normal(jax.random.key(d), (sizes[0],)),
       "b": jax.random.normal(jax.random.key(1), (sizes[1],))}
  payload, _ = c.encode(g, None, KEYS)
  per_layer = lambda n: (32 * n if n <= raw else
                         math.ceil(n / dc) * (math.ceil(math.log2(k)) + nb) + (nb != 32) * 32)
  expected = sum(per_layer(n) for n in sizes)
  assert expected == _hsq.bits_per_message(sizes, codebook_size=k, chunk=dc, scalar_bits=nb,
                                           raw_layer_size=raw)
  assert int(bits.count(payload)) == wire.total_bits(payload) == expected
  assert len(wire.pack(payload, raw=True)) == -(-expected // 8)  # the billed body
  back = wire.unpack(wire.pack(payload), payload)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(payload)):
    np.testing.assert_array_equal(x, y)


def test_per_layer_scale_two_layers_100x_apart():
  """Issue 12.4: one grid for the model decoded the small layer worse than zeros (1.5-1.7)."""
  g = {"big": jax.random.normal(jax.random.key(11), (20000,)),
       "small": 0.01 * jax.random.normal(jax.random.key(12), (20000,))}
  exact = C.hsq(scalar_bits=32)       # projection error only: sqrt(1 - E cos^2) ~ 0.72
  c = C.hsq()
  for codec in (exact, c):
    out, _ = codec.decode(codec.encode(g, None, KEYS)[0], None, KEYS, g)
    rel = {n: float(np.linalg.norm(out[n] - g[n]) / np.linalg.norm(g[n])) for n in g}
    assert 0.6 < rel["small"] < 0.8 and 0.6 < rel["big"] < 0.8, rel
  # Each layer's grid is its own: scale_l = max|u| / h over that layer's chunks.
  payload, _ = c.encode(g, None, KEYS)
  u = [np.asarray(exact.encode(g, None, KEYS)[0][i]["scalar"].data, np.float64) for i in (0, 1)]
  for i in (0, 1):
    np.testing.assert_allclose(float(payload[i]["scale"].data[0]), np.abs(u[i]).max() / 31,
                               rtol=1e-5)


def test_small_layers_raw_and_empty_layers_free():
  g = {"w": jax.random.normal(jax.random.key(3), (40, 30)), "b": jnp.arange(1000.0) / 7,
       "e": jnp.zeros((0, 3))}
  c = C.hsq()
  payload, _ = c.encode(g, c.init(g)[0], KEYS)
  assert int(bits.count(payload)) == 75 * 14 + 32 + 32 * 1000  # "b" (1000 <= 1000) is raw
  out, _ = c.decode(payload, None, KEYS, g)
  np.testing.assert_array_equal(out["b"], g["b"])
  assert out["e"].shape == (0, 3)
  assert not np.allclose(out["w"], g["w"])
  assert c.init(g)[0] == C.hsq(error_feedback=False).init(g)[0]  # EF off by default


def test_huge_inputs_decode_finite():
  for mode in _hsq.MODES:
    c = C.hsq(raw_layer_size=0, codebook_size=32, chunk=8, mode=mode)
    for peak in (1e19, 3e38):
      g = jax.random.normal(jax.random.key(4), (64, 8))
      g = g / jnp.max(jnp.abs(g)) * peak
      out, _ = jax.jit(lambda g: c.decode(c.encode(g, None, KEYS)[0], None, KEYS, g))(g)
      assert np.all(np.isfinite(out)), (mode, peak)
      cos = np.sum(np.asarray(out, np.float64) * np.asarray(g, np.float64)) / (
          np.linalg.norm(np.asarray(out, np.float64)) * np.linalg.norm(np.asarray(g, np.float64)))
      assert cos > 0.3, (mode, peak, cos)


def test_default_rate_is_0875_bits_per_coordinate():
  d = 16 * 4096
  assert _hsq.bits_per_message(d) / d == pytest.approx(0.875, abs=1e-3)


def test_error_feedback_telescopes():
  c = C.hsq(raw_layer_size=0, codebook_size=64, chunk=8, scalar_bits=4, error_feedback=True)
  like = {"w": jnp.zeros((10, 9)), "b": jnp.zeros((5,))}
  state = c.init(like)[0]
  total_g = jax.tree.map(lambda x: np.zeros(x.shape), like)
  total_d = jax.tree.map(lambda x: np.zeros(x.shape), like)
  enc = jax.jit(c.encode)
  for t in range(6):
    g = jax.tree.map(lambda x, i=t: jax.random.normal(jax.random.key(10 + i), x.shape), like)
    keys = Keys(jax.random.key(100 + t), jax.random.key(200 + t))
    payload, state = enc(g, state, keys)
    out, _ = c.decode(payload, None, keys, like)
    total_g = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), total_g, g)
    total_d = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), total_d, out)
  for name in like:
    np.testing.assert_allclose(total_d[name] + np.asarray(state.residual[name]), total_g[name],
                               atol=1e-4)


def test_aggregate_is_weighted_sum_of_decodes():
  c = C.hsq(raw_layer_size=0, codebook_size=32, chunk=4, error_feedback=False)
  gs = [jax.random.normal(jax.random.key(s), (90,)) for s in range(3)]
  keys = [Keys(jax.random.key(0), jax.random.key(5 + s)) for s in range(3)]
  ps = [c.encode(g, None, kk)[0] for g, kk in zip(gs, keys)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
  w = jnp.array([0.5, 0.25, 0.25])
  agg = c.aggregate(stacked, w, Keys(keys[0].shared, jnp.stack([k.private for k in keys])), gs[0])
  ref = sum(float(wi) * np.asarray(c.decode(p, None, None, gs[0])[0]) for wi, p in zip(w, ps))
  np.testing.assert_allclose(agg, ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  for kw in [dict(codebook_size=1), dict(chunk=0), dict(scalar_bits=1), dict(scalar_bits=20),
             dict(mode="sampled"), dict(mode="unbiased", codebook_size=8, chunk=16),
             dict(codebook_size=2**17), dict(search_block=0), dict(raw_layer_size=-1),
             dict(raw_layer_size=1.5), dict(error_feedback=None)]:
    with pytest.raises(ValueError):
      C.hsq(**kw)
  with pytest.raises(ValueError):
    C.hsq(raw_layer_size=0, error_feedback=False).encode(jnp.array([1.0, jnp.inf]), None, KEYS)


@pytest.mark.parametrize("mode", _hsq.MODES)
def test_blocked_search_equals_single_matmul(mode):
  g = jax.random.normal(jax.random.key(8), (1003,))  # 126 chunks: 3 blocks of 50, padded
  one = C.hsq(raw_layer_size=0, codebook_size=32, chunk=8, mode=mode, error_feedback=False)
  blocked = C.hsq(raw_layer_size=0, codebook_size=32, chunk=8, mode=mode, error_feedback=False, search_block=50)
  p1, _ = one.encode(g, None, KEYS)
  p2, _ = blocked.encode(g, None, KEYS)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    if jnp.issubdtype(x.dtype, jnp.integer):  # indices and levels: identical
      np.testing.assert_array_equal(x, y)
    else:                                     # the scale: ulps (reduction order)
      np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.parametrize("k,dc", [(64, 8), (256, 16), (32, 5)])
def test_greedy_search_matches_float64_reference(k, dc):
  """Blocked float32 search vs a float64 argmax of |<c, x>|: indices equal wherever the top
  two |scores| are more than the stated tolerance (plus float32 score error) apart; the
  chosen |score| is within that tolerance of the max everywhere; u = <c_k, x>."""
  cb = _hsq.codebook(k, dc)
  x = np.random.default_rng(k + dc).normal(size=(20000, dc)).astype(np.float32)
  x[::97] *= 1e-20                                   # tiny rows: scores far below 1
  c = C.hsq(raw_layer_size=0, codebook_size=k, chunk=dc, scalar_bits=32)
  payload, _ = c.encode(jnp.asarray(x.reshape(-1)), None, KEYS)
  idx = np.asarray(payload[0]["index"].data).astype(int)
  u = np.asarray(payload[0]["scalar"].data, np.float64)
  p = x.astype(np.float64) @ cb.astype(np.float64).T
  a = np.abs(p)
  ref = a.argmax(1)
  tol = _hsq.search_tolerance(k) + 2e-6               # key truncation + float32 scores
  assert _hsq.search_tolerance(k) == 2.0**(math.ceil(math.log2(k)) - 23)
  top2 = -np.sort(-a, axis=1)[:, :2]
  clear = top2[:, 0] - top2[:, 1] > tol * top2[:, 0]
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(idx[clear], ref[clear])
  rows = np.arange(len(x))
  np.testing.assert_array_less(a.max(1) * (1 - tol), a[rows, idx] * (1 + 1e-12) + 1e-45)
  np.testing.assert_allclose(u, p[rows, idx], rtol=1e-5, atol=0)


def test_greedy_search_near_ties_within_key_tolerance():
  """Scores crafted to differ by less / more than the key's resolution 2^(b-23): the search
  may take either codeword in the first case, must take the larger in the second; u is the
  chosen codeword's own score, with its sign."""
  k = 64
  tol = _hsq.search_tolerance(k)
  cb = jnp.eye(k, dtype=jnp.float32)[:, :k]          # scores = coordinates
  x = np.zeros((4, k), np.float32)
  x[0, [3, 9]] = [1.0, -(1.0 + 0.25 * tol)]          # within tolerance: 3 or 9
  x[1, [3, 9]] = [1.0, -(1.0 + 4.0 * tol)]           # beyond it: 9 (the negative one)
  x[2, [5, 7]] = [-2.0, 2.0]                          # exact tie: lowest index, its sign
  x[3, 10] = 1e-39                                    # below 2^-126: still valid, u exact
  idx, u = _hsq._search_greedy(jnp.asarray(x), cb)
  idx, u = np.asarray(idx), np.asarray(u)
  assert idx[0] in (3, 9) and u[0] == x[0, idx[0]]
  assert idx[1] == 9 and u[1] == x[1, 9]
  assert idx[2] == 5 and u[2] == -2.0
  assert 0 <= idx[3] < k and u[3] == x[3, idx[3]]


def test_greedy_search_exact_ties_and_nan():
  """Exact |p| ties of either sign: the lowest index; zero rows -> 0; NaN -> K-1."""
  cb = jnp.eye(4, dtype=jnp.float32)
  x = jnp.array([[1, -1, 0, 0], [-1, 1, 0, 0], [-2, 0, 2, 2], [-2, -2, 0, 0], [0, 0, 0, 0],
                 [0, -3, 0, -3], [np.nan, 0, 0, 0]], jnp.float32)
  for block in (None, 2):   # one block and blocked (lax.map) code paths
    k, u = _hsq._search_greedy(x, cb, block)
    np.testing.assert_array_equal(k, [0, 0, 0, 0, 0, 1, 3])
    np.testing.assert_array_equal(u[:6], [1, -1, -2, -2, 0, -3])
    assert np.isnan(u[6])


def test_stochastic_round_is_unbiased_to_2e24():
  """Stochastic rounding on 24-bit hashed uniforms: levels are floor(v) or floor(v)+1,
  integers stay put, and the mean over 4000 keys matches E[level] = floor(v) +
  ceil(2^24 frac)/2^24 (within 2^-24 of v) to 5 sigma; neighbouring entries uncoupled."""
  v = np.array([-2.5, -0.75, 0.0, 0.3, 1.0, 3.999, 7.125, -6.001, 0.5], np.float32)
  draws = np.asarray(jax.vmap(lambda key: _hsq._stochastic_round(key, jnp.asarray(v)))(
      jax.random.split(jax.random.key(4), 4000)), np.float64)
  low = np.floor(v.astype(np.float64))
  assert np.all((draws == low) | (draws == low + 1))
  np.testing.assert_array_equal(draws[:, [2, 4]], np.broadcast_to(v[[2, 4]], (4000, 2)))
  frac = v.astype(np.float64) - low
  expect = low + np.ceil(frac * 2.0**24) / 2.0**24
  assert np.all(np.abs(expect - v) <= 2.0**-24)
  sigma = np.sqrt(frac * (1 - frac) / 4000)
  np.testing.assert_array_less(np.abs(draws.mean(0) - expect), 5 * sigma + 1e-12)
  up = draws - low
  for i, j in ((0, 1), (3, 8), (7, 8)):
    assert abs(np.corrcoef(up[:, i], up[:, j])[0, 1]) < 5 / np.sqrt(4000)


def test_default_search_block_bounds_scores_to_4mib():
  for k in (2, 32, 64, 256, 4096, 65536):
    b = _hsq.default_search_block(k)
    assert b >= 256 and (4 * k * b <= 4 * 2**20 or b == 256)
  assert _hsq.default_search_block(64) == 16384 and _hsq.default_search_block(256) == 4096
