"""tensorflow_datasets loaders (optional `data` extra), imported lazily.

Image datasets (emnist, cifar10, cifar100, fashion_mnist, mnist, ...) are split into clients
with `partition_iid` or `partition_dirichlet`; `tiny_shakespeare` is split by speaking role
into next-character prediction sequences. Nothing is downloaded unless `download=True`.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData, from_partition
from fedjax_compress.data._partition import partition_dirichlet, partition_iid

_ROLE = re.compile(r"^([A-Z][A-Za-z' ]{0,40}):$")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "load_tfds needs tensorflow_datasets; install the data extra: "
        "pip install 'fedjax_compress[data]' (the built-in offline dataset is "
        "fedjax_compress.data.synthetic)") from e
  return tfds


def split_by_role(text: str) -> dict[str, str]:
  """Group a play's lines by speaker: a line `NAME:` starts a speech that runs to a blank line.

  >>> split_by_role("ALICE:\\nHi there.\\n\\nBOB:\\nHello.\\n\\nALICE:\\nBye.\\n")
  {'ALICE': 'Hi there.\\nBye.\\n', 'BOB': 'Hello.\\n'}
  """
  roles: dict[str, list[str]] = {}
  speaker = None
  for line in text.splitlines():
    m = _ROLE.match(line.strip())
    if m:
      speaker = m.group(1)
      roles.setdefault(speaker, [])
    elif not line.strip():
      speaker = None
    elif speaker is not None:
      roles[speaker].append(line + "\n")
  return {k: "".join(v) for k, v in roles.items() if v}


def char_sequences(text: str, vocab: str, seq_len: int) -> dict[str, np.ndarray]:
  """Non-overlapping windows: `x = ids[i:i+T]`, `y = ids[i+1:i+T+1]` (unknown chars -> 0).

  >>> char_sequences("abcab", "abc", 2)['y'].tolist()
  [[1, 2], [0, 1]]
  """
  table = {c: i for i, c in enumerate(vocab)}
  ids = np.array([table.get(c, 0) for c in text], np.int32)
  n = (len(ids) - 1) // seq_len
  x = ids[:n * seq_len].reshape(n, seq_len)
  y = ids[1:n * seq_len + 1].reshape(n, seq_len)
  return {"x": x, "y": y}


def _load_split(tfds, name, split, data_dir, download):
  try:
    return tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, data_dir=data_dir,
                                   download=download))
  except Exception as e:  # tfds raises several types for absent data
    raise FileNotFoundError(
        f"tfds dataset {name!r} split {split!r} is not available in data_dir={data_dir!r} "
        f"({type(e).__name__}: {e}); prepare it once with download=True on a machine "
        "with network access") from e


def load_tfds(name: str, *, data_dir: Optional[str] = None, num_clients: int = 100,
              partition: str = "dirichlet", alpha: float = 0.5, seq_len: int = 80,
              download: bool = False, seed: int = 0) -> FederatedData:
  """Load a tfds dataset as `FederatedData`.

  Images become float32 in [0, 1] (`x: [n, H, W, C]`, `y: int32[n]`), split into
  `num_clients` clients by `partition` ('dirichlet' with `alpha`, or 'iid'); the test split
  is the pooled evaluation set. `tiny_shakespeare` becomes one client per speaking role of
  the train split, with `seq_len` character windows (`num_clients`/`partition` ignored).
  Raises `ImportError` naming the `data` extra when tensorflow_datasets is missing and
  `FileNotFoundError` when the data are absent and `download=False`.
  """
  if partition not in ("dirichlet", "iid"):
    raise ValueError(f"partition must be 'dirichlet' or 'iid', got {partition!r}")
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  seq_len = checks.check_positive_int(seq_len, "seq_len")
  tfds = _import_tfds()
  if name == "tiny_shakespeare":
    train = _load_split(tfds, name, "train", data_dir, download)["text"][0].decode()
    test = _load_split(tfds, name, "test", data_dir, download)["text"][0].decode()
    vocab = "".join(sorted(set(train)))
    clients = [char_sequences(t, vocab, seq_len) for t in split_by_role(train).values()]
    clients = [c for c in clients if len(c["x"])]
    return FederatedData(clients, char_sequences(test, vocab, seq_len), len(vocab), name)
  train = _load_split(tfds, name, "train", data_dir, download)
  test = _load_split(tfds, name, "test", data_dir, download)
  prep = lambda d: {"x": np.asarray(d["image"], np.float32) / 255.0,  # noqa: E731
                    "y": np.asarray(d["label"], np.int32)}
  train, test = prep(train), prep(test)
  num_classes = int(max(train["y"].max(), test["y"].max())) + 1
  if partition == "iid":
    parts = partition_iid(len(train["y"]), num_clients, seed)
  else:
    parts = partition_dirichlet(train["y"], num_clients, alpha, seed)
  return from_partition(train, parts, test, num_classes, name)
