"""Models: losses/accuracy vs NumPy float64, shapes, finiteness, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import models


def np_ce(logits, y):
  logits = logits.astype(np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, y[..., None], -1)[..., 0]


def test_logistic_loss_and_accuracy_match_numpy():
  rng = np.random.default_rng(0)
  m = models.LogisticRegression(4)
  p = models.init_params(m, np.zeros((1, 3, 2), np.float32), 1)
  p = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
  x = rng.normal(size=(7, 3, 2)).astype(np.float32)
  y = rng.integers(0, 4, 7).astype(np.int32)
  mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  logits = x.reshape(7, 6).astype(np.float64) @ np.asarray(p["Dense_0"]["kernel"], np.float64) \
      + np.asarray(p["Dense_0"]["bias"], np.float64)
  ref = np_ce(logits, y)[mask].mean()
  got = models.classification_loss(m)(p, {"x": x, "y": y}, mask, None)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  acc = (logits.argmax(-1) == y)[mask].mean()
  np.testing.assert_allclose(float(models.accuracy(m)(p, {"x": x, "y": y}, mask)), acc)
  ev = models.evaluate(m, p, {"x": x, "y": y}, batch_size=3)  # 3 batches, last one padded
  np.testing.assert_allclose(ev["loss"], np_ce(logits, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(ev["accuracy"], (logits.argmax(-1) == y).mean())


def test_all_masked_batch_has_zero_loss_and_gradient():
  m = models.MLP(3, hidden=(4,))
  p = models.init_params(m, np.zeros((1, 5), np.float32))
  b = {"x": jnp.ones((2, 5)), "y": jnp.array([0, 1])}
  loss, g = jax.value_and_grad(models.classification_loss(m))(p, b, jnp.zeros(2, bool), None)
  assert float(loss) == 0.0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name,shape,kw", [
    ("mlp", (2, 6), {"hidden": (8,)}),
    ("cnn", (2, 4, 4, 1), {"features": (2, 4), "dense": 8}),
    pytest.param("resnet", (2, 4, 4, 3), {"stage_sizes": (1, 1), "width": 4, "groups": 2},
                 marks=pytest.mark.slow),
])
def test_image_models_shapes_and_finite_grads(name, shape, kw):
  rng = np.random.default_rng(1)
  m = models.create(name, 5, **kw)
  x = rng.normal(size=shape).astype(np.float32)
  p = jax.jit(lambda x: models.init_params(m, x))(x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(p))
  assert m.apply({"params": p}, x).shape == (2, 5)
  y = np.array([1, 4], np.int32)
  loss, g = jax.jit(jax.value_and_grad(models.classification_loss(m)), static_argnums=3)(
      p, {"x": x, "y": y}, np.ones(2, bool), None)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(g))


def test_char_lm_sequence_loss_is_mean_over_positions():
  rng = np.random.default_rng(2)
  m = models.create("char_lm", 11, hidden=8)
  x = rng.integers(0, 11, (3, 5)).astype(np.int32)
  y = rng.integers(0, 11, (3, 5)).astype(np.int32)
  p = models.init_params(m, x)
  logits = np.asarray(m.apply({"params": p}, x))
  assert logits.shape == (3, 5, 11)
  mask = np.array([True, False, True])
  ref = np_ce(logits, y).mean(1)[mask].mean()
  got = models.classification_loss(m)(p, {"x": x, "y": y}, mask, None)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # causal: changing the last token does not change earlier logits
  x2 = x.copy()
  x2[:, -1] = (x2[:, -1] + 1) % 11
  np.testing.assert_allclose(np.asarray(m.apply({"params": p}, x2))[:, :-1], logits[:, :-1],
                             atol=1e-6)


def test_resnet_shapes_without_compiling():
  m = models.create("resnet", 10, stage_sizes=(1, 1), width=8)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  p = jax.eval_shape(lambda x: models.init_params(m, x), x)
  out = jax.eval_shape(lambda p, x: m.apply({"params": p}, x), p, x)
  assert out.shape == (2, 10)
  assert p["_Block_1"]["Conv_0"]["kernel"].shape == (1, 1, 8, 16)  # strided shortcut


def test_create_rejects_unknown_name():
  with pytest.raises(ValueError, match="unknown model"):
    models.create("transformer9000", 3)


@pytest.mark.parametrize("k,padding", [(5, "VALID"), (3, "SAME"), (4, "SAME"), (2, "VALID")])
def test_im2col_cnn_has_the_same_params_and_outputs_as_xla_convs(k, padding):
  x = np.random.default_rng(3).normal(size=(2, 16, 16, 2)).astype(np.float32)
  kw = dict(features=(3, 4), dense=6, kernel_size=k, padding=padding)
  ref, fast = models.CNN(5, **kw), models.CNN(5, conv_impl="im2col", **kw)
  p_ref, p_fast = models.init_params(ref, x, 7), models.init_params(fast, x, 7)
  chex.assert_trees_all_equal(p_ref, p_fast)  # same names, shapes and initial values
  assert p_ref["Conv_1"]["kernel"].shape == (k, k, 3, 4)
  np.testing.assert_allclose(np.asarray(fast.apply({"params": p_ref}, x)),
                             np.asarray(ref.apply({"params": p_ref}, x)), rtol=1e-5, atol=1e-5)
  # a single PatchConv against lax.conv_general_dilated (highest precision), with a bias
  w = np.random.default_rng(4).normal(size=(k, k, 2, 3)).astype(np.float32)
  y = models.PatchConv(3, k, padding).apply({"params": {"kernel": w, "bias": np.ones(3)}}, x)
  want = jax.lax.conv_general_dilated(x, w, (1, 1), padding, precision="highest",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + 1.0
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_lbgm_paper_cnn_has_431080_params():
  m = models.CNN(10, features=(20, 50), dense=500, kernel_size=5, padding="VALID")
  p = jax.eval_shape(lambda x: models.init_params(m, x),
                     jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  assert sum(int(np.prod(l.shape)) for l in jax.tree.leaves(p)) == 431_080  # spec 3.5 / 3.6


def test_cnn_rejects_unknown_conv_impl_and_padding():
  x = np.zeros((1, 6, 6, 1), np.float32)
  with pytest.raises(ValueError, match="conv_impl"):
    models.init_params(models.CNN(2, features=(2,), dense=2, conv_impl="fft"), x)
  with pytest.raises(ValueError, match="padding"):
    models.init_params(models.PatchConv(2, 3, "CIRCULAR"), x)
