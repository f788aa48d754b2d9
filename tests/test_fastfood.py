"""Fastfood projection: float64 dense references, adjoint, norm bounds, determinism, errors."""

import chex
import fastfood_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedjax_compress import ops

# (d, D, block_rows): global maps with D = L and D < L, and blocked maps.
CASES = [(3, 8, None), (5, 13, None), (16, 100, None), (7, 50, 16), (20, 70, 32), (9, 9, 4)]


def _dense(p):
  return ref.dense_from_factors(p.signs, p.perm, p.gauss, p.d, p.D, p.block_rows)


@jax.jit
def _jac_jit(p, z):
  return jax.jacfwd(ops.fastfood_project, argnums=1)(p, z)


def _jac(p):
  return np.asarray(_jac_jit(p, jnp.zeros(p.d)), np.float64)

def _check_adjoint(d, D, rows):
  p = ops.fastfood_params(jax.random.key(D), d, D, block_rows=rows)
  rng = np.random.default_rng(d)
  both = jax.jit(lambda p, z, y: (jnp.vdot(ops.fastfood_project(p, z), y),
                                  jnp.vdot(z, ops.fastfood_transpose(p, y))))
  for _ in range(3):
    z, y = rng.standard_normal(d), rng.standard_normal(D)
    lhs, rhs = (float(v) for v in both(p, jnp.asarray(z, jnp.float32),
                                       jnp.asarray(y, jnp.float32)))
    # relative to the scale of the terms (|<Vz,y>| can be much smaller than ||z|| ||y||)
    assert abs(lhs - rhs) <= 1e-6 * np.linalg.norm(z) * np.linalg.norm(y)


class FastfoodTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CASES)
  def test_project_and_transpose_match_dense_float64(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(d * D), d, D, block_rows=rows)
    dense = _dense(p)
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal(d), rng.standard_normal(D)
    vz = self.variant(ops.fastfood_project)(p, jnp.asarray(z, jnp.float32))
    vty = self.variant(ops.fastfood_transpose)(p, jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(vz, dense @ z, atol=1e-5 * np.linalg.norm(dense @ z))
    np.testing.assert_allclose(vty, dense.T @ y, atol=1e-5 * np.linalg.norm(dense.T @ y))

  @parameterized.parameters(*CASES[1::2])
  def test_jacfwd_and_vjp(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(7), d, D, block_rows=rows)
    dense = _dense(p)
    np.testing.assert_allclose(_jac(p), dense, atol=2e-6)
    # jacfwd of the transpose is V^T; the VJP of project is the transpose.
    jt = jax.jit(jax.jacfwd(ops.fastfood_transpose, argnums=1))(p, jnp.zeros(D))
    np.testing.assert_allclose(np.asarray(jt, np.float64), dense.T, atol=2e-6)
    y = jnp.asarray(np.random.default_rng(1).standard_normal(D), jnp.float32)
    vjp = jax.jit(lambda p, y: jax.vjp(lambda z: ops.fastfood_project(p, z), jnp.zeros(d))[1](y))
    np.testing.assert_allclose(vjp(p, y)[0], ops.fastfood_transpose(p, y), atol=1e-5)

  @parameterized.parameters((16, 1000, None), (300, 20000, 4096))
  def test_adjoint_identity_float32(self, d, D, rows):
    _check_adjoint(d, D, rows)

  @pytest.mark.slow
  def test_adjoint_identity_float32_large(self):
    _check_adjoint(64, 70000, 1 << 14)
    _check_adjoint(1000, 70000, None)

  def test_unit_columns_when_D_is_power_of_two(self):
    for d, D in [(40, 256)]:
      p = ops.fastfood_params(jax.random.key(D), d, D)
      np.testing.assert_allclose(np.sum(_jac(p) ** 2, axis=0), 1.0, atol=2e-6)

  @parameterized.parameters((64, 1025, None), (100, 5000, 1024), (100, 5000, 100))
  def test_near_orthonormal_columns(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(d + D), d, D, block_rows=rows)
    v = _jac(p)
    gram = v.T @ v
    norms = np.diag(gram)
    assert norms.min() >= 0.9 and norms.max() <= 1.1, (norms.min(), norms.max())
    assert np.abs(gram - np.diag(norms)).max() <= 6 / np.sqrt(D)
    for z in np.random.default_rng(0).standard_normal((5, d)):
      ratio = np.linalg.norm(ops.fastfood_project(p, jnp.asarray(z, jnp.float32))) / \
          np.linalg.norm(z)
      assert abs(ratio - 1) < 0.1

  @parameterized.parameters(1, 64)
  def test_orthogonal_when_G_is_one_and_d_eq_D_eq_L(self, n):
    p = ops.fastfood_params(jax.random.key(n), n, n, gaussian=False)
    v = _jac(p)
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=1e-6)

  def test_independent_reference_statistics(self):
    """Appendix-A float64 map: E[V V^T g] = a g with a ~ d/D (spec 1.6.7); our map agrees."""
    d, D, m = 32, 500, 400
    rng = np.random.default_rng(0)
    g = rng.standard_normal(D)
    mean_ref = np.mean([ref.project(p, ref.project_T(p, g)) for p in
                        (ref.make(d, D, rng) for _ in range(m))], axis=0)

    def vvt(key):
      p = ops.fastfood_params(key, d, D)
      return ops.fastfood_project(p, ops.fastfood_transpose(p, jnp.asarray(g, jnp.float32)))

    mean = np.asarray(jax.jit(jax.vmap(vvt))(jax.random.split(jax.random.key(1), m)).mean(0),
                      np.float64)
    for mu in (mean_ref, mean):
      a = mu @ g / (g @ g)
      assert abs(a / (d / D) - 1) < 0.05, a
      assert np.linalg.norm(mu - a * g) < 0.35 * np.linalg.norm(a * g)

  def test_feistel_permutation_is_a_keyed_bijection(self):
    for log2n in (0, 1, 2, 5, 12, 17):
      n = 1 << log2n
      p = np.asarray(jax.jit(ops.feistel_permutation, static_argnums=1)(jax.random.key(n), n))
      np.testing.assert_array_equal(np.sort(p), np.arange(n))
    a, b = (np.asarray(ops.feistel_permutation(jax.random.key(k), 4096)) for k in (0, 1))
    assert np.mean(a == b) < 0.01 and np.mean(a == np.arange(4096)) < 0.01
    # roughly uniform displacement: |p(i) - i| / n has mean ~1/3 for a random permutation
    assert abs(np.mean(np.abs(a - np.arange(4096))) / 4096 - 1 / 3) < 0.02

  @parameterized.parameters((8, 50, None), (64, 1025, None), (100, 5000, 1024))
  def test_feistel_map(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(d), d, D, block_rows=rows, permutation="feistel")
    v = _jac(p)
    if D <= 64:
      np.testing.assert_allclose(v, _dense(p), atol=2e-6)
    else:
      gram = v.T @ v
      norms = np.diag(gram)
      assert norms.min() >= 0.9 and norms.max() <= 1.1, (norms.min(), norms.max())
      assert np.abs(gram - np.diag(norms)).max() <= 6 / np.sqrt(D)
    _check_adjoint(d, D, rows)

  def test_feistel_statistics(self):
    d, D, m = 32, 500, 400
    g = jnp.asarray(np.random.default_rng(0).standard_normal(D), jnp.float32)

    def vvt(key):
      p = ops.fastfood_params(key, d, D, permutation="feistel")
      return ops.fastfood_project(p, ops.fastfood_transpose(p, g))

    mu = np.asarray(jax.jit(jax.vmap(vvt))(jax.random.split(jax.random.key(1), m)).mean(0),
                    np.float64)
    gg = np.asarray(g, np.float64)
    a = mu @ gg / (gg @ gg)
    assert abs(a / (d / D) - 1) < 0.05, a
    assert np.linalg.norm(mu - a * gg) < 0.35 * np.linalg.norm(a * gg)

  # --- hashed factors + Feistel permutation (the 'auto' map of large models) ---

  @parameterized.parameters((3, 8, None), (7, 50, 16), (9, 9, 4), (20, 70, 32))
  def test_hashed_map_matches_dense_float64(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(d + D), d, D, block_rows=rows, permutation="feistel",
                            generator="hash")
    assert p.signs_table is None and p.gauss_table is None and p.perm_table is None
    dense = _dense(p)  # built from the regenerated factors (signs, perm, gauss properties)
    signs = np.asarray(p.signs)
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    for row in np.asarray(p.perm):
      np.testing.assert_array_equal(np.sort(row), np.arange(p.L))
    np.testing.assert_allclose(_jac(p), dense, atol=2e-6)
    rng = np.random.default_rng(1)
    y = rng.standard_normal(D)
    np.testing.assert_allclose(ops.fastfood_transpose(p, jnp.asarray(y, jnp.float32)),
                               dense.T @ y, atol=1e-5 * np.linalg.norm(dense.T @ y))
    _check_adjoint(d, D, rows)

  def test_hashed_normals_and_signs_are_standard(self):
    """Hashed G ~ N(0, 1) (moments, tails) and B ~ Rademacher, independent across blocks."""
    p = ops.fastfood_params(0, 8, 1 << 18, block_rows=1 << 16, permutation="feistel",
                            generator="hash")
    g, b = np.asarray(p.gauss, np.float64), np.asarray(p.signs, np.float64)
    assert g.shape == (4, 1 << 16) and np.all(np.isfinite(g))
    x = g.ravel()
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1) < 0.01
    assert abs(np.mean(x ** 3)) < 0.03 and abs(np.mean(x ** 4) - 3) < 0.06
    assert abs(np.mean(np.abs(x) > 1.96) - 0.05) < 0.003
    assert abs(b.mean()) < 0.01
    assert abs(np.corrcoef(g[0], g[1])[0, 1]) < 0.02 and abs(np.mean(b[0] * b[1])) < 0.02

  @parameterized.parameters((64, 1025, 256), (100, 5000, 1024))
  def test_hashed_map_near_orthonormal(self, d, D, rows):
    p = ops.fastfood_params(jax.random.key(d), d, D, block_rows=rows, permutation="feistel",
                            generator="hash")
    gram = _jac(p).T @ _jac(p)
    norms = np.diag(gram)
    assert norms.min() >= 0.9 and norms.max() <= 1.1, (norms.min(), norms.max())
    assert np.abs(gram - np.diag(norms)).max() <= 6 / np.sqrt(D)

  def test_hashed_map_statistics(self):
    d, D, m = 32, 500, 400
    g = jnp.asarray(np.random.default_rng(0).standard_normal(D), jnp.float32)

    def vvt(key):
      p = ops.fastfood_params(key, d, D, block_rows=128, permutation="feistel", generator="hash")
      return ops.fastfood_project(p, ops.fastfood_transpose(p, g))

    mu = np.asarray(jax.jit(jax.vmap(vvt))(jax.random.split(jax.random.key(2), m)).mean(0),
                    np.float64)
    gg = np.asarray(g, np.float64)
    a = mu @ gg / (gg @ gg)
    assert abs(a / (d / D) - 1) < 0.05, a
    assert np.linalg.norm(mu - a * gg) < 0.35 * np.linalg.norm(a * gg)

  def test_auto_map_of_a_large_model(self):
    """'auto': the exact global map up to 2^16, blocked + Feistel + hashed above, still
    near-orthonormal (spec 1.6.3 bounds) at D = 70,000."""
    small = ops.fastfood_params(0, 10, 1 << 16)
    assert (small.num_blocks, small.permutation, small.generator) == (1, "uniform", "threefry")
    d, D = 48, 70_000
    p = ops.fastfood_params(jax.random.key(3), d, D)
    assert (p.block_rows, p.L, p.num_blocks) == (1 << 16, 1 << 16, 2)
    assert (p.permutation, p.generator) == ("feistel", "hash")
    v = _jac(p)
    gram = v.T @ v
    norms = np.diag(gram)
    assert norms.min() >= 0.9 and norms.max() <= 1.1, (norms.min(), norms.max())
    assert np.abs(gram - np.diag(norms)).max() <= 6 / np.sqrt(D)
    _check_adjoint(d, D, "auto")
    # blocks are as wide as next_pow2(d) when d exceeds the default block
    assert ops.fastfood_params(0, 70_000, 200_000).block_rows == 1 << 17

  def test_determinism_and_key_dependence(self):
    d, D = 10, 300
    z = jnp.asarray(np.random.default_rng(0).standard_normal(d), jnp.float32)
    client = jax.jit(lambda k, z: ops.fastfood_project(ops.fastfood_params(k, d, D), z))
    server = jax.jit(lambda k, z: 1.0 * ops.fastfood_project(ops.fastfood_params(k, d, D), z))
    a, b = client(jax.random.key(5), z), server(jax.random.key(5), z)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    by_int = jax.jit(lambda z: ops.fastfood_project(ops.fastfood_params(5, d, D), z))(z)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(by_int))  # int seed == key(seed)
    # eager differs from jit only by float rounding (different fusion)
    np.testing.assert_allclose(a, ops.fastfood_project(ops.fastfood_params(5, d, D), z),
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, client(jax.random.key(6), z))

  def test_zero_and_linearity(self):
    p = ops.fastfood_params(0, 12, 200)
    np.testing.assert_array_equal(ops.fastfood_project(p, jnp.zeros(12)), np.zeros(200))
    gs = jnp.asarray(np.random.default_rng(0).standard_normal((4, 200)), jnp.float32)
    w = jnp.asarray([0.1, 0.4, 0.2, 0.3], jnp.float32)
    lhs = ops.fastfood_transpose(p, w @ gs)
    rhs = w @ jax.vmap(lambda g: ops.fastfood_transpose(p, g))(gs)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "exceeds the number of parameters"):
      ops.fastfood_params(0, 11, 10)
    for bad in (0, -3, 2.5):
      with self.assertRaisesRegex(ValueError, "d \\(intrinsic dimension\\)"):
        ops.fastfood_params(0, bad, 10)
    with self.assertRaisesRegex(ValueError, "block_rows"):
      ops.fastfood_params(0, 2, 10, block_rows=0)
    with self.assertRaisesRegex(ValueError, "method"):
      ops.fastfood_params(0, 2, 10, method="fft")
    with self.assertRaisesRegex(ValueError, "permutation"):
      ops.fastfood_params(0, 2, 10, permutation="sort")
    p = ops.fastfood_params(0, 4, 10)
    assert ops.fastfood_params(0, 10, 10).d == 10  # d = D allowed
    with self.assertRaisesRegex(ValueError, "shape"):
      ops.fastfood_project(p, jnp.zeros(5))
    with self.assertRaisesRegex(ValueError, "shape"):
      ops.fastfood_transpose(p, jnp.zeros(4))
    with self.assertRaisesRegex(ValueError, "NaN or Inf"):
      ops.fastfood_transpose(p, jnp.zeros(10).at[3].set(jnp.nan))

  def test_pallas_method_matches_jnp(self):
    p = ops.fastfood_params(1, 20, 700, method="pallas")
    q = ops.fastfood_params(1, 20, 700, method="butterfly")
    y = jnp.asarray(np.random.default_rng(0).standard_normal(700), jnp.float32)
    np.testing.assert_allclose(ops.fastfood_transpose(p, y), ops.fastfood_transpose(q, y),
                               atol=1e-5)
    g = jax.grad(lambda z: jnp.vdot(ops.fastfood_project(p, z), y))(jnp.zeros(20))
    np.testing.assert_allclose(g, ops.fastfood_transpose(q, y), atol=1e-5)

  def test_pallas_blocked_map_with_three_blocks(self):
    """3 blocks of 4096 reach the Pallas FWHT as 3 rows (issue 12.1: NaN before the fix)."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal(16), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).standard_normal(3 * 4096), jnp.float32)
    kw = dict(block_rows=4096, permutation="feistel", generator="hash")
    p = ops.fastfood_params(2, 16, 3 * 4096, method="pallas", **kw)
    q = ops.fastfood_params(2, 16, 3 * 4096, method="butterfly", **kw)
    got, want = ops.fastfood_project(p, z), ops.fastfood_project(q, z)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(ops.fastfood_transpose(p, y), ops.fastfood_transpose(q, y),
                               rtol=1e-5, atol=1e-4)


if __name__ == "__main__":
  pytest.main([__file__])
