"""LEAF JSON federated datasets (FEMNIST, Shakespeare, Sent140) as `FederatedData`.

LEAF writes each split as one or more JSON files `{"users": [u, ...], "num_samples": [n,
...], "user_data": {u: {"x": [...], "y": [...]}}}` (optionally `"hierarchies"`), users being
FEMNIST writers, Shakespeare speaking roles or Sent140 Twitter users. A split is a directory
of such files (read in sorted order) or a list of file paths. Users of the train split become
clients, in file order; the test split is pooled into `FederatedData.test`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData

Paths = Union[str, Sequence[str]]

# LEAF's Shakespeare alphabet (80 characters); a character's label is its index in it.
LEAF_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                "abcdefghijklmnopqrstuvwxyz}")
_WORDS = re.compile(r"[\w']+|[.,!?;]")


def _files(paths: Paths) -> list[str]:
  if isinstance(paths, str):
    if os.path.isdir(paths):
      found = sorted(os.path.join(paths, f) for f in os.listdir(paths) if f.endswith(".json"))
      if not found:
        raise FileNotFoundError(f"no .json files in the LEAF directory {paths!r}")
      return found
    paths = [paths]
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"no LEAF JSON file at {p!r}")
  return list(paths)


def iter_leaf_users(paths: Paths) -> Iterator[tuple[str, dict[str, list]]]:
  """`(user, {'x': [...], 'y': [...]})` of LEAF JSON files, one file in memory at a time."""
  for path in _files(paths):
    with open(path, encoding="utf-8") as f:
      blob = json.load(f)
    missing = {"users", "user_data"} - set(blob)
    if missing:
      raise ValueError(f"{path!r} is not a LEAF JSON file (missing {sorted(missing)})")
    sizes = blob.get("num_samples", [None] * len(blob["users"]))
    for user, n in zip(blob["users"], sizes):
      ud = blob["user_data"][user]
      if n is not None and len(ud["y"]) != n:
        raise ValueError(f"{path!r}: user {user!r} has {len(ud['y'])} examples, num_samples "
                         f"says {n}")
      yield user, ud


def leaf_char_ids(text: str) -> np.ndarray:
  """LEAF's character labels (index in `LEAF_LETTERS`; unknown characters -> 80).

  >>> leaf_char_ids("Hi~").tolist()
  [32, 61, 80]
  """
  table = {c: i for i, c in enumerate(LEAF_LETTERS)}
  return np.array([table.get(c, len(LEAF_LETTERS)) for c in text], np.int32)


def leaf_words(line: str) -> list[str]:
  """LEAF's Sent140 word split: runs of word characters/apostrophes and `.,!?;` marks.

  >>> leaf_words("can't wait!! see u @ 5pm")
  ["can't", 'wait', '!', '!', 'see', 'u', '5pm']
  """
  return _WORDS.findall(line)


def _femnist(ud: dict, invert: bool) -> dict[str, np.ndarray]:
  x = np.asarray(ud["x"], np.float32)
  if x.size and (x.ndim != 2 or x.shape[1] != 784):
    raise ValueError(f"FEMNIST rows must hold 784 pixels, got x of shape {x.shape}")
  x = x.reshape(-1, 28, 28, 1)
  return {"x": 1.0 - x if invert else x, "y": np.asarray(ud["y"], np.int32)}


def _shakespeare(ud: dict, targets: str) -> dict[str, np.ndarray]:
  lengths = {len(s) for s in ud["x"]}
  if len(lengths) > 1:
    raise ValueError(f"Shakespeare rows of one user must share a length, got {sorted(lengths)}")
  if any(len(c) != 1 for c in ud["y"]):
    raise ValueError("Shakespeare targets y must be single characters")
  width = lengths.pop() if lengths else 80
  x = (np.stack([leaf_char_ids(s) for s in ud["x"]]) if ud["x"]
       else np.zeros((0, width), np.int32))
  y = np.array([leaf_char_ids(c)[0] for c in ud["y"]], np.int32)
  if targets == "last":
    return {"x": x, "y": y}
  return {"x": x, "y": np.concatenate([x[:, 1:], y[:, None]], axis=1)}


def _tweet(row: Any) -> str:
  """LEAF stores a Sent140 example as `[id, date, query, user, text]`; the text is last."""
  return str(row[4]) if isinstance(row, (list, tuple)) else str(row)


def _sent140(ud: dict, table: dict[str, int], max_words: int) -> dict[str, np.ndarray]:
  unk = len(table)
  x = np.full((len(ud["x"]), max_words), unk, np.int32)
  for i, row in enumerate(ud["x"]):
    ids = [table.get(w, unk) for w in leaf_words(_tweet(row))[:max_words]]
    x[i, :len(ids)] = ids
  return {"x": x, "y": np.asarray(ud["y"], np.int32)}


def sent140_vocab(paths: Paths, size: int) -> list[str]:
  """The `size` most frequent LEAF words of Sent140 tweets (ties by word), streamed."""
  size = checks.check_positive_int(size, "size")
  counts: dict[str, int] = {}
  for _, ud in iter_leaf_users(paths):
    for row in ud["x"]:
      for w in leaf_words(_tweet(row)):
        counts[w] = counts.get(w, 0) + 1
  return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def _converter(dataset: str, train: Paths, invert: bool, targets: str,
               vocab: Optional[Sequence[str]], vocab_size: int, max_words: int
               ) -> tuple[Callable[[dict], dict[str, np.ndarray]], int]:
  if dataset not in ("femnist", "shakespeare", "sent140"):
    raise ValueError(f"dataset must be 'femnist', 'shakespeare' or 'sent140', got {dataset!r}")
  if targets not in ("sequence", "last"):
    raise ValueError(f"targets must be 'sequence' or 'last', got {targets!r}")
  max_words = checks.check_positive_int(max_words, "max_words")
  if dataset == "femnist":
    return (lambda ud: _femnist(ud, invert)), 62
  if dataset == "shakespeare":
    return (lambda ud: _shakespeare(ud, targets)), len(LEAF_LETTERS) + 1
  words = list(vocab) if vocab is not None else sent140_vocab(train, vocab_size)
  table = {w: i for i, w in enumerate(words)}
  if len(table) != len(words):
    raise ValueError("vocab has repeated words")
  return (lambda ud: _sent140(ud, table, max_words)), 2


def leaf_clients(dataset: str, paths: Paths, *, max_clients: Optional[int] = None,
                 invert: bool = False, targets: str = "sequence",
                 vocab: Optional[Sequence[str]] = None, vocab_size: int = 10000,
                 max_words: int = 25) -> tuple[list[str], list[dict[str, np.ndarray]]]:
  """`(users, clients)`: the first `max_clients` non-empty users of LEAF files, converted.

  The conversion is `load_leaf`'s. With LEAF's per-sample split ('niid' / `--sf`, the
  default) the train and test files hold the same users, so `leaf_clients(..., test)`
  gives every client its own held-out data, e.g. for `evaluation.evaluate_clients`
  (match clients by user name; pass the train split's `vocab` for Sent140).
  """
  conv, _ = _converter(dataset, paths, invert, targets, vocab, vocab_size, max_words)
  return _convert_users(conv, paths, max_clients)


def _convert_users(conv: Callable[[dict], dict[str, np.ndarray]], paths: Paths,
                   max_clients: Optional[int]) -> tuple[list[str], list[dict[str, np.ndarray]]]:
  """Names and converted examples of the first `max_clients` non-empty users."""
  if max_clients is not None:
    checks.check_positive_int(max_clients, "max_clients")
  users, clients = [], []
  for user, ud in iter_leaf_users(paths):
    if max_clients is not None and len(clients) == max_clients:
      break
    if len(ud["y"]):
      users.append(user)
      clients.append(conv(ud))
  return users, clients


def load_leaf(dataset: str, train: Paths, test: Optional[Paths] = None, *,
              max_clients: Optional[int] = None, invert: bool = False,
              targets: str = "sequence", vocab: Optional[Sequence[str]] = None,
              vocab_size: int = 10000, max_words: int = 25) -> FederatedData:
  """A LEAF dataset as `FederatedData` (first `max_clients` non-empty train users).

  - 'femnist': `x = float32[n, 28, 28, 1]` as stored (LEAF scales grey levels to [0, 1],
    background 1); `invert=True` gives `1 - x` like FedJAX's EMNIST. `y` in [0, 62).
  - 'shakespeare': `x = int32[n, 80]` character labels (`leaf_char_ids`, 81 labels);
    `targets='sequence'` makes `y` the next character at every position (`x` shifted by
    one, LEAF's target last), `targets='last'` keeps LEAF's single next character `y[n]`.
  - 'sent140': `x = int32[n, max_words]` word ids of the tweet text (`leaf_words`), unknown
    words and padding = `len(vocab)` as in LEAF; `vocab` defaults to the `vocab_size` most
    frequent train words (LEAF itself uses GloVe's words). `y` in {0, 1}.

  The test split's non-empty users are pooled into `test` (empty arrays without `test`).
  """
  conv, num_classes = _converter(dataset, train, invert, targets, vocab, vocab_size, max_words)
  _, clients = _convert_users(conv, train, max_clients)
  if not clients:
    raise ValueError(f"the LEAF train split {train!r} has no non-empty user")
  parts = _convert_users(conv, test, None)[1] if test else []
  pooled = {k: (np.concatenate([p[k] for p in parts]) if parts
                else np.zeros((0,) + v.shape[1:], v.dtype)) for k, v in clients[0].items()}
  return FederatedData(clients, pooled, num_classes, f"leaf:{dataset}")
