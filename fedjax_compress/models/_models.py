"""Flax Linen models for federated experiments and their loss/accuracy functions.

Params are the bare `'params'` collection (`model.init(key, x)['params']`), so they are plain
pytrees of float32 arrays. No model keeps batch statistics (the ResNet uses GroupNorm),
because running statistics do not average meaningfully across clients.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress.models import _transformer


class LogisticRegression(nn.Module):
  """Multinomial logistic regression on the flattened input: `logits = W vec(x) + b`."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
  """Fully connected ReLU network on the flattened input."""

  num_classes: int
  hidden: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


def _patches(x: jax.Array, k: int) -> jax.Array:
  """Valid k x k stride-1 patches of NHWC `x`: `[N, H-k+1, W-k+1, k*k*C]`, order (kh, kw, c)."""
  ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
  return jnp.concatenate([x[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)],
                         axis=-1)


class PatchConv(nn.Module):
  """Stride-1 k x k convolution as one matmul over sliced patches (im2col).

  Same parameters (`kernel` HWIO, `bias`), initialisation and outputs as
  `nn.Conv(features, (k, k), padding=padding)`. Under `vmap` with per-example kernels
  (per-client gradients in a federated round) it lowers to batched matmuls, which XLA:CPU
  runs several times faster than the batched-kernel convolution `nn.Conv` becomes.
  """

  features: int
  kernel_size: int = 3
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x):
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.padding == "SAME":
      lo = (k - 1) // 2
      x = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    elif self.padding != "VALID":
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {self.padding!r}")
    y = jnp.tensordot(_patches(x, k), kernel.reshape(k * k * cin, self.features), axes=1)
    return y + bias.reshape((1, 1, 1, self.features))


class CNN(nn.Module):
  """Conv(k x k)-ReLU-MaxPool blocks then a dense layer (EMNIST/CIFAR style); input NHWC.

  Defaults: 3x3 'SAME' convs. `features=(20, 50), dense=500, kernel_size=5,
  padding='VALID'` is the LBGM paper's CNN (431,080 params on 28x28x1 inputs).
  `conv_impl='im2col'` computes the convs with `PatchConv` (same params and outputs as
  the default 'xla' `nn.Conv`, much faster for vmapped per-client gradients on CPU).
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: int = 512
  kernel_size: int = 3
  padding: str = "SAME"
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    for i, f in enumerate(self.features):
      if self.conv_impl == "xla":
        conv = nn.Conv(f, (k, k), padding=self.padding)
      elif self.conv_impl == "im2col":
        conv = PatchConv(f, k, self.padding, name=f"Conv_{i}")
      else:
        raise ValueError(f"conv_impl must be 'xla' or 'im2col', got {self.conv_impl!r}")
      x = nn.relu(conv(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(self.dense)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
  """Pre-activation basic residual block with GroupNorm."""

  features: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(y)
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False)(y)
    y = nn.relu(nn.GroupNorm(num_groups=self.groups)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    return shortcut + y


class ResNet(nn.Module):
  """A small pre-activation ResNet with GroupNorm; `stage_sizes` blocks per stage, widths doubling."""

  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1)
  width: int = 16
  groups: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = _Block(self.width * 2**i, 2 if (i > 0 and j == 0) else 1, self.groups)(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class CharLM(nn.Module):
  """Character language model: embedding, one GRU layer, per-position logits `[B, T, V]`."""

  vocab_size: int
  embed: int = 8
  hidden: int = 128

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.embed)(tokens)
    x = nn.RNN(nn.GRUCell(self.hidden))(x)
    return nn.Dense(self.vocab_size)(x)


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "logistic": LogisticRegression, "mlp": MLP, "cnn": CNN, "resnet": ResNet,
    "char_lm": lambda num_classes, **kw: CharLM(vocab_size=num_classes, **kw),
    "transformer_lm": lambda num_classes, **kw: _transformer.TransformerLM(
        vocab_size=num_classes, **kw),
}


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Model by name: 'logistic', 'mlp', 'cnn', 'resnet' or 'char_lm' (num_classes = vocab), or
  FedJAX's 'emnist_cnn', 'emnist_dense', 'emnist_logistic', 'shakespeare_lstm',
  'stackoverflow_lstm', 'cifar100_logistic', 'cifar100_resnet18' (`_fedjax_models`), or
  'transformer_lm' (GPT-2 style, `TransformerLM`)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
  return _MODELS[name](num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, example_x: Any, key: jax.Array | int = 0) -> Any:
  """The `'params'` collection of `model` initialised on one example batch."""
  key = jax.random.key(key) if isinstance(key, int) else key
  return model.init(key, jnp.asarray(example_x))["params"]


def _per_example_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy per example; sequence logits `[B, T, V]` are averaged over T."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return nll.reshape((nll.shape[0], -1)).mean(axis=1)


def _per_example_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return hit.reshape((hit.shape[0], -1)).mean(axis=1)


def _masked_mean(v: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(v)
  m = mask.astype(jnp.float32)
  return jnp.sum(m * v) / jnp.maximum(jnp.sum(m), 1.0)


def classification_loss(model: nn.Module) -> Callable[..., jax.Array]:
  """`loss_fn(params, batch, mask, key)`: cross-entropy averaged over unmasked examples.

  `batch = {'x': inputs[B, ...], 'y': labels[B] or [B, T]}`, `mask: bool[B]`; `key` is
  unused (no dropout). Loss = `sum_i m_i CE_i / max(1, sum_i m_i)`.

  >>> import numpy as np
  >>> m = LogisticRegression(3)
  >>> p = init_params(m, np.zeros((1, 4), np.float32))
  >>> p = jax.tree.map(jnp.zeros_like, p)
  >>> b = {'x': jnp.ones((2, 4)), 'y': jnp.array([0, 2])}
  >>> round(float(classification_loss(m)(p, b, jnp.array([True, False]), None)), 4)
  1.0986
  """

  def loss_fn(params, batch, mask, key):
    del key
    logits = model.apply({"params": params}, batch["x"])
    return _masked_mean(_per_example_nll(logits, batch["y"]), mask)

  return loss_fn


def accuracy(model: nn.Module) -> Callable[..., jax.Array]:
  """`accuracy_fn(params, batch, mask=None)`: fraction of correct argmax over unmasked examples."""

  def accuracy_fn(params, batch, mask=None):
    logits = model.apply({"params": params}, batch["x"])
    return _masked_mean(_per_example_correct(logits, batch["y"]), mask)

  return accuracy_fn


def evaluate(model: nn.Module, params: Any, data: dict[str, np.ndarray],
             batch_size: int = 1024) -> dict[str, float]:
  """Mean loss and accuracy of `params` on a NumPy eval set, in padded fixed-size batches."""
  n = len(data["y"])
  if n == 0:
    return {"loss": float("nan"), "accuracy": float("nan")}
  bs = min(batch_size, n)
  step = _eval_step(model)
  tot_loss = tot_acc = 0.0
  for s in range(0, n, bs):
    idx = np.arange(s, s + bs)
    mask = idx < n
    batch = {k: v[np.minimum(idx, n - 1)] for k, v in data.items()}
    l, a = step(params, batch, mask)
    tot_loss += float(l)
    tot_acc += float(a)
  return {"loss": tot_loss / n, "accuracy": tot_acc / n}


@functools.lru_cache(maxsize=32)
def _eval_step(model: nn.Module):
  """Jitted masked (sum loss, sum correct) for one batch; cached per model (modules hash by config)."""

  @jax.jit
  def step(params, batch, mask):
    logits = model.apply({"params": params}, batch["x"])
    m = mask.astype(jnp.float32)
    return (jnp.sum(m * _per_example_nll(logits, batch["y"])),
            jnp.sum(m * _per_example_correct(logits, batch["y"])))
  return step
