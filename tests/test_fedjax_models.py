"""FedJAX's shipped models as Flax modules: parameter counts, float64 NumPy forward references
from FedJAX-layout (Haiku) parameters, FedJAX's training losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import models

# Parameter counts of FedJAX 0.0.17's models, measured once in /work/peer_venv (FedJAX 0.0.17,
# Haiku 0.0.17, jax 0.5.3) with
#   p = model.init(jax.random.PRNGKey(0)); sum(x.size for x in jax.tree_util.tree_leaves(p))
# for fedjax.models.emnist.create_conv_model() / create_conv_model(only_digits=True) /
# create_dense_model() / create_logistic_model(), shakespeare.create_lstm_model(),
# stackoverflow.create_lstm_model() / (share_input_output_embeddings=True) and
# cifar100.create_logistic_model(). FedJAX ships no CIFAR-100 ResNet; the ResNet-18 (GroupNorm)
# of Reddi et al. / TFF's CIFAR-100 task is torchvision's resnet18 layer for layer, whose
# documented count 11,689,512 (1000 classes) gives 11,689,512 - 513 * 1000 + 513 * 100.
FEDJAX_COUNTS = [
    ("emnist_cnn", 62, {}, (1, 28, 28, 1), 1_206_590),
    ("emnist_cnn", 10, {}, (1, 28, 28, 1), 1_199_882),
    ("emnist_dense", 62, {}, (1, 28, 28, 1), 209_662),
    ("emnist_logistic", 62, {}, (1, 28, 28, 1), 48_670),
    ("shakespeare_lstm", 90, {}, (1, 1), 820_522),
    ("stackoverflow_lstm", 10_004, {}, (1, 1), 4_050_748),
    ("stackoverflow_lstm", 10_004, {"share_embeddings": True}, (1, 1), 3_090_364),
    ("cifar100_logistic", 100, {}, (1, 24, 24, 3), 172_900),
    ("cifar100_resnet18", 100, {}, (1, 24, 24, 3), 11_689_512 - 513 * 1000 + 513 * 100),
]


@pytest.mark.parametrize("name,classes,kw,shape,count", FEDJAX_COUNTS)
def test_parameter_counts_equal_fedjax(name, classes, kw, shape, count):
  m = models.create(name, classes, **kw)
  dtype = jnp.int32 if "lstm" in name else jnp.float32
  p = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(shape, dtype)))["params"]
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) == count


def _sig(x):
  return 1 / (1 + np.exp(-x))


def _ref_lstm(x, w, b):
  """Haiku LSTM over [B, T, in] in float64: gates i, g, f, o of W [x; h] + b, forget bias 1."""
  hsz = b.shape[0] // 4
  c = h = np.zeros((x.shape[0], hsz))
  outs = []
  for t in range(x.shape[1]):
    z = np.concatenate([x[:, t], h], 1) @ w + b
    i, g, f, o = np.split(z, 4, axis=1)
    c = _sig(f + 1) * c + _sig(i) * np.tanh(g)
    h = _sig(o) * np.tanh(c)
    outs.append(h)
  return np.stack(outs, 1)


def _hk(rng, shapes):
  return {mod: {k: rng.normal(0, 0.5, s) for k, s in leaves.items()}
          for mod, leaves in shapes.items()}


def _to32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_shakespeare_lstm_matches_float64_haiku_reference():
  rng = np.random.default_rng(0)
  v, e, hsz = 7, 3, 4
  hk = _hk(rng, {"embed": {"embeddings": (v, e)}, "lstm/linear": {"w": (e + hsz, 4 * hsz),
                                                                  "b": (4 * hsz,)},
                 "lstm_1/linear": {"w": (2 * hsz, 4 * hsz), "b": (4 * hsz,)},
                 "linear": {"w": (hsz, v), "b": (v,)}})
  tokens = rng.integers(0, v, (2, 5))
  m = models.create("shakespeare_lstm", v, embed=e, hidden=hsz)
  got = m.apply({"params": _to32(models.from_fedjax_params("shakespeare_lstm", hk))},
                jnp.asarray(tokens, jnp.int32))
  x = hk["embed"]["embeddings"][tokens]
  for mod in ("lstm/linear", "lstm_1/linear"):
    x = np.tanh(_ref_lstm(x, hk[mod]["w"], hk[mod]["b"]))
  ref = x @ hk["linear"]["w"] + hk["linear"]["b"]
  assert got.shape == (2, 5, v)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_stackoverflow_lstm_matches_float64_haiku_reference(shared):
  rng = np.random.default_rng(1)
  v, e, hsz = 9, 3, 5
  shapes = {"embed": {"embeddings": (v, e)},
            "lstm/linear": {"w": (e + hsz, 4 * hsz), "b": (4 * hsz,)},
            "linear": {"w": (hsz, e), "b": (e,)},  # the layer's projection back to `embed`
            "lstm_1/linear": {"w": (e + hsz, 4 * hsz), "b": (4 * hsz,)},
            "linear_1": {"w": (hsz, e), "b": (e,)}}
  shapes.update({"bias": {"b": (v,)}} if shared else {"linear_2": {"w": (e, v), "b": (v,)}})
  hk = _hk(rng, shapes)
  tokens = rng.integers(0, v, (3, 4))
  m = models.create("stackoverflow_lstm", v, embed=e, hidden=hsz, layers=2,
                    share_embeddings=shared)
  got = m.apply({"params": _to32(models.from_fedjax_params("stackoverflow_lstm", hk))},
                jnp.asarray(tokens, jnp.int32))
  emb = hk["embed"]["embeddings"]
  x = emb[tokens]
  for lstm, proj in (("lstm/linear", "linear"), ("lstm_1/linear", "linear_1")):
    x = np.tanh(_ref_lstm(x, hk[lstm]["w"], hk[lstm]["b"])) @ hk[proj]["w"] + hk[proj]["b"]
  ref = (x @ emb.T + hk["bias"]["b"]) if shared else (x @ hk["linear_2"]["w"]
                                                      + hk["linear_2"]["b"])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _ref_conv_valid(x, w, b):
  k = w.shape[0]
  ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(k):
    for j in range(k):
      out += np.einsum("nhwc,cf->nhwf", x[:, i:i + ho, j:j + wo], w[i, j])
  return out + b


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
def test_emnist_cnn_matches_float64_reference_and_dropout(conv_impl):
  rng = np.random.default_rng(2)
  hk = _hk(rng, {"conv_dropout_module/conv2_d": {"w": (3, 3, 1, 32), "b": (32,)},
                 "conv_dropout_module/conv2_d_1": {"w": (3, 3, 32, 64), "b": (64,)},
                 "conv_dropout_module/linear": {"w": (2 * 2 * 64, 128), "b": (128,)},
                 "conv_dropout_module/linear_1": {"w": (128, 10), "b": (10,)}})
  hk = {k: {n: a / 4 for n, a in d.items()} for k, d in hk.items()}
  x = rng.random((2, 8, 8, 1))  # 8x8 inputs keep the reference small: 6 -> 4 -> pool 2
  m = models.create("emnist_cnn", 10, conv_impl=conv_impl)
  p = _to32(models.from_fedjax_params("emnist_cnn", hk))
  got = m.apply({"params": p}, jnp.asarray(x, jnp.float32))
  g = {k.split("/")[-1]: v for k, v in hk.items()}
  y = np.maximum(_ref_conv_valid(x, g["conv2_d"]["w"], g["conv2_d"]["b"]), 0)
  y = np.maximum(_ref_conv_valid(y, g["conv2_d_1"]["w"], g["conv2_d_1"]["b"]), 0)
  y = y.reshape(2, 2, 2, 2, 2, 64).max(axis=(2, 4)).reshape(2, -1)
  y = np.maximum(y @ g["linear"]["w"] + g["linear"]["b"], 0)
  ref = y @ g["linear_1"]["w"] + g["linear_1"]["b"]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # dropout only with train=True and a 'dropout' rng; reproducible by key
  k = jax.random.key(3)
  a = m.apply({"params": p}, jnp.asarray(x, jnp.float32), train=True, rngs={"dropout": k})
  b = m.apply({"params": p}, jnp.asarray(x, jnp.float32), train=True, rngs={"dropout": k})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, got)
  off = models.create("emnist_cnn", 10, dropout=False, conv_impl=conv_impl)
  np.testing.assert_allclose(off.apply({"params": p}, jnp.asarray(x, jnp.float32), train=True),
                             got, rtol=1e-6, atol=1e-6)


class _Bigram(nn.Module):
  """Next-token logits straight from an embedding table (a cheap sequence model)."""

  vocab: int

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    return nn.Embed(self.vocab, self.vocab)(tokens)


def test_train_loss_matches_fedjax_reductions():
  rng = np.random.default_rng(4)
  v = 6
  m = _Bigram(v)
  tokens = jnp.asarray(rng.integers(0, v, (3, 4)), jnp.int32)
  p = models.init_params(m, tokens, 0)
  y = np.array([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 1, 2]])
  batch = {"x": tokens, "y": jnp.asarray(y, jnp.int32)}
  mask = jnp.array([True, True, False])
  logp = np.asarray(jax.nn.log_softmax(m.apply({"params": p}, tokens)), np.float64)
  ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0] * (y != 0)
  want_mean = ce[:2].mean(1).mean()  # FedJAX Shakespeare: sum over real tokens / T
  want_sum = ce[:2].sum(1).mean()  # FedJAX StackOverflow: sentence loss
  got_mean = models.train_loss(m, pad_label=0)(p, batch, mask, None)
  got_sum = models.train_loss(m, pad_label=0, token_reduction="sum")(p, batch, mask, None)
  np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  unmasked = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  np.testing.assert_allclose(models.train_loss(m)(p, batch, mask, jax.random.key(0)),
                             unmasked[:2].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="token_reduction"):
    models.train_loss(m, token_reduction="max")
  # classification: equals models.classification_loss without dropout (key None)
  cls = models.create("emnist_logistic", 5)
  xb = {"x": jnp.asarray(rng.random((4, 3, 3, 1)), jnp.float32),
        "y": jnp.asarray([0, 1, 4, 2], jnp.int32)}
  pc = models.init_params(cls, xb["x"], 1)
  mk = jnp.array([True, False, True, True])
  np.testing.assert_allclose(models.train_loss(cls)(pc, xb, mk, None),
                             models.classification_loss(cls)(pc, xb, mk, None), rtol=1e-6)


def test_resnet18_forward_shapes_and_converter_errors():
  m = models.create("cifar100_resnet18", 100)
  x = jnp.zeros((2, 24, 24, 3))
  out = jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x), x))
  assert out.shape == (2, 100)
  variables = jax.eval_shape(lambda: m.init(jax.random.key(0), x))
  assert set(variables) == {"params"}  # GroupNorm: no batch statistics to average
  norms = [k for k in jax.tree_util.tree_flatten_with_path(variables)[0]
           if "norm" in jax.tree_util.keystr(k[0])]
  assert len(norms) == 2 * (1 + 2 * 8 + 3)  # scale and bias of stem, 16 block, 3 shortcut GNs
  with pytest.raises(ValueError, match="name must be one of"):
    models.from_fedjax_params("cifar100_resnet18", {})
  with pytest.raises(ValueError, match="unrecognised"):
    models.from_fedjax_params("emnist_dense", {"gru": {"w": np.zeros(1)}})
  with pytest.raises(ValueError, match="conv_impl"):
    models.create("emnist_cnn", 62, conv_impl="fft").init(jax.random.key(0),
                                                         jnp.zeros((1, 8, 8, 1)))


def test_haiku_init_statistics():
  w = np.asarray(models.haiku_init(jax.random.key(0), (400, 300)))
  assert np.abs(w).max() <= 2 / np.sqrt(400) + 1e-7  # truncated at 2 std
  # variance of N(0, 1) truncated at +-2 is 0.7737
  np.testing.assert_allclose(w.var() * 400, 0.7737, rtol=0.02)
