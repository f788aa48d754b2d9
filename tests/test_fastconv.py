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


@pytest.mark.parametrize("shape,window", [((3, 7, 9, 4), (2, 2)), ((2, 8, 8, 3), (3, 3)),
                                          ((2, 6, 6, 5), (2, 3))])
def test_max_pool_rewrite_equals_reduce_window_with_ties(shape, window):
  """Non-overlapping max pools: same values and, ties included, the same gradient routing
  (first maximum of each window, as XLA's select_and_scatter); under vmap too."""
  import flax.linen as nn
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  x = jnp.maximum(x.at[0, 0, 0, 0].set(x[0, 0, 1, 0]), 0.0)  # ties: a pair and ReLU zeros
  pool = lambda x: nn.max_pool(x, window, strides=window)  # noqa: E731
  w = jnp.arange(1.0, shape[-1] + 1.0)[None, None, None, :]
  loss = lambda x: jnp.sum(jnp.sin(pool(x)) * w)  # noqa: E731
  rewritten = im2col_convs(loss)
  jaxpr = jax.make_jaxpr(jax.grad(rewritten))(x)
  assert "select_and_scatter" not in str(jaxpr) and "reduce_window" not in str(jaxpr)
  np.testing.assert_array_equal(jax.jit(im2col_convs(pool))(x), jax.jit(pool)(x))
  np.testing.assert_array_equal(jax.jit(jax.grad(rewritten))(x), jax.jit(jax.grad(loss))(x))
  xs = jnp.stack([x, 2 * x])
  np.testing.assert_array_equal(jax.jit(jax.vmap(jax.grad(rewritten)))(xs),
                                jax.vmap(jax.grad(loss))(xs))
  # the float64 reference: the cotangent goes to the first (row-major) max of each window
  g = np.zeros(shape)
  cot = np.cos(np.asarray(pool(x), np.float64)) * np.asarray(w)
  xn = np.asarray(x, np.float64)
  for n, i, j, c in np.ndindex(*cot.shape):
    blk = xn[n, i * window[0]:(i + 1) * window[0], j * window[1]:(j + 1) * window[1], c]
    a, b = np.unravel_index(np.argmax(blk), blk.shape)  # argmax: first maximum
    g[n, i * window[0] + a, j * window[1] + b, c] += cot[n, i, j, c]
  np.testing.assert_allclose(jax.grad(rewritten)(x), g, rtol=1e-6, atol=1e-6)


def test_overlapping_or_padded_pools_are_left_alone():
  """Windows that overlap (stride < window) or pad keep lax's reduce_window."""
  import flax.linen as nn
  x = jnp.ones((1, 5, 5, 2))  # SAME pads 5 -> 6 for 2x2 windows
  for f in (lambda x: nn.max_pool(x, (3, 3), strides=(2, 2)),
            lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")):
    assert "reduce_window_max" in str(jax.make_jaxpr(im2col_convs(f))(x))
    np.testing.assert_array_equal(im2col_convs(f)(x), f(x))
