"""FWHT: jnp butterfly / Kronecker, Pallas (interpret) and native CPU paths vs float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from fedjax_compress import ops
from fedjax_compress.ops import _hadamard
from fedjax_compress.ops import _native
from fedjax_compress.ops import _pallas_hadamard

# The native kernel needs a C++ compiler; every method list below includes it only where it built.
NATIVE = ["native"] if _native.available() else []


def _rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def _ref(x):
  x = np.asarray(x, np.float64)
  return x @ scipy.linalg.hadamard(x.shape[-1]).astype(np.float64)  # H symmetric


class FwhtTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(method=["butterfly", "kron", "pallas", "auto"] + NATIVE,
                         log2n=[0, 1, 7, 10])
  def test_matches_dense_float64(self, method, log2n):
    n = 1 << log2n
    x = np.random.default_rng(log2n).standard_normal((3, n)).astype(np.float32)
    got = self.variant(lambda v: ops.fwht(v, method=method))(jnp.asarray(x))
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), _ref(x),
                               atol=1e-5 * np.sqrt(n) * max(1, log2n), rtol=0)

  @parameterized.parameters("butterfly", "kron", *NATIVE)
  def test_float32_relative_error_at_2_16(self, method):
    n = 1 << 16
    x = np.random.default_rng(0).standard_normal(n)
    got = jax.jit(lambda v: ops.fwht(v, method=method))(jnp.asarray(x, jnp.float32))
    assert _rel_err(got, _np_fwht(x)) <= 1e-6

  def test_pallas_relative_error_at_2_12(self):
    n = 1 << 12
    x = np.random.default_rng(1).standard_normal(n)
    got = _pallas_hadamard.fwht_pallas(jnp.asarray(x, jnp.float32), interpret=True)
    assert _rel_err(got, _np_fwht(x)) <= 1e-6

  @parameterized.parameters("butterfly", "kron", "pallas", *NATIVE)
  def test_involution_and_linearity(self, method):
    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.standard_normal((2, 256)), jnp.float32) for _ in range(2))
    f = jax.jit(lambda v: ops.fwht(v, method=method, normalize=True))
    np.testing.assert_allclose(f(f(a)), a, atol=2e-6)
    np.testing.assert_allclose(f(2.0 * a - b), 2.0 * f(a) - f(b), atol=2e-5)
    # Parseval for the normalized (orthogonal) transform.
    np.testing.assert_allclose(jnp.sum(f(a) ** 2), jnp.sum(a ** 2), rtol=1e-5)

  @parameterized.parameters("butterfly", "kron", "pallas", *NATIVE)
  def test_vjp_is_fwht(self, method):
    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.standard_normal(128), jnp.float32) for _ in range(2))
    g = jax.grad(lambda v: jnp.vdot(ops.fwht(v, method=method), w))(x)
    np.testing.assert_allclose(g, _ref(np.asarray(w)), atol=1e-4)

  @parameterized.parameters("butterfly", "kron", "pallas", *NATIVE)
  def test_vmap_matches_loop(self, method):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 64)), jnp.float32)
    f = lambda v: ops.fwht(v, method=method)
    np.testing.assert_allclose(jax.vmap(f)(x), jnp.stack([f(r) for r in x]), atol=1e-5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "power of two"):
      ops.fwht(jnp.ones(6))
    with self.assertRaisesRegex(ValueError, "power of two"):
      ops.fwht(jnp.ones(()))
    with self.assertRaisesRegex(ValueError, "method"):
      ops.fwht(jnp.ones(4), method="fft")
    with self.assertRaisesRegex(ValueError, "floating"):
      _pallas_hadamard.fwht_pallas(jnp.ones(4, jnp.int32))

  def test_default_method_by_backend(self):
    assert ops.default_method("cpu") == ("native" if NATIVE else "butterfly")
    assert ops.default_method("gpu") == "pallas"
    assert ops.default_method("tpu") == "kron"
    # 'auto' on integers (no Pallas) still gives the exact transform
    np.testing.assert_array_equal(ops.fwht(jnp.arange(8, dtype=jnp.int32)),
                                  _ref(np.arange(8)).astype(np.int32))

  def test_native_errors(self):
    if not NATIVE:
      self.skipTest("native kernel not built (no C++ compiler)")
    with self.assertRaisesRegex(ValueError, "float32/float64"):
      ops.fwht(jnp.ones(8, jnp.int32), method="native")
    with self.assertRaisesRegex(ValueError, "power of two"):
      ops.fwht(jnp.ones(12), method="native")
    assert not _native.available(jnp.bfloat16)

  @parameterized.parameters((3, 4096), (200, 64), (5, 3, 256), (1, 64))
  def test_pallas_odd_and_non_multiple_leading_shapes(self, *shape):
    """Every row is written when the row count reaching a pass is not a multiple of 128."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    got = np.asarray(_pallas_hadamard.fwht_pallas(jnp.asarray(x, jnp.float32), interpret=True))
    ref = np.stack([_np_fwht(r) for r in x.reshape(-1, shape[-1])]).reshape(shape)
    assert np.all(np.isfinite(got))
    for row, ref_row in zip(got.reshape(-1, shape[-1]), ref.reshape(-1, shape[-1])):
      assert _rel_err(row, ref_row) <= 1e-6

  def test_kron_factors(self):
    for log2n in range(0, 30):
      f = _hadamard.kron_factors(log2n, 7)
      assert int(np.prod(f)) == 1 << log2n and max(f) <= 128
      assert max(f) // min(f) <= 2 or log2n == 0


@pytest.mark.skipif(not NATIVE, reason="native kernel not built (no C++ compiler)")
class NativeFwhtTest(parameterized.TestCase):
  """The C++ kernel's blocking (L1 blocks of 4,096 float32 / 2,048 float64, radix-8/4/2
  combine levels above them) is exercised by lengths on both sides of every boundary."""

  @parameterized.product(log2n=[2, 3, 4, 5, 11, 12, 13, 14, 15, 16, 17, 18],
                         dtype=["float32", "float64"])
  def test_matches_float64_butterfly(self, log2n, dtype):
    x = np.random.default_rng(log2n).standard_normal((2, 1 << log2n))
    with jax.enable_x64(dtype == "float64"):
      got = jax.jit(_native.fwht_native)(jnp.asarray(x, dtype))
      assert got.dtype == jnp.dtype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-13
    for row, ref_row in zip(np.asarray(got), x):
      assert _rel_err(row, _np_fwht(ref_row)) <= tol

  def test_float64_exact_on_integers(self):
    # Integers up to 2^20 stay exact in float64, so the kernel must agree bit for bit.
    x = np.random.default_rng(5).integers(-8, 8, (3, 1 << 14)).astype(np.float64)
    with jax.enable_x64(True):
      got = np.asarray(jax.jit(_native.fwht_native)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.stack([_np_fwht(r) for r in x]))

  def test_batch_axes_and_vmap_over_last_axis(self):
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, 64)), jnp.float32)
    ref = _hadamard.fwht_butterfly(x)
    np.testing.assert_allclose(_native.fwht_native(x), ref, atol=1e-5)
    # vmap whose batch axis is the operand's last axis: the rule moves it out of the way.
    cols = x.reshape(6, 64).T
    got = jax.vmap(_native.fwht_native, in_axes=1, out_axes=1)(cols)
    np.testing.assert_allclose(got, ref.reshape(6, 64).T, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "power of two"):
      _native.fwht_native(jnp.ones((4, 6)))

  def test_input_not_clobbered(self):
    # The call aliases its input buffer; a live input must be copied first, not overwritten.
    x = jnp.asarray(np.random.default_rng(7).standard_normal(1 << 13), jnp.float32)
    keep = np.asarray(x).copy()
    f = jax.jit(lambda v: (_native.fwht_native(v), v + 0.0))
    y, v = f(x)
    np.testing.assert_array_equal(np.asarray(x), keep)
    np.testing.assert_array_equal(np.asarray(v), keep)
    assert _rel_err(y, _np_fwht(keep)) <= 1e-6

  def test_jvp_transpose_and_second_order(self):
    rng = np.random.default_rng(8)
    x, t = (jnp.asarray(rng.standard_normal(32), jnp.float32) for _ in range(2))
    _, tan = jax.jvp(_native.fwht_native, (x,), (t,))
    np.testing.assert_allclose(tan, _ref(np.asarray(t)), atol=1e-4)
    (tr,) = jax.linear_transpose(_native.fwht_native, x)(t)
    np.testing.assert_allclose(tr, _ref(np.asarray(t)), atol=1e-4)
    hess = jax.hessian(lambda v: jnp.sum(_native.fwht_native(v) ** 2))(x)
    np.testing.assert_allclose(hess, 2 * 32 * np.eye(32), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU/TPU backend")
@pytest.mark.parametrize("log2n", [12, 13, 16, 20])
def test_compiled_pallas_kernel_on_accelerator(log2n):
  """The non-interpreted kernel (what 'auto' runs on GPU) vs float64, plus its VJP."""
  x = np.random.default_rng(log2n).standard_normal((2, 1 << log2n))
  got = jax.jit(lambda v: ops.fwht(v))(jnp.asarray(x, jnp.float32))
  assert ops.default_method() != "pallas" or log2n >= 12
  for row, ref_row in zip(np.asarray(got), x):
    assert _rel_err(row, _np_fwht(ref_row)) <= 1e-6
  w = jnp.asarray(x[1], jnp.float32)
  g = jax.jit(jax.grad(lambda v: jnp.vdot(ops.fwht(v), w)))(jnp.asarray(x[0], jnp.float32))
  assert _rel_err(g, _np_fwht(x[1])) <= 1e-6


def _np_fwht(x):
  """Float64 NumPy butterfly (spec Appendix A)."""
  x, h, n = np.asarray(x, np.float64).copy(), 1, x.shape[-1]
  while h < n:
    y = x.reshape(-1, 2, h)
    x = np.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(n)
    h *= 2
  return x


if __name__ == "__main__":
  pytest.main([__file__])
