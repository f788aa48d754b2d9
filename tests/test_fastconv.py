"""`models.im2col_convs`: convolutions rewritten as slices + matmul equal lax's, with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_compress.models import _fastconv
from fedjax_compress.models._fastconv import im2col_convs

CASES = {
    "nhwc_same": ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"), 1, (1, 1)),
    "nchw_strided": ((2, 4, 9, 11), (6, 4, 3, 2), (2, 1), "VALID", ("NCHW", "OIHW", "NCHW"), 1,
                     (1, 1)),
    "grouped_dilated_pad": ((2, 10, 10, 4), (3, 3, 2, 8), (1, 2), ((1, 2), (0, 1)),
                            ("NHWC", "HWIO", "NHWC"), 2, (2, 1)),
    "depthwise_1d": ((3, 12, 5), (3, 1, 10), (1,), "SAME", ("NWC", "WIO", "NWC"), 5, (1,)),
    "3d": ((1, 6, 6, 6, 2), (2, 2, 2, 2, 3), (1, 1, 1), "VALID",
           ("NDHWC", "DHWIO", "NDHWC"), 1, (1, 1, 1)),
}


def _conv(c):
  _, _, strides, padding, dn, groups, rdil = c
  return lambda x, w: lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rdil,
                                               dimension_numbers=dn,
                                               feature_group_count=groups)


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_match_lax(name):
  c = CASES[name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=c[0]), jnp.float32)
  w = jnp.asarray(rng.normal(size=c[1]), jnp.float32)
  conv = _conv(c)
  f = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
  ref = jax.value_and_grad(f, argnums=(0, 1))(x, w)
  got = jax.jit(jax.value_and_grad(im2col_convs(f), argnums=(0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-4)
  text = jax.jit(im2col_convs(f)).lower(x, w).as_text()
  assert "convolution" not in text


def test_rewrites_inside_jit_scan_and_vmap():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  conv = jax.jit(_conv(CASES["nhwc_same"]))

  def f(w, xs):  # a scan over steps whose body calls a jitted convolution
    def body(c, xb):
      return c + jnp.sum(conv(xb, w) ** 2), None
    return lax.scan(body, 0.0, xs)[0]

  ref = jax.vmap(jax.grad(f), in_axes=(None, 0))(w, x[:, None])
  fn = jax.jit(jax.vmap(jax.grad(im2col_convs(f)), in_axes=(None, 0)))
  np.testing.assert_allclose(np.asarray(fn(w, x[:, None])), np.asarray(ref), rtol=1e-4,
                             atol=1e-3)
  assert "convolution" not in fn.lower(w, x[:, None]).as_text()


def test_functions_without_convs_and_pytrees_pass_through():
  f = lambda p, x: {"y": jnp.tanh(p["a"] * x), "n": jnp.sum(x)}  # noqa: E731
  p, x = {"a": jnp.arange(3.0)}, jnp.ones(3)
  out = im2col_convs(f)(p, x)
  np.testing.assert_allclose(out["y"], f(p, x)["y"])
  assert not _fastconv.has_conv(jax.make_jaxpr(f)(p, x).jaxpr)
  with pytest.raises(ValueError, match="conv_impl"):
    _fastconv.with_conv_impl(f, "cudnn")
