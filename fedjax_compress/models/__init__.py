"""Flax Linen models and loss/accuracy helpers for federated training.

Public API:
  - `LogisticRegression(num_classes)`, `MLP(num_classes, hidden=(200, 200))`,
    `CNN(num_classes, features=(32, 64), dense=512, kernel_size=3, padding='SAME',
    conv_impl='xla')` (the LBGM paper's CNN: `features=(20, 50), dense=500, kernel_size=5,
    padding='VALID'`), `PatchConv(features, kernel_size=3, padding='SAME')` (im2col conv),
    `ResNet(num_classes, stage_sizes=(1, 1, 1), width=16, groups=4)` (GroupNorm),
    `CharLM(vocab_size, embed=8, hidden=128)` (GRU),
    `TransformerLM(vocab_size, width=768, layers=12, heads=12, max_len=1024)` (GPT-2 style;
    `TransformerLM.gpt2_small()` has `GPT2_SMALL_PARAMS` = 124,439,808 parameters).
  - `im2col_convs(fn)`: `fn` with its convolutions computed as matmuls and its
    non-overlapping max pools as reshape + max (what the simulator does on CPU by default,
    `build_round(conv_impl=...)`).
  - `create(name, num_classes, **kwargs)`, `init_params(model, example_x, key=0)`.
  - `classification_loss(model) -> loss_fn(params, batch, mask, key)`,
    `accuracy(model) -> accuracy_fn(params, batch, mask=None)`,
    `evaluate(model, params, data, batch_size=1024) -> {'loss', 'accuracy'}`.
  - FedJAX's models (same layers and parameter counts): `EmnistCNN`, `EmnistDense`,
    `Logistic`, `ShakespeareLSTM`, `StackOverflowLSTM`, `ResNet18GN` (CIFAR-100), by name in
    `create`; `train_loss(model, pad_label=None, token_reduction='mean')` (FedJAX's losses,
    dropout on); `from_fedjax_params(name, haiku_params)` converts FedJAX checkpoints.
"""

from fedjax_compress.models._fastconv import im2col_convs
from fedjax_compress.models._transformer import GPT2_SMALL_PARAMS, TransformerLM
from fedjax_compress.models._models import (CNN, MLP, CharLM, LogisticRegression, PatchConv,
                                            ResNet, accuracy, classification_loss, create,
                                            evaluate, init_params)
from fedjax_compress.models._fedjax_models import (EmnistCNN, EmnistDense, HaikuLSTMCell,
                                                    Logistic, ResNet18GN, ShakespeareLSTM,
                                                    StackOverflowLSTM, from_fedjax_params,
                                                    haiku_init, train_loss)

__all__ = ["LogisticRegression", "MLP", "CNN", "PatchConv", "ResNet", "CharLM", "create",
           "init_params", "classification_loss", "accuracy", "evaluate", "EmnistCNN",
           "EmnistDense", "Logistic", "ShakespeareLSTM", "StackOverflowLSTM", "ResNet18GN",
           "HaikuLSTMCell", "haiku_init", "train_loss", "from_fedjax_params"]
