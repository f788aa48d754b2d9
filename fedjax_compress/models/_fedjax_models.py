"""FedJAX's shipped models as Flax modules, with the same layers, shapes and initialisers.

The parameter counts equal FedJAX 0.0.17's (`tests/test_fedjax_models.py` says how they
were measured). Modules take `(x, train=False)`; `train=True` turns dropout on (needs a
`'dropout'` rng, as `train_loss` passes). Language models output logits over the full
vocabulary, i.e. `num_classes` = the dataset's label count (FedJAX's `vocab_size + 4`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress.models import _models
from fedjax_compress.models._models import PatchConv, _masked_mean


def haiku_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Haiku's default weight init: `N(0, 1 / fan_in)` truncated at 2 std, fan_in = prod(shape[:-1])."""
  fan_in = int(np.prod(shape[:-1]))
  return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / np.sqrt(fan_in)


def _embed_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Haiku's `Embed` init: `N(0, 1)` truncated at 2."""
  return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def _dense(features: int, name: Optional[str] = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=haiku_init, name=name)


class EmnistCNN(nn.Module):
  """FedJAX's EMNIST CNN (Reddi et al. 2020): conv3x3(32)-conv3x3(64) 'VALID', ReLU, maxpool 2,
  dropout 0.25, dense 128 + ReLU, dropout 0.5, dense `num_classes`. 1,206,590 params at 62.

  `conv_impl='im2col'` computes the convs as `PatchConv` matmuls (same params and outputs;
  faster for vmapped per-client gradients on CPU).
  """

  num_classes: int = 62
  dropout: bool = True
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, f in enumerate((32, 64)):
      if self.conv_impl == "xla":
        conv = nn.Conv(f, (3, 3), padding="VALID", kernel_init=haiku_init, name=f"Conv_{i}")
      elif self.conv_impl == "im2col":
        conv = PatchConv(f, 3, "VALID", name=f"Conv_{i}")
      else:
        raise ValueError(f"conv_impl must be 'xla' or 'im2col', got {self.conv_impl!r}")
      x = nn.relu(conv(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    off = not (train and self.dropout)
    x = nn.Dropout(0.25, deterministic=off)(x)
    x = nn.relu(_dense(128)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(0.5, deterministic=off)(x)
    return _dense(self.num_classes)(x)


class EmnistDense(nn.Module):
  """FedJAX's EMNIST dense net: flatten, dense(200)-ReLU x2, dense. 209,662 params at 62."""

  num_classes: int = 62
  hidden: int = 200

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(_dense(self.hidden)(x))
    return _dense(self.num_classes)(x)


class Logistic(nn.Module):
  """FedJAX's logistic models (EMNIST 48,670 params, CIFAR-100 on 24x24x3 172,900)."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return _dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class HaikuLSTMCell(nn.Module):
  """Haiku's LSTM cell: `[i, g, f, o] = W [x; h] + b`, `c' = s(f + 1) c + s(i) tanh(g)`,
  `h' = s(o) tanh(c')` (one `(in + H) x 4H` kernel; forget bias 1 added in the forward pass)."""

  hidden: int

  @nn.compact
  def __call__(self, carry, x):
    c, h = carry
    z = _dense(4 * self.hidden, name="gates")(jnp.concatenate([x, h], axis=-1))
    i, g, f, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


_ScanLSTM = nn.scan(HaikuLSTMCell, variable_broadcast="params", split_rngs={"params": False},
                    in_axes=1, out_axes=1)


def _lstm(x: jax.Array, hidden: int, name: str) -> jax.Array:
  """`[B, T, in] -> [B, T, hidden]` outputs of a zero-initialised `HaikuLSTMCell` scan."""
  zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
  _, out = _ScanLSTM(hidden, name=name)((zeros, zeros), x)
  return out


class ShakespeareLSTM(nn.Module):
  """FedJAX's Shakespeare char LSTM (McMahan et al. 2017): embed 8, 2 x (LSTM 256, tanh), dense.

  `num_classes` = 90 labels of `data.shakespeare_preprocess` (FedJAX's `vocab_size=86` + 4).
  Input `int32[B, T]`, logits `[B, T, num_classes]`. 820,522 params.
  """

  num_classes: int = 90
  embed: int = 8
  hidden: int = 256
  layers: int = 2

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    x = nn.Embed(self.num_classes, self.embed, embedding_init=_embed_init)(tokens)
    for i in range(self.layers):
      x = jnp.tanh(_lstm(x, self.hidden, f"LSTM_{i}"))
    return _dense(self.num_classes)(x)


class StackOverflowLSTM(nn.Module):
  """FedJAX's StackOverflow word LSTM (Reddi et al. 2020): embed 96, LSTM 670 + tanh + dense 96
  per layer, then dense to the vocabulary (or the tied embedding plus a bias).

  `num_classes` = `len(vocab) + 4` (10,004 for FedJAX's default 10,000 words).
  4,050,748 params (3,090,364 with `share_embeddings=True`).
  """

  num_classes: int = 10004
  embed: int = 96
  hidden: int = 670
  layers: int = 1
  share_embeddings: bool = False

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    emb = nn.Embed(self.num_classes, self.embed, embedding_init=_embed_init)
    x = emb(tokens)
    for i in range(self.layers):
      x = _dense(self.embed, name=f"Project_{i}")(jnp.tanh(_lstm(x, self.hidden, f"LSTM_{i}")))
    if self.share_embeddings:
      bias = self.param("output_bias", nn.initializers.zeros_init(), (self.num_classes,))
      logits = emb.attend(x)
      return logits + bias.reshape((1,) * (logits.ndim - 1) + (-1,))
    return _dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  """ResNet basic block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN, projection shortcut on change."""

  features: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding="SAME",  # noqa: E731
                                         use_bias=False, name=name)
    y = conv(self.features, 3, self.stride, "conv1")(x)
    y = nn.relu(nn.GroupNorm(num_groups=self.groups, name="norm1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = nn.GroupNorm(num_groups=self.groups, name="norm2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, "proj")(x)
      x = nn.GroupNorm(num_groups=self.groups, name="proj_norm")(x)
    return nn.relu(x + y)


class ResNet18GN(nn.Module):
  """ResNet-18 with GroupNorm (2 groups) for federated CIFAR-100 (Reddi et al. 2020, TFF's task).

  Stem conv7x7(64)/2 + GN + ReLU + maxpool3x3/2, stages of 2 basic blocks at 64/128/256/512
  channels (stride 2 from the second), global average pool, dense. 11,227,812 params at 100
  classes, torchvision's `resnet18` layer for layer (no batch statistics to average).
  """

  num_classes: int = 100
  groups: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(64, (7, 7), (2, 2), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="stem_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, f in enumerate((64, 128, 256, 512)):
      for j in range(2):
        x = _BasicBlock(f, 2 if (i > 0 and j == 0) else 1, self.groups,
                        name=f"stage{i}_block{j}")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def _per_token(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def train_loss(model: nn.Module, *, pad_label: Optional[int] = None,
               token_reduction: str = "mean") -> Callable[..., jax.Array]:
  """FedJAX's training losses as `loss_fn(params, batch, mask, key)` for `build_round`.

  Runs `model(x, train=True)` with the `key` as the dropout rng (`key=None`: no dropout).
  Classification: mean cross-entropy over unmasked examples. Sequences (`y: [B, T]`):
  per-token CE with `y == pad_label` tokens zeroed, reduced over T by `token_reduction`
  'mean' (FedJAX's Shakespeare: `sum_t CE_t [y_t != pad] / T`) or 'sum' (StackOverflow's
  sentence loss), then the masked mean over examples.
  """
  if token_reduction not in ("mean", "sum"):
    raise ValueError(f"token_reduction must be 'mean' or 'sum', got {token_reduction!r}")

  def loss_fn(params, batch, mask, key):
    train = key is not None
    logits = model.apply({"params": params}, batch["x"], train=train,
                         rngs={"dropout": key} if train else None)
    nll = _per_token(logits, batch["y"])
    if nll.ndim > 1:
      if pad_label is not None:
        nll = jnp.where(batch["y"] == pad_label, 0.0, nll)
      nll = nll.reshape((nll.shape[0], -1))
      nll = nll.mean(axis=1) if token_reduction == "mean" else nll.sum(axis=1)
    return _masked_mean(nll, mask)

  return loss_fn


FEDJAX_MODELS: dict[str, Callable[..., nn.Module]] = {
    "emnist_cnn": EmnistCNN, "emnist_dense": EmnistDense, "emnist_logistic": Logistic,
    "cifar100_logistic": Logistic, "cifar100_resnet18": ResNet18GN,
    "shakespeare_lstm": ShakespeareLSTM, "stackoverflow_lstm": StackOverflowLSTM,
}
_models._MODELS.update(FEDJAX_MODELS)  # pylint: disable=protected-access  (models.create by name)


def _haiku_order(name: str) -> tuple[str, int]:
  """`'linear_2'` -> ('linear', 2); `'lstm'` -> ('lstm', 0) (Haiku's creation-order suffixes)."""
  base, _, num = name.rpartition("_")
  return (base, int(num)) if num.isdigit() and base else (name, 0)


def from_fedjax_params(name: str, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """FedJAX (Haiku) params of model `name` -> the params of `create(name, ...)`'s module.

  Haiku modules are mapped in creation order: `conv2_d*` -> `Conv_i`, `linear*` ->
  `Dense_i` (StackOverflow: the per-layer projections `Project_i`, then the output
  `Dense_0`), `lstm*/linear` -> `LSTM_i/gates`, `embed` -> `Embed_0`, `bias` ->
  `output_bias`; `w`/`b`/`embeddings` -> `kernel`/`bias`/`embedding`. Arrays are copied.
  """
  if name not in FEDJAX_MODELS or name == "cifar100_resnet18":
    raise ValueError(f"name must be one of FedJAX's models "
                     f"{sorted(set(FEDJAX_MODELS) - {'cifar100_resnet18'})}, got {name!r}")
  groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
  for path, leaves in params.items():
    mod = path.split("/")
    key = mod[-2] if mod[-1] == "linear" and len(mod) > 1 and mod[-2].startswith("lstm") \
        else mod[-1]
    base, idx = _haiku_order(key)
    groups.setdefault(base, []).append((idx, dict(leaves)))
  for g in groups.values():
    g.sort(key=lambda t: t[0])
  rename = {"w": "kernel", "b": "bias", "embeddings": "embedding"}
  conv = lambda d: {rename[k]: np.array(v) for k, v in d.items()}  # noqa: E731
  out: dict[str, Any] = {}
  for i, (_, d) in enumerate(groups.pop("conv2_d", [])):
    out[f"Conv_{i}"] = conv(d)
  for i, (_, d) in enumerate(groups.pop("lstm", [])):
    out[f"LSTM_{i}"] = {"gates": conv(d)}
  for _, d in groups.pop("embed", []):
    out["Embed_0"] = conv(d)
  for _, d in groups.pop("bias", []):
    out["output_bias"] = np.array(d["b"])
  linears = [conv(d) for _, d in groups.pop("linear", [])]
  if name == "stackoverflow_lstm":
    layers = sum(k.startswith("LSTM_") for k in out)
    for i in range(layers):
      out[f"Project_{i}"] = linears[i]
    linears = linears[layers:]
  for i, d in enumerate(linears):
    out[f"Dense_{i}"] = d
  if groups:
    raise ValueError(f"unrecognised Haiku modules {sorted(groups)} for model {name!r}")
  return out
