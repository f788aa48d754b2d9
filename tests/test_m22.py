"""M22: closed forms vs quadrature, weighted Lloyd-Max vs a float64 SciPy reference, fitting,
codec invariants and bits (spec ALGORITHMS_M22_HSQ_LAQ.md 1.10 and Appendix A.1)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy import integrate, optimize, special, stats

from fedjax_compress import Keys, bits, compressors as C, wire
from fedjax_compress.compressors import _m22

KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _pdf(family, shape, scale):
  if family == "gennorm":
    return lambda z: stats.gennorm.pdf(z, shape, scale=scale)
  return lambda z: stats.dweibull.pdf(z, shape, scale=scale)


def _quad(fn, u, v):
  """int_u^v fn, split at 0 and at +-scale-ish points for accuracy with heavy tails."""
  pts = sorted({u, v, *[p for p in (-1.0, 0.0, 1.0) if u < p < v]})
  return sum(integrate.quad(fn, a, b, limit=200, epsabs=1e-13, epsrel=1e-11)[0]
             for a, b in zip(pts[:-1], pts[1:]))


def _ref_step(levels, family, shape, scale, m, symmetric):
  """One weighted Lloyd step in float64 with SciPy quadrature (independent of the closed forms)."""
  f = _pdf(family, shape, scale)
  mids = 0.5 * (levels[1:] + levels[:-1])
  lo = np.concatenate([[0.0 if symmetric else -np.inf], mids])
  hi = np.concatenate([mids, [np.inf]])
  new = []
  for c, u, v in zip(levels, lo, hi):
    den = _quad(lambda z: abs(z)**m * f(z), u, v)
    num = _quad(lambda z: abs(z)**m * z * f(z), u, v)
    new.append(num / den if den > 1e-300 else c)
  return np.array(new)


def _ref_distortion(levels, family, shape, scale, m, symmetric):
  f = _pdf(family, shape, scale)
  mids = 0.5 * (levels[1:] + levels[:-1])
  lo = np.concatenate([[0.0 if symmetric else -np.inf], mids])
  hi = np.concatenate([mids, [np.inf]])
  d = sum(_quad(lambda z, c=c: abs(z)**m * (z - c)**2 * f(z), u, v)
          for c, u, v in zip(levels, lo, hi))
  return 2 * d if symmetric else d


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("family,shape", [("gennorm", 0.8), ("gennorm", 2.0), ("weibull", 1.3),
                                          ("weibull", 0.7)])
@pytest.mark.parametrize("m", [0.0, 1.0, 2.0, 3.0])
def test_cell_moments_match_quadrature(family, shape, m):
  scale = 0.9
  f = _pdf(family, shape, scale)
  cells = [(-np.inf, -1.7), (-2.0, -0.3), (-0.5, 1.2), (0.0, 0.4), (0.4, 2.5), (1.1, np.inf),
           (-np.inf, np.inf)]
  u = jnp.array([c[0] for c in cells], jnp.float32)
  v = jnp.array([c[1] for c in cells], jnp.float32)
  den, num, sq = _m22._cell_moments(family, jnp.float32(shape), jnp.float32(scale), m, u, v)
  for i, (a, b) in enumerate(cells):
    ref = [_quad(lambda z, k=k: abs(z)**(m + k) * (np.sign(z) if k == 1 else 1) * f(z), a, b)
           for k in (0, 1, 2)]
    np.testing.assert_allclose([den[i], num[i], sq[i]], ref, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------- Lloyd-Max


@pytest.mark.parametrize("family,shape,scale,r,m,expected", [
    ("gennorm", 2.0, math.sqrt(2.0), 1, 0.0, [0.7979]),             # Gaussian, Lloyd-Max
    ("gennorm", 2.0, math.sqrt(2.0), 2, 0.0, [0.4528, 1.5104]),
    ("gennorm", 1.0, 1.0, 1, 0.0, [1.0]),                          # Laplace(1)
    ("gennorm", 1.0, 1.0, 1, 2.0, [3.0]),                          # E|z|^3 / E|z|^2
    ("weibull", 1.0, 1.0, 1, 2.0, [3.0]),                          # double Weibull c=1 = Laplace
    ("gennorm", 0.8, 1.0, 2, 0.0, [0.88, 4.44]),                   # spec 1.3 table
    ("gennorm", 0.8, 1.0, 2, 1.0, [2.17, 7.18]),
    ("gennorm", 0.8, 1.0, 2, 2.0, [3.73, 10.05]),
    ("gennorm", 0.8, 1.0, 2, 4.0, [7.39, 16.12]),
])
def test_known_designs(family, shape, scale, r, m, expected):
  levels, thresholds = _m22.lloyd_max(family, shape, scale, r, m, iters=300)
  levels = np.asarray(levels)
  digits = 4 if len(str(expected[0]).split(".")[1]) == 4 else 2
  np.testing.assert_allclose(levels[len(levels) // 2:], expected, atol=1.5 * 10**-digits)
  if (family, shape, r, m) == ("gennorm", 2.0, 2, 0.0):
    mse = _m22.weighted_distortion(levels[2:], family, shape, scale, m)
    np.testing.assert_allclose(mse, 0.1175, atol=1e-4)


@pytest.mark.parametrize("family,shape,r,m,symmetric", [
    ("gennorm", 0.8, 2, 0.0, True), ("gennorm", 1.5, 3, 2.0, True), ("weibull", 1.3, 2, 1.0, True),
    ("weibull", 0.7, 3, 0.0, True), ("gennorm", 0.8, 2, 0.0, False), ("weibull", 1.3, 2, 2.0, False),
])
def test_lloyd_matches_float64_reference_and_distortion_decreases(family, shape, r, m, symmetric):
  scale = 1.1
  c = _m22.initial_levels(family, shape, scale, r, symmetric)
  ref = np.asarray(c, np.float64)
  prev = _ref_distortion(ref, family, shape, scale, m, symmetric)
  for _ in range(8):
    c = _m22.lloyd_step(c, family, shape, scale, m, symmetric)
    ref = _ref_step(ref, family, shape, scale, m, symmetric)
    np.testing.assert_allclose(c, ref, rtol=1e-4)
    d = _ref_distortion(ref, family, shape, scale, m, symmetric)
    assert d <= prev * (1 + 1e-9)
    np.testing.assert_allclose(
        _m22.weighted_distortion(c, family, shape, scale, m, symmetric), d, rtol=1e-4)
    prev = d


@pytest.mark.parametrize("family", _m22.FAMILIES)
@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_levels_monotone_symmetric_midpoints(family, r):
  shapes = jnp.array([0.5, 1.0, 1.7, 2.6])
  scales = jnp.array([0.3, 1.0, 2.0, 0.8])
  levels, thresholds = _m22.lloyd_max(family, shapes, scales, r, 1.0, iters=50)
  levels, thresholds = np.asarray(levels), np.asarray(thresholds)
  assert levels.shape == (4, 2**r) and thresholds.shape == (4, 2**r - 1)
  assert np.all(np.diff(levels, axis=1) > 0)
  np.testing.assert_allclose(levels, -levels[:, ::-1], atol=1e-6)
  np.testing.assert_allclose(thresholds, 0.5 * (levels[:, 1:] + levels[:, :-1]), atol=1e-6)
  np.testing.assert_allclose(thresholds[:, 2**(r - 1) - 1], 0.0, atol=1e-6)


@pytest.mark.parametrize("family,shape", [("gennorm", 0.8), ("gennorm", 2.0), ("weibull", 1.3)])
def test_levels_move_outward_with_m(family, shape):
  pos = [np.asarray(_m22.lloyd_max(family, shape, 1.0, 3, m, iters=200)[0])[4:]
         for m in (0.0, 1.0, 2.0, 4.0)]
  assert all(np.all(b > a) for a, b in zip(pos[:-1], pos[1:]))


# ----------------------------------------------------------------------------- fitting


def _profile_mle(z, family):
  """Float64 profile MLE of the shape with loc = 0 (bounded scalar search)."""
  def nll(lp):
    p = np.exp(lp)
    s = np.mean(np.abs(z)**p)
    if family == "gennorm":
      return -(np.log(p) - np.log(p * s) / p - special.gammaln(1 / p) - 1 / p)
    return -(np.log(p) - np.log(s) + (p - 1) * np.mean(np.log(np.abs(z))))
  r = optimize.minimize_scalar(nll, bounds=np.log(_m22.SHAPE_BOUNDS), method="bounded",
                               options={"xatol": 1e-10})
  return np.exp(r.x)


@pytest.mark.parametrize("family,shape", [("gennorm", 0.7), ("gennorm", 1.5), ("weibull", 0.8),
                                          ("weibull", 1.3)])
def test_mle_fit_recovers_shape(family, shape):
  dist = stats.gennorm if family == "gennorm" else stats.dweibull
  x = dist.rvs(shape, loc=0.3, scale=2.5, size=20000, random_state=7)
  mu, sd, p, a = _m22.fit(x, family)
  z = (x - x.mean()) / x.std()
  # Same estimator in float64: agreement is a numerical check (bisection on the score).
  np.testing.assert_allclose(p, _profile_mle(z, family), rtol=1e-3)
  ref_a = (np.mean(np.abs(z)**float(p)) * (float(p) if family == "gennorm" else 1.0))**(1 / float(p))
  np.testing.assert_allclose(a, ref_a, rtol=1e-3)
  np.testing.assert_allclose([mu, sd], [x.mean(), x.std()], rtol=1e-4, atol=1e-4)
  # Statistical check: the shape MLE's sd at n = 20k is ~0.007 (beta = 0.7, 20 replicates in
  # float64) and grows roughly linearly with the shape; 6% relative is > 5 sd for all cases.
  np.testing.assert_allclose(p, shape, rtol=0.06)


@pytest.mark.parametrize("family,shape", [("gennorm", 1.5), ("weibull", 1.3)])
def test_moment_fit_matches_kurtosis_equation(family, shape):
  dist = stats.gennorm if family == "gennorm" else stats.dweibull
  x = dist.rvs(shape, size=50000, random_state=3)
  _, _, p, a = _m22.fit(x, family, method="moments")
  z = (x - x.mean()) / x.std()
  k = np.mean(z**4)
  if family == "gennorm":
    eq = lambda b: special.gamma(5 / b) * special.gamma(1 / b) / special.gamma(3 / b)**2 - k
    ref_a = lambda b: np.sqrt(special.gamma(1 / b) / special.gamma(3 / b))
  else:
    eq = lambda c: special.gamma(1 + 4 / c) / special.gamma(1 + 2 / c)**2 - k
    ref_a = lambda c: 1 / np.sqrt(special.gamma(1 + 2 / c))
  ref = optimize.brentq(eq, *_m22.SHAPE_BOUNDS)
  np.testing.assert_allclose(p, ref, rtol=1e-3)
  np.testing.assert_allclose(a, ref_a(ref), rtol=1e-3)
  np.testing.assert_allclose(p, shape, rtol=0.1)  # kurtosis-based: looser statistical check


def test_fit_clamps_to_bracket():
  x = stats.uniform.rvs(size=5000, random_state=0)  # GenNorm shape -> inf: clamp at the top
  assert abs(float(_m22.fit(x)[2]) - _m22.SHAPE_BOUNDS[1]) < 1e-3


# ----------------------------------------------------------------------------- codec


def _tree(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"conv": jax.random.laplace(k1, (40, 60)) * 0.1,
          "dense": jax.random.normal(k2, (1500,)) * 0.1 + 0.01,
          "bias": jax.random.normal(k3, (12,))}


class CodecTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      dict(r=1, family="gennorm", top=0.6, per_layer=True),
      dict(r=2, family="weibull", top=0.3, per_layer=True),
      dict(r=3, family="gennorm", top=None, per_layer=False),
      dict(r=2, family="gennorm", top=0.02, per_layer=True),  # index-list positions
  )
  def test_codec_invariants(self, r, family, top, per_layer):
    c = C.m22(r, m=1.0, family=family, top_fraction=top, per_layer=per_layer, min_layer_size=100,
              lloyd_iters=30)
    g = _tree()
    payload, _ = self.variant(c.encode)(g, c.init(g)[0], KEYS)
    out, _ = self.variant(c.decode)(payload, None, KEYS, g)
    x = np.concatenate([np.ravel(g[k]) for k in sorted(g)])  # leaf order of dicts is sorted
    y = np.concatenate([np.ravel(out[k]) for k in sorted(g)])
    d = x.size
    keep = d if top is None else math.ceil(top / r * d)
    order = np.argsort(-np.abs(x), kind="stable")[:keep]
    kept = np.zeros(d, bool)
    kept[order] = True
    np.testing.assert_array_equal(y != 0, kept)  # unkept coordinates stay zero
    # Raw leaf (bias, 12 < min_layer_size) is exact on its kept entries.
    raw = np.zeros(d, bool)
    raw[:12] = True
    np.testing.assert_array_equal(y[raw & kept], x[raw & kept])
    levels = np.asarray(payload["levels"].data)
    self.assertEqual(levels.shape, (2 if per_layer else 1, 2**r))
    codes = np.asarray(payload["codes"].data)[:int(payload["codes"].count)]
    assert codes.max() < 2**r
    # Every quantized entry decodes to its segment's level nearest to it (midpoint rule).
    seg = np.concatenate([np.full(12, -1), np.zeros(2400, int),
                          np.full(1500, 1 if per_layer else 0)])
    q = kept & (seg >= 0)
    for s in range(levels.shape[0]):
      if np.sum(q & (seg == s)) >= 2:  # fitted segments: strictly increasing levels
        assert np.all(np.diff(levels[s]) > 0)
    lv = levels[seg[q]]
    np.testing.assert_array_equal(np.abs(lv - x[q, None]).argmin(1), codes)
    np.testing.assert_allclose(y[q], lv[np.arange(q.sum()), codes], rtol=1e-6)
    # Bits: formula == in-graph count == packed bytes.
    n_q, n_r = int(q.sum()), int((kept & (seg < 0)).sum())
    lb = bits.length_bits
    pos = d if keep * bits.index_bits(d) >= d else lb(keep) + keep * bits.index_bits(d)
    expected = (pos + lb(min(keep, 3900)) + r * n_q + 32 * levels.size
                + lb(min(keep, 12)) + 32 * n_r)
    self.assertEqual(int(bits.count(payload)), expected)
    self.assertEqual(wire.total_bits(payload), expected)
    self.assertLen(wire.pack(payload, raw=True), -(-expected // 8))

  def test_levels_equal_standalone_fit_and_design(self):
    c = C.m22(2, m=2.0, family="weibull", top_fraction=0.5, min_layer_size=100, lloyd_iters=40)
    g = _tree(1)
    payload, _ = c.encode(g, None, KEYS)
    x = np.ravel(g["dense"])
    allx = np.concatenate([np.ravel(g[k]) for k in sorted(g)])
    thr = np.sort(np.abs(allx))[::-1][math.ceil(0.25 * allx.size) - 1]
    kept = x[np.abs(x) >= thr]
    mu, sd, p, a = _m22.fit(kept, "weibull")
    lz, _ = _m22.lloyd_max("weibull", p, a, 2, 2.0, iters=40)
    np.testing.assert_allclose(payload["levels"].data[1], mu + sd * lz, rtol=2e-4)

  def test_scale_equivariance(self):
    c = C.m22(3, top_fraction=None, min_layer_size=1, lloyd_iters=30)
    g = {"w": jax.random.normal(jax.random.key(5), (3000,))}
    p1, _ = c.encode(g, None, KEYS)
    p2, _ = c.encode({"w": 2.0 * g["w"]}, None, KEYS)  # exact in float: identical codes
    np.testing.assert_array_equal(p1["codes"].data, p2["codes"].data)
    np.testing.assert_allclose(p2["levels"].data, 2.0 * p1["levels"].data, rtol=1e-6)
    p3, _ = c.encode({"w": 3.0 * g["w"] + 0.25}, None, KEYS)  # affine: up to rounding at cuts
    assert np.mean(p3["codes"].data != p1["codes"].data) < 0.005
    np.testing.assert_allclose(p3["levels"].data, 3.0 * p1["levels"].data + 0.25, rtol=1e-3,
                               atol=1e-4)

  def test_iso_bit_payload(self):
    g = {"w": jax.random.normal(jax.random.key(2), (10000,))}
    payload_bits = []
    for r in (1, 2, 4):
      p, _ = C.m22(r, top_fraction=0.4, min_layer_size=1, lloyd_iters=10).encode(g, None, KEYS)
      self.assertEqual(int(p["codes"].count), math.ceil(0.4 / r * 10000))
      payload_bits.append(r * int(p["codes"].count))
    np.testing.assert_allclose(payload_bits, 4000, atol=4)

  def test_degenerate_segments_are_exact(self):
    c = C.m22(2, top_fraction=None, min_layer_size=1)
    g = {"a": jnp.full((50,), 0.37), "b": jnp.zeros((30,)).at[3].set(-2.0),
         "c": jnp.zeros((20,))}
    p, _ = c.encode(g, None, KEYS)
    out, _ = c.decode(p, None, KEYS, g)
    for k in g:
      np.testing.assert_array_equal(out[k], g[k])
    assert np.all(np.isfinite(p["levels"].data))

  def test_aggregate_is_weighted_sum_of_decodes(self):
    c = C.m22(2, top_fraction=0.5, min_layer_size=100, lloyd_iters=20)
    gs = [_tree(s) for s in range(3)]
    ps = [c.encode(g, None, KEYS)[0] for g in gs]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    w = jnp.array([0.2, 0.5, 0.3])
    agg = c.aggregate(stacked, w, KEYS, gs[0])
    ref = sum(wi * np.asarray(c.decode(p, None, KEYS, gs[0])[0]["conv"]) for wi, p in zip(w, ps))
    np.testing.assert_allclose(agg["conv"], ref, rtol=1e-5, atol=1e-7)

  def test_bad_arguments(self):
    for kw in [dict(bits=0), dict(bits=9), dict(m=-1.0), dict(family="laplace"),
               dict(top_fraction=0.0), dict(top_fraction=1.5), dict(lloyd_iters=0),
               dict(fit="ls"), dict(min_layer_size=0)]:
      with self.assertRaises(ValueError):
        C.m22(**kw)
    with self.assertRaises(ValueError):
      C.m22(1).encode({"w": jnp.array([1.0, jnp.nan])}, None, KEYS)


def _sampled_vs_exact(family, r, m, n, fit_sample, tol):
  rng = np.random.default_rng(r)
  x = {"w": jnp.asarray(stats.gennorm.rvs(0.7, size=n, random_state=rng) * 1e-3, jnp.float32)}
  kw = dict(m=m, family=family, top_fraction=0.6, min_layer_size=1, lloyd_iters=30)
  sampled, _ = C.m22(r, fit_sample=fit_sample, **kw).encode(x, None, KEYS)
  exact, _ = C.m22(r, fit_sample=None, **kw).encode(x, None, KEYS)
  lv_s, lv_e = np.asarray(sampled["levels"].data), np.asarray(exact["levels"].data)
  xs = np.asarray(x["w"], np.float64)
  sd = xs[np.argsort(-np.abs(xs))[:math.ceil(0.6 / r * xs.size)]].std()
  assert not np.array_equal(lv_s, lv_e)  # the sample is a real subsample
  assert np.max(np.abs(lv_s - lv_e)) <= tol * sd, (lv_s, lv_e, sd)
  # Codes differ only for entries between nearby thresholds.
  assert np.mean(np.asarray(sampled["codes"].data) != np.asarray(exact["codes"].data)) < 0.01


def test_sampled_fit_levels_near_exact_design():
  """The shape fitted on a sample of the kept entries gives levels near the full-data fit."""
  _sampled_vs_exact("gennorm", 2, 1.0, n=40_000, fit_sample=4096, tol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("family,r,m", [("gennorm", 1, 2.0), ("weibull", 2, 0.0),
                                        ("gennorm", 3, 1.0)])
def test_sampled_fit_levels_within_tolerance_of_exact_design(family, r, m):
  """Issue 11.3: at the default `fit_sample=65536`, levels within 3% of the segment's std
  of the design fitted on all kept entries (`fit_sample=None`); measured up to 2.0%."""
  _sampled_vs_exact(family, r, m, n=600_000, fit_sample=65536, tol=0.03)


def test_fit_sample_argument_validated():
  for bad in (0, -5, 2.5, True):
    with pytest.raises(ValueError, match="fit_sample"):
      C.m22(1, fit_sample=bad)


# ----------------------------------------------------------------------------- metric


def test_per_bit_accuracy():
  acc = np.array([0.15, 0.3, 0.55, 0.5])
  b = np.array([0, 1000, 3000, 7000])
  r = C.per_bit_accuracy(acc, b, 0.1)
  np.testing.assert_allclose(r.curve, [0.0, 0.2 / 1000, 0.45 / 3000, 0.4 / 7000])
  assert r.final == pytest.approx(0.4 / 7000) and r.best == pytest.approx(0.2 / 1000)
  with pytest.raises(ValueError):
    C.per_bit_accuracy(acc, b[:3], 0.1)
  with pytest.raises(ValueError):
    C.per_bit_accuracy(acc, b[::-1], 0.1)


@pytest.mark.parametrize("family,shape", [("gennorm", 0.8), ("weibull", 1.5)])
def test_empirical_distortion_matches_model(family, shape):
  # End to end: the codec's weighted distortion on model data equals the closed-form one
  # of its own design (z-domain, M = 1) within 3 standard errors of the sample mean (the
  # heavy-tailed GenNorm case has a ~9% relative standard error at n = 40k).
  dist = stats.gennorm if family == "gennorm" else stats.dweibull
  x = dist.rvs(shape, loc=0.2, scale=0.05, size=40000, random_state=11).astype(np.float32)
  c = C.m22(2, m=1.0, family=family, top_fraction=None, min_layer_size=1, lloyd_iters=60)
  g = {"w": jnp.asarray(x)}
  p, _ = c.encode(g, None, KEYS)
  y = np.asarray(c.decode(p, None, KEYS, g)[0]["w"], np.float64)
  mu, sd, fp, fa = _m22.fit(x, family)
  z, zq = (x - float(mu)) / float(sd), (y - float(mu)) / float(sd)
  w = np.abs(z) * (z - zq)**2
  levels, _ = _m22.lloyd_max(family, fp, fa, 2, 1.0, iters=60)
  model = float(_m22.weighted_distortion(levels[2:], family, fp, fa, 1.0))
  assert abs(w.mean() - model) < 3 * w.std() / math.sqrt(w.size)
