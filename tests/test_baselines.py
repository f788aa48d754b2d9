"""Baselines against float64 NumPy references; variance bounds; bad inputs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import reference_baselines as ref
from fedjax_compress import Field, Keys, bits, compressors, error_feedback, wire
from fedjax_compress._src import layout
from fedjax_compress.compressors import _sketch


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(scale * rng.normal(size=(7, 5)), jnp.float32),
          "b": jnp.asarray(scale * rng.normal(size=11), jnp.float32)}


def _keys(seed):
  return Keys(jax.random.key(seed), jax.random.key(seed + 10_000))


def _roundtrip(c, g, keys):
  s, r = c.init(g)
  p, s = c.encode(g, s, keys)
  out, _ = c.decode(p, r, keys, g)
  return out, p


def _flat(tree):
  return ref.ravel(jax.tree.leaves(tree))


class ReferenceTest(chex.TestCase):
  """Decoded values equal float64 references, jitted and eager."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 5, 46)
  def test_top_k(self, k):
    g = _tree(k)
    out, p = self.variant(lambda g, keys: _roundtrip(compressors.top_k(k), g, keys))(
        g, _keys(0))
    np.testing.assert_array_equal(_flat(out), ref.top_k(_flat(g), k))
    assert int(bits.count(p)) == k * (32 + math.ceil(math.log2(46)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_ties_lowest_index(self):
    g = {"v": jnp.array([1.0, -3.0, 3.0, 0.5, -3.0])}
    out, _ = self.variant(lambda g: _roundtrip(compressors.top_k(2), g, _keys(0)))(g)
    np.testing.assert_array_equal(out["v"], [0.0, -3.0, 3.0, 0.0, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((True, False, "uniform"), (False, False, "uniform"),
                            (True, True, "uniform"), (True, False, "stratified"),
                            (False, True, "stratified"))
  def test_random_k(self, unbiased, shared, sampling):
    g, keys, k = _tree(3), _keys(4), 9
    c = compressors.random_k(k, unbiased=unbiased, shared_mask=shared, sampling=sampling)
    out, p = self.variant(lambda g, keys: _roundtrip(c, g, keys))(g, keys)
    flat = _flat(out)
    idx = np.flatnonzero(flat)
    assert idx.size == k and int(bits.count(p)) == 32 * k
    if sampling == "uniform":
      np.testing.assert_allclose(flat, ref.random_k(_flat(g), idx, unbiased), rtol=1e-6)
    else:
      # 46 = 9 * 5 + 1: the first stratum is [0, 6), then strata of 5; one index in each,
      # scaled by its stratum's length.
      starts = np.array([0] + list(range(6, 46, 5)))
      lengths = np.diff(np.append(starts, 46))
      assert np.all((idx >= starts) & (idx < starts + lengths))
      expected = np.zeros(46)
      expected[idx] = _flat(g)[idx] * (lengths if unbiased else 1.0)
      np.testing.assert_allclose(flat, expected, rtol=1e-6)
    # The receiver derives the same coordinates from the key: the shared/private one.
    out2, _ = _roundtrip(c, g, Keys(keys.shared, jax.random.key(99)))
    assert (np.flatnonzero(_flat(out2)).tolist() == idx.tolist()) == shared

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_sign_sgd(self, scaled):
    g = _tree(5)
    g["b"] = g["b"].at[3].set(0.0)
    out, p = self.variant(lambda g: _roundtrip(compressors.sign_sgd(scaled=scaled), g,
                                               _keys(0)))(g)
    for name in g:
      np.testing.assert_allclose(np.asarray(out[name], np.float64).ravel(),
                                 ref.sign(np.asarray(g[name]).ravel(), scaled), rtol=1e-6)
    assert int(bits.count(p)) == 46 + (64 if scaled else 2)  # + 2 finite flags unscaled

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity(self):
    g = _tree(6)
    g["h"] = jnp.arange(4, dtype=jnp.bfloat16)
    out, p = self.variant(lambda g: _roundtrip(compressors.identity(), g, _keys(0)))(g)
    chex.assert_trees_all_equal(out, g)
    assert int(bits.count(p)) == 46 * 32 + 4 * 16

  @chex.variants(with_jit=True, without_jit=True)
  def test_qsgd_levels_and_norms(self):
    levels, bucket = 3, 8
    g = _tree(7)
    out, p = self.variant(lambda g, keys: _roundtrip(compressors.qsgd(levels, bucket_size=bucket),
                                                     g, keys))(g, _keys(1))
    v, q = _flat(g), _flat(out)
    norms = ref.qsgd_bucket_norms(v, bucket)
    np.testing.assert_allclose(p["norms"].data, norms, rtol=1e-6)
    n = np.repeat(norms, bucket)[:v.size]
    scaled = np.abs(v) / n * levels
    mag = np.asarray(p["levels"].data, np.float64)
    # Each level is one of the two nearest to s|v|/n, with v's sign (or zero).
    assert np.all((np.abs(mag) == np.floor(scaled)) | (np.abs(mag) == np.floor(scaled) + 1))
    assert np.all(mag * v >= 0)
    np.testing.assert_allclose(q, mag * n / levels, rtol=1e-5)
    nb = -(-46 // bucket)
    assert int(bits.count(p)) == 32 * nb + 46 * (math.ceil(math.log2(levels + 1)) + 1)


@pytest.mark.parametrize("levels,bucket", [(1, 46), (4, 8), (16, 512)])
def test_qsgd_variance_matches_formula_and_bound(levels, bucket):
  """MC E||Q(v)-v||^2 == exact float64 variance (5 sigma) <= min(b/s^2, sqrt(b)/s) ||v||^2."""
  g, n = _tree(8), 4000
  c = compressors.qsgd(levels, bucket_size=bucket)
  keys = jax.random.split(jax.random.key(0), 2 * n).reshape(n, 2)
  out = jax.jit(jax.vmap(lambda k: _roundtrip(c, g, Keys(k[0], k[1]))[0]))(keys)
  x = np.concatenate([np.asarray(l, np.float64).reshape(n, -1) for l in jax.tree.leaves(out)], 1)
  err = np.sum((x - _flat(g)) ** 2, axis=1)
  exact = ref.qsgd_variance(_flat(g), levels, bucket)
  assert abs(err.mean() - exact) <= 5 * err.std(ddof=1) / math.sqrt(n) + 1e-6 * exact
  b = min(bucket, 46)
  assert exact <= min(b / levels**2, math.sqrt(b) / levels) * np.sum(_flat(g) ** 2)


def test_count_sketch_is_linear_and_matches_reference():
  rows, cols = 3, 16
  c = compressors.count_sketch(rows, cols)
  x, y, keys = _tree(9), _tree(10), _keys(2)
  enc = jax.jit(lambda g: c.encode(g, None, keys)[0]["sketch"].data)
  buckets, signs = (np.asarray(a) for a in _sketch._hashes(keys.shared, rows, cols, 46))
  sx = ref.count_sketch(_flat(x), buckets, signs, cols)
  np.testing.assert_allclose(enc(x), sx, rtol=1e-5, atol=1e-5)
  combo = jax.tree.map(lambda a, b: 2.0 * a - 0.5 * b, x, y)
  np.testing.assert_allclose(enc(combo), 2.0 * sx - 0.5 * ref.count_sketch(
      _flat(y), buckets, signs, cols), rtol=1e-5, atol=1e-5)
  out, _ = c.decode({"sketch": wire.unpack(wire.pack({"s": c.encode(x, None, keys)[0][
      "sketch"]}), {"s": c.encode(x, None, keys)[0]["sketch"]})["s"]}, None, keys, x)
  np.testing.assert_allclose(_flat(out), ref.unsketch(sx, buckets, signs), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [None, 3])
def test_count_sketch_recovers_sparse_vector(seed, k):
  """A 3-sparse vector in D=500 with 7 rows x 512 columns is recovered exactly."""
  rng = np.random.default_rng(seed)
  vec = np.zeros(500, np.float32)
  vec[rng.choice(500, 3, replace=False)] = rng.normal(size=3) + np.sign(rng.normal(size=3))
  c = compressors.count_sketch(7, 512, k=k)
  g = {"v": jnp.asarray(vec)}
  out, p = _roundtrip(c, g, _keys(seed))
  np.testing.assert_array_equal(out["v"], vec)
  assert int(bits.count(p)) == 7 * 512 * 32


def test_count_sketch_reduce_then_decode_unsketches_sum_of_sketches():
  c = compressors.count_sketch(3, 16, k=5)
  gs = [_tree(20 + i) for i in range(3)]
  keys = Keys(jax.random.key(1), jax.random.split(jax.random.key(2), 3))
  payloads = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *[c.encode(g, None, Keys(keys.shared, keys.private[i]))[0]
                            for i, g in enumerate(gs)])
  w = jnp.array([0.2, 0.3, 0.5])
  assert c.aggregate is None  # the server reduces, then decodes once (FetchSGD)
  got, _ = c.decode(c.reduce(payloads, w), None, keys, gs[0])
  buckets, signs = (np.asarray(a) for a in _sketch._hashes(keys.shared, 3, 16, 46))
  total = sum(wi * ref.count_sketch(_flat(g), buckets, signs, 16) for wi, g in zip(
      np.asarray(w, np.float64), gs))
  np.testing.assert_allclose(_flat(got), ref.unsketch(total, buckets, signs, 5), rtol=1e-4,
                             atol=1e-5)


def test_power_sgd_matches_float64_power_iteration():
  rank = 2
  c = compressors.power_sgd(rank, min_compression_rate=1.0)
  g = {"m": _tree(11)["a"], "c": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 3)),
                                            jnp.float32), "b": jnp.ones(3)}
  sender, receiver = c.init(g)
  leaves = jax.tree.leaves(g)
  qs = [np.asarray(q, np.float64) for q in sender.q]
  step = jax.jit(lambda g, s: c.encode(g, s, _keys(0)))
  for _ in range(3):
    p, sender = step(g, sender)
    out, _ = c.decode(p, receiver, _keys(0), g)
    for x, o, i in zip(leaves, jax.tree.leaves(out), range(len(leaves))):
      if x.ndim < 2:
        np.testing.assert_array_equal(o, x)
        continue
      mat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
      approx, qs[i] = ref.power_iteration(mat, qs[i])
      np.testing.assert_allclose(np.asarray(o, np.float64).reshape(mat.shape), approx,
                                 rtol=1e-4, atol=1e-4)
  assert int(bits.count(p)) == 32 * (rank * (7 + 5) + rank * (4 + 9) + 3)


def test_power_sgd_exact_for_low_rank_and_converges_to_svd():
  rng = np.random.default_rng(3)
  low = (rng.normal(size=(12, 2)) @ rng.normal(size=(2, 9))).astype(np.float32)
  c = compressors.power_sgd(2)
  g = {"w": jnp.asarray(low)}
  s, r = c.init(g)
  p, s = c.encode(g, s, _keys(0))
  np.testing.assert_allclose(c.decode(p, r, _keys(0), g)[0]["w"], low, rtol=1e-4, atol=1e-4)
  # Full-rank matrix with a spectral gap: warm-started iterations reach the best rank-2 fit.
  u, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  v, _ = np.linalg.qr(rng.normal(size=(9, 9)))
  sv = np.array([5.0, 3.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
  full = (u[:, :9] * sv) @ v.T
  g = {"w": jnp.asarray(full, jnp.float32)}
  s, r = c.init(g)
  step = jax.jit(lambda s: c.encode(g, s, _keys(0)))
  for _ in range(30):
    p, s = step(s)
  best = (u[:, :2] * sv[:2]) @ v[:, :2].T
  np.testing.assert_allclose(c.decode(p, r, _keys(0), g)[0]["w"], best, atol=1e-4)


def test_power_sgd_leaves_small_matrices_uncompressed():
  c = compressors.power_sgd(4)  # 4 * (6 + 5) * 2 > 30: not worth it
  g = {"w": _tree(12)["a"][:6], "b": jnp.ones(2, jnp.bfloat16)}
  out, p = _roundtrip(c, g, _keys(0))
  chex.assert_trees_all_equal(out, g)
  assert int(bits.count(p)) == 30 * 32 + 2 * 16


@pytest.mark.parametrize("make", [
    lambda: error_feedback(compressors.top_k(4)),
    lambda: error_feedback(compressors.power_sgd(1)),
    lambda: error_feedback(compressors.count_sketch(2, 8, k=6)),
    lambda: error_feedback(compressors.sign_sgd(scaled=True)),
], ids=["top_k", "power_sgd", "count_sketch", "sign_sgd"])
def test_error_feedback_telescopes(make):
  """sum_t decoded_t + e_T == sum_t g_t (float64 accumulation)."""
  c = make()
  g0 = _tree(0)
  s, r = c.init(g0)
  step = jax.jit(lambda g, s, r, keys: (lambda p, s: (c.decode(p, r, keys, g)[0], s))(
      *c.encode(g, s, keys)))
  sum_g = np.zeros(46)
  sum_d = np.zeros(46)
  for t in range(6):
    g = _tree(30 + t)
    d, s = step(g, s, r, _keys(t))
    sum_g += _flat(g)
    sum_d += _flat(d)
  np.testing.assert_allclose(sum_d + ref.ravel(jax.tree.leaves(s.residual)), sum_g,
                             rtol=1e-5, atol=1e-5)
  assert np.any(np.abs(ref.ravel(jax.tree.leaves(s.residual))) > 1e-3)  # EF did something


@pytest.mark.parametrize("factory,match", [
    (lambda: compressors.top_k(0), "k must be >= 1"),
    (lambda: compressors.top_k(2.0), "positive integer"),
    (lambda: compressors.top_k(), "exactly one"),
    (lambda: compressors.top_k(3, fraction=0.1), "exactly one"),
    (lambda: compressors.top_k(fraction=1.5), r"fraction must be in \(0, 1\]"),
    (lambda: compressors.random_k(fraction=0.0), r"fraction must be in \(0, 1\]"),
    (lambda: compressors.random_k(fraction=float("nan")), "fraction"),
    (lambda: compressors.qsgd(0), "levels must be >= 1"),
    (lambda: compressors.qsgd(-2), "levels must be >= 1"),
    (lambda: compressors.qsgd(4, bucket_size=0), "bucket_size"),
    (lambda: compressors.count_sketch(0, 4), "rows"),
    (lambda: compressors.count_sketch(3, 0), "cols"),
    (lambda: compressors.count_sketch(3, 4, k=0), "k must be >= 1"),
    (lambda: compressors.power_sgd(0), "rank"),
    (lambda: compressors.power_sgd(1, min_compression_rate=0.5), "min_compression_rate"),
    (lambda: compressors.power_sgd(1, seed=1.5), "seed"),
])
def test_bad_configuration(factory, match):
  with pytest.raises(ValueError, match=match):
    factory()


@pytest.mark.parametrize("c", [compressors.top_k(47), compressors.random_k(47),
                               compressors.count_sketch(2, 4, k=47)],
                         ids=["top_k", "random_k", "count_sketch"])
def test_k_larger_than_model(c):
  with pytest.raises(ValueError, match="exceeds the number of parameters 46"):
    c.encode(_tree(0), c.init(_tree(0))[0], _keys(0))


BASELINES = {
    "identity": compressors.identity(), "top_k": compressors.top_k(5),
    "random_k": compressors.random_k(5), "qsgd": compressors.qsgd(2),
    "sign_sgd": compressors.sign_sgd(), "sign_sgd_scaled": compressors.sign_sgd(scaled=True),
    "count_sketch": compressors.count_sketch(3, 8, k=4), "power_sgd": compressors.power_sgd(2),
    "ef_top_k": error_feedback(compressors.top_k(5)),
}


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rejected(name, bad):
  c, g = BASELINES[name], _tree(0)
  g["a"] = g["a"].at[2, 3].set(bad)
  with pytest.raises(ValueError, match="NaN or Inf"):
    c.encode(g, c.init(g)[0], _keys(0))


@pytest.mark.parametrize("name", BASELINES)
def test_zero_gradients_give_defined_results(name):
  c, g = BASELINES[name], jax.tree.map(jnp.zeros_like, _tree(0))
  out, _ = _roundtrip(c, g, _keys(0))
  expected = 1.0 if name == "sign_sgd" else 0.0  # a sign bit has no zero: 0 -> +1
  np.testing.assert_array_equal(_flat(out), np.full(46, expected))


def test_layout_roundtrip_mixed_dtypes():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16)}
  vec = layout.ravel(tree)
  assert vec.dtype == jnp.float32 and vec.shape == (8,)
  chex.assert_trees_all_equal(layout.unraveler(tree)(vec), tree)
  assert layout.num_params(tree) == 8


def test_bit_accounting_is_exact_past_int32():
  big = Field(jax.ShapeDtypeStruct((2**26,), jnp.float32), 32)
  assert int(bits.field_bits(big)) == 2**31
  assert int(bits.field_bits(Field(jax.ShapeDtypeStruct((2**25,), jnp.float32), 32))) == 2**30


def _top_reference(v, k):
  """Exact reference: stable order of the magnitude bit patterns, lowest index first."""
  key = np.abs(np.asarray(v, np.float32)).view(np.int32) & 0x7FFFFFFF
  return np.sort(np.argsort(-key.astype(np.int64), kind="stable")[:k])


def test_top_k_threshold_selection_is_exact():
  # The sampled-threshold path (D > 4 * sample) against a full stable sort, including
  # ties, an all-zero vector, spikes the strided sample misses (forces bisection steps)
  # and NaN/Inf; all cases as one vmapped batch.
  from fedjax_compress.compressors import _sparsify
  rng = np.random.default_rng(3)
  n = 5000
  spikes = rng.random(n) * 1e-3
  spikes[np.arange(1, n, 7)[:150]] = 10 + rng.random(150)
  nan_inf = rng.normal(size=n)
  nan_inf[5], nan_inf[77] = np.nan, -np.inf
  vs = np.stack([rng.normal(size=n), np.zeros(n), rng.integers(-3, 4, n).astype(float),
                 spikes, nan_inf, -spikes[::-1]])
  sel = jax.jit(jax.vmap(lambda x, k: _sparsify.top_indices(x, k, sample=64), (0, None)),
                static_argnums=1)
  for k in (40, 1200):
    got = np.asarray(sel(jnp.asarray(vs, jnp.float32), k))
    for g, v in zip(got, vs):
      np.testing.assert_array_equal(g, _top_reference(v, k))


def test_top_k_default_sample_at_small_sizes_is_exact():
  # From `_sparsify.SMALL` elements up the sampled path runs with a sample of D/4 keys
  # (XLA:CPU's lax.top_k is ~10x slower there); exact against a stable sort, ties included.
  from fedjax_compress.compressors import _sparsify
  rng = np.random.default_rng(4)
  for n, k, v in ((_sparsify.SMALL, 10, rng.normal(size=_sparsify.SMALL)),
                  (14_210, 142, rng.normal(size=14_210)),
                  (14_210, 3000, rng.integers(-2, 3, 14_210).astype(float))):
    got = jax.jit(lambda x: _sparsify.top_indices(x, k))(jnp.asarray(v, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), _top_reference(v, k))
