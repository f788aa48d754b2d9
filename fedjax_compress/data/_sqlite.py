"""FedJAX and TFF SQLite client data, streamed one client at a time, with FedJAX's preprocessing.

Two on-disk layouts are read (the format is detected from the tables):

- FedJAX: one row per client, `federated_data(client_id BLOB PRIMARY KEY, data BLOB,
  num_examples INTEGER)`, `data = zlib(msgpack({feature: ndarray}))` where an ndarray is the
  msgpack extension 1 holding `(shape, dtype name, C-order bytes)` and an array of bytes is
  extension 4 holding `(shape, flat list of bytes)`.
- TFF: one row per example, `examples(split_name, client_id, serialized_example_proto)` with
  a `tf.train.Example` per row and `client_metadata(client_id, split_name, num_examples)`.
  The protos are decoded here (no TensorFlow); packed int64 lists are decoded vectorised.

Client order is FedJAX's: file (rowid) order for FedJAX files, sorted ids for TFF files.
Nothing is read until asked for: `client_sizes` reads only the metadata column, iteration
holds one client at a time, `get(client_id)` reads one row.
"""

from __future__ import annotations

import collections
import collections.abc
import os
import sqlite3
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData

Examples = dict[str, np.ndarray]
ClientId = Any  # bytes (FedJAX) or str (TFF)

# ----------------------------------------------------------------------------- decoding


def _msgpack():
  try:
    import msgpack  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # msgpack ships with flax; this only guards odd installs
    raise ImportError("reading FedJAX SQLite files needs msgpack (pip install msgpack)") from e
  return msgpack


def _ndarray(payload: bytes) -> np.ndarray:
  msgpack = _msgpack()
  shape, dtype, buf = msgpack.unpackb(payload, raw=True)
  name = dtype.decode() if isinstance(dtype, bytes) else dtype
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    dt = np.dtype(ml_dtypes.bfloat16)
  else:
    dt = np.dtype(name)
  return np.frombuffer(buf, dtype=dt).reshape(shape).copy()


def _ext_hook(code: int, payload: bytes) -> Any:
  msgpack = _msgpack()
  if code == 1:  # ndarray
    return _ndarray(payload)
  if code == 2:  # complex scalar
    re, im = msgpack.unpackb(payload)
    return complex(re, im)
  if code == 3:  # numpy scalar, stored as a 0-d array
    return _ndarray(payload)[()]
  if code == 4:  # array of bytes objects
    shape, flat = msgpack.unpackb(payload, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  return msgpack.ExtType(code, payload)


def decode_fedjax_blob(blob: bytes) -> Examples:
  """One FedJAX `federated_data.data` value -> `{feature: ndarray}`."""
  return _msgpack().unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  out = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    out |= (b & 0x7F) << shift
    if b < 0x80:
      return out, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a protobuf message; LEN values are bytes."""
  pos, n = 0, len(buf)
  while pos < n:
    tag, pos = _varint(buf, pos)
    field, wire = tag >> 3, tag & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    else:
      raise ValueError(f"unsupported protobuf wire type {wire} in a tf.train.Example")
    yield field, wire, value


def _packed_varints(buf: bytes) -> np.ndarray:
  """Packed protobuf varints -> int64 (two's complement), vectorised over the bytes."""
  b = np.frombuffer(buf, np.uint8)
  if not len(b):
    return np.zeros(0, np.int64)
  ends = np.flatnonzero(b < 0x80)
  starts = np.concatenate([[0], ends[:-1] + 1])
  pos = np.arange(len(b)) - np.repeat(starts, ends - starts + 1)
  parts = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
  return np.add.reduceat(parts, starts).view(np.int64)


def _feature(buf: bytes) -> tuple[str, Any]:
  """tf.train.Feature -> ('bytes' | 'float' | 'int64', values)."""
  for field, _, value in _fields(buf):
    if field == 1:  # BytesList { repeated bytes value = 1; }
      return "bytes", [bytes(v) for f, _, v in _fields(value) if f == 1]
    if field == 2:  # FloatList { repeated float value = 1 [packed = true]; }
      chunks = [np.frombuffer(v, "<f4") for f, _, v in _fields(value) if f == 1]
      return "float", np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if field == 3:  # Int64List { repeated int64 value = 1 [packed = true]; }
      vals = []
      for f, wire, v in _fields(value):
        if f == 1:
          vals.append(_packed_varints(v) if wire == 2
                      else np.array([v], np.uint64).view(np.int64))
      return "int64", np.concatenate(vals) if vals else np.zeros(0, np.int64)
  return "float", np.zeros(0, np.float32)  # an empty Feature (kind unset)


def parse_tf_example(proto: bytes) -> dict[str, tuple[str, Any]]:
  """A serialized `tf.train.Example` -> `{name: (kind, values)}` (kind: bytes/float/int64)."""
  out = {}
  for field, _, features in _fields(proto):
    if field != 1:
      continue
    for f, _, entry in _fields(features):  # map<string, Feature> feature = 1;
      if f != 1:
        continue
      key, value = "", b""
      for ef, _, ev in _fields(entry):
        if ef == 1:
          key = bytes(ev).decode()
        elif ef == 2:
          value = ev
      out[key] = _feature(value)
  return out


def stack_tf_examples(protos: Sequence[bytes]) -> Examples:
  """Serialized `tf.train.Example`s of one client -> `{feature: [n, ...]}` arrays.

  A feature with one value per example becomes `[n]`, with `k` values `[n, k]` (reshape it
  to its real shape, e.g. `[n, 28, 28]`); floats are float32, ints int64, bytes an object
  array of `bytes`.
  """
  parsed = [parse_tf_example(p) for p in protos]
  if not parsed:
    return {}
  out = {}
  for name in sorted(parsed[0]):
    kind = parsed[0][name][0]
    values = [p[name][1] for p in parsed]
    if kind == "bytes":
      arr = np.empty((len(values), len(values[0])), dtype=object)
      for i, v in enumerate(values):
        arr[i, :] = v
    else:
      arr = np.stack([np.asarray(v) for v in values])
    out[name] = arr[:, 0] if arr.shape[1] == 1 else arr
  return out


# ----------------------------------------------------------------------------- reader


class SQLiteClients:
  """Streaming reader of a FedJAX or TFF SQLite federated data file (read-only).

  `SQLiteClients(path, split=None, preprocess=None)`: `split` selects the TFF split
  ('train', 'test', ...; optional when the file holds one); `preprocess(client_id,
  examples) -> examples` is applied to every client read (e.g. `emnist_preprocess`).
  Use it as an iterator of `(client_id, examples)`, or `client_ids()`, `client_sizes()`,
  `metadata()` (metadata only, no client decoded) and `get(client_id)` (one row).
  """

  def __init__(self, path: str, *, split: Optional[str] = None,
               preprocess: Optional[Callable[[ClientId, Examples], Examples]] = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no SQLite file at path={path!r}")
    self.path = path
    self._conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True,
                                 check_same_thread=False)
    try:
      self.format, self.split = self._detect(split)
    except Exception:
      self._conn.close()
      raise
    self._preprocess = preprocess

  def _detect(self, split: Optional[str]) -> tuple[str, Optional[str]]:
    """Storage format ('fedjax' or 'tff') and TFF split, from the tables."""
    tables = {r[0] for r in self._conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    if "federated_data" in tables:
      if split is not None:
        raise ValueError(f"split={split!r} is only for TFF files; a FedJAX file holds one split")
      return "fedjax", None
    if {"examples", "client_metadata"} <= tables:
      splits = sorted(r[0] for r in self._conn.execute(
          "SELECT DISTINCT split_name FROM client_metadata"))
      if split is None and len(splits) == 1:
        split = splits[0]
      if split not in splits:
        raise ValueError(f"split must be one of {splits} for this TFF file, got {split!r}")
      return "tff", split
    raise ValueError(f"{self.path!r} is neither a FedJAX (table federated_data) nor a TFF "
                     f"(tables examples, client_metadata) SQLite file; tables: {sorted(tables)}")

  def close(self) -> None:
    """Close the connection."""
    self._conn.close()

  def __enter__(self) -> "SQLiteClients":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __len__(self) -> int:
    if self.format == "fedjax":
      return self._conn.execute("SELECT COUNT(*) FROM federated_data").fetchone()[0]
    return self._conn.execute("SELECT COUNT(*) FROM client_metadata WHERE split_name = ?",
                              [self.split]).fetchone()[0]

  def metadata(self) -> Iterator[tuple[ClientId, int]]:
    """`(client_id, num_examples)` of every client in FedJAX's order (no client decoded)."""
    if self.format == "fedjax":
      cur = self._conn.execute(
          "SELECT client_id, num_examples FROM federated_data ORDER BY rowid")
    else:
      cur = self._conn.execute("SELECT client_id, num_examples FROM client_metadata "
                               "WHERE split_name = ? ORDER BY client_id", [self.split])
    yield from cur

  def client_ids(self) -> list[ClientId]:
    """All client ids, in FedJAX's order (metadata only)."""
    return [cid for cid, _ in self.metadata()]

  def client_sizes(self) -> np.ndarray:
    """int64[num_clients] example counts from the metadata column (no client is decoded)."""
    return np.array([n for _, n in self.metadata()], np.int64)

  def _finish(self, cid: ClientId, ex: Examples) -> Examples:
    return self._preprocess(cid, ex) if self._preprocess is not None else ex

  def _tff_examples(self, cid: ClientId) -> Examples:
    rows = self._conn.execute(
        "SELECT serialized_example_proto FROM examples WHERE split_name = ? AND client_id = ? "
        "ORDER BY rowid", [self.split, cid]).fetchall()
    return stack_tf_examples([r[0] for r in rows])

  def get(self, client_id: ClientId) -> Examples:
    """One client's (preprocessed) examples; `KeyError` if the id is absent."""
    if self.format == "fedjax":
      row = self._conn.execute("SELECT data FROM federated_data WHERE client_id = ?",
                               [client_id]).fetchone()
      if row is None:
        raise KeyError(client_id)
      return self._finish(client_id, decode_fedjax_blob(row[0]))
    hit = self._conn.execute("SELECT 1 FROM client_metadata WHERE split_name = ? AND "
                             "client_id = ?", [self.split, client_id]).fetchone()
    if hit is None:
      raise KeyError(client_id)
    return self._finish(client_id, self._tff_examples(client_id))

  def __iter__(self) -> Iterator[tuple[ClientId, Examples]]:
    if self.format == "fedjax":
      cur = self._conn.execute("SELECT client_id, data FROM federated_data ORDER BY rowid")
      for cid, blob in cur:
        yield cid, self._finish(cid, decode_fedjax_blob(blob))
    else:
      for cid in self.client_ids():
        yield cid, self._finish(cid, self._tff_examples(cid))


# ----------------------------------------------------------------------------- preprocessing


def emnist_preprocess(client_id: ClientId, examples: Examples) -> Examples:
  """FedJAX's EMNIST batch preprocessing: `x = 1 - pixels` as `float32[n, 28, 28, 1]`, `y = label`.

  The stored pixels are in [0, 1] with white (1) background; FedJAX flips them so ink is 1.
  """
  del client_id
  px = np.asarray(examples["pixels"], np.float32)
  return {"x": (1.0 - px.reshape(len(px), 28, 28))[..., None],
          "y": np.asarray(examples["label"]).astype(np.int32)}


# FedJAX's Shakespeare character vocabulary (from the TFF text generation tutorial):
# byte SHAKESPEARE_VOCAB[i] has label 3 + i; 0 = PAD, 1 = BOS, 2 = EOS, 89 = out of vocabulary.
SHAKESPEARE_VOCAB = (b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquy"
                     b"AEIMQUY]!%)-159\r")
SHAKESPEARE_PAD, SHAKESPEARE_BOS, SHAKESPEARE_EOS = 0, 1, 2
SHAKESPEARE_OOV = 3 + len(SHAKESPEARE_VOCAB)
SHAKESPEARE_VOCAB_SIZE = SHAKESPEARE_OOV + 1  # 90


def _byte_table() -> np.ndarray:
  table = np.full(256, SHAKESPEARE_OOV, np.int32)
  for i, c in enumerate(SHAKESPEARE_VOCAB):
    table[c] = 3 + i
  return table


_SHAKESPEARE_TABLE = _byte_table()


def shakespeare_preprocess(client_id: ClientId, examples: Examples,
                           sequence_length: int = 80) -> Examples:
  """FedJAX's Shakespeare client preprocessing: snippets -> next-character sequences.

  Each snippet becomes `[BOS, c_1, ..., c_m, EOS]` (bytes through FedJAX's 86-character
  table, others -> OOV); the snippets are joined, `x = joined[:-1]`, `y = joined[1:]`, padded
  with PAD (0) to a multiple of `sequence_length` and cut into `int32[M, sequence_length]`.

  >>> out = shakespeare_preprocess(None, {'snippets': np.array([b'ABCD', b'E'], object)}, 3)
  >>> out['x'][:, 0].tolist(), out['y'][-1].tolist()
  ([1, 29, 1], [74, 2, 0])
  """
  del client_id
  sequence_length = checks.check_positive_int(sequence_length, "sequence_length")
  pieces = []
  for s in examples["snippets"]:
    s = s.encode() if isinstance(s, str) else bytes(s)
    pieces.append(np.concatenate([[SHAKESPEARE_BOS],
                                  _SHAKESPEARE_TABLE[np.frombuffer(s, np.uint8)],
                                  [SHAKESPEARE_EOS]]).astype(np.int32))
  joined = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  n = max(len(joined) - 1, 0)
  padded = -(-n // sequence_length) * sequence_length
  x = np.full(padded, SHAKESPEARE_PAD, np.int32)
  y = np.full(padded, SHAKESPEARE_PAD, np.int32)
  x[:n], y[:n] = joined[:-1], joined[1:]
  return {"x": x.reshape(-1, sequence_length), "y": y.reshape(-1, sequence_length)}


def stackoverflow_tokenizer(vocab: Sequence[str], max_length: int = 20
                            ) -> Callable[[ClientId, Examples], Examples]:
  """FedJAX's StackOverflow word tokenizer as a client preprocessor (one OOV bucket).

  Words are the `tokens` string split on single spaces; word `vocab[i]` -> `3 + i`, others
  -> OOV `len(vocab) + 3`; a post is `[BOS=1, w_1, ..., w_m, EOS=2]`, `x` drops the last
  and `y` the first id, both truncated or PAD(0)-padded to `int32[n, max_length]`.
  Vocabulary size `len(vocab) + 4`.

  >>> tok = stackoverflow_tokenizer(['a', 'b'], max_length=4)
  >>> out = tok(None, {'tokens': np.array([b'a c b', b'b'], object)})
  >>> out['x'].tolist(), out['y'].tolist()
  ([[1, 3, 5, 4], [1, 4, 0, 0]], [[3, 5, 4, 2], [4, 2, 0, 0]])
  """
  max_length = checks.check_positive_int(max_length, "max_length")
  table = {w: 3 + i for i, w in enumerate(vocab)}
  if len(table) != len(vocab):
    raise ValueError("vocab has repeated words")
  oov = len(vocab) + 3

  def preprocess(client_id: ClientId, examples: Examples) -> Examples:
    del client_id
    posts = examples["tokens"]
    x = np.zeros((len(posts), max_length), np.int32)
    y = np.zeros((len(posts), max_length), np.int32)
    for i, p in enumerate(posts):
      p = p.decode() if isinstance(p, bytes) else str(p)
      ids = [1] + [table.get(w, oov) for w in p.split(" ")] + [2]
      xs, ys = ids[:-1][:max_length], ids[1:][:max_length]
      x[i, :len(xs)], y[i, :len(ys)] = xs, ys
    return {"x": x, "y": y}

  return preprocess


def word_count_vocab(path: str, size: int) -> list[str]:
  """The first `size` words of a `word count` per line file (FedJAX's stackoverflow.word_count)."""
  size = checks.check_positive_int(size, "size")
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if len(out) == size:
        break
      if line.strip():
        out.append(line.split()[0])
  return out


def count_vocab(clients: Iterable[tuple[ClientId, Examples]], size: int,
                feature: str = "tokens") -> list[str]:
  """The `size` most frequent space-separated words of `feature` over streamed clients."""
  size = checks.check_positive_int(size, "size")
  counts: collections.Counter = collections.Counter()
  for _, ex in clients:
    for p in ex[feature]:
      counts.update((p.decode() if isinstance(p, bytes) else str(p)).split(" "))
  return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


# Per-channel mean and standard deviation of CIFAR pixels in [0, 1] used by FedJAX.
CIFAR100_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR100_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def cifar100_preprocess(client_id: ClientId, examples: Examples, *, mode: str = "fedjax",
                        label: str = "label") -> Examples:
  """FedJAX's CIFAR-100 eval preprocessing of uint8 `image[n, 32, 32, 3]` (no augmentation).

  `mode='fedjax'`: `x = (image / 255 - mean) / std` per channel, `float32[n, 32, 32, 3]`
  (FedJAX's `preprocess_batch(is_train=False)`).
  `mode='tff'`: centre 24x24 crop, then per-image standardisation `(v - mean(v)) /
  max(std(v), 1 / sqrt(N))`, `N = 24 * 24 * 3`, on raw 0-255 values, as
  `tf.image.per_image_standardization` in TFF's CIFAR-100 task.
  `mode='fedjax_tff'`: FedJAX 0.0.17's NumPy `preprocess_batch_tff`, which floors the std
  at `sqrt(N)` (41.6) instead of `1 / sqrt(N)`; it differs from 'tff' only on
  low-contrast images (std < 41.6 grey levels).
  `label`: 'label' (100 classes) or 'coarse_label' (20 superclasses).
  """
  del client_id
  if mode not in ("fedjax", "tff", "fedjax_tff"):
    raise ValueError(f"mode must be 'fedjax', 'tff' or 'fedjax_tff', got {mode!r}")
  if label not in ("label", "coarse_label"):
    raise ValueError(f"label must be 'label' or 'coarse_label', got {label!r}")
  img = np.asarray(examples["image"]).reshape(-1, 32, 32, 3)
  if mode == "fedjax":
    x = (img.astype(np.float32) / 255 - CIFAR100_MEAN) * (1 / CIFAR100_STD)
  else:
    x = img[:, 4:28, 4:28, :].astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    n = np.float32(x[0].size)
    floor = np.sqrt(n) if mode == "fedjax_tff" else 1.0 / np.sqrt(n)
    x = (x - mean) / np.maximum(std, floor)
  return {"x": x.astype(np.float32), "y": np.asarray(examples[label]).astype(np.int32)}


# ----------------------------------------------------------------------------- loader

_DATASETS = ("emnist", "shakespeare", "stackoverflow", "cifar100")


class SQLiteClientList(collections.abc.Sequence):
  """Clients of a SQLite file as a sequence read on access (one row per `[i]`).

  `clients[i]` decodes and preprocesses client `ids[i]` through `reader.get`; the last
  `cache_size` clients read are kept. Use it as `FederatedData.clients` to sample cohorts
  from a file too large for memory (`load_sqlite(..., lazy=True)`).
  """

  def __init__(self, reader: SQLiteClients, ids: Sequence[ClientId], cache_size: int = 64):
    self.reader = reader
    self.ids = list(ids)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = checks.check_positive_int(cache_size, "cache_size")

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = range(len(self))[i]  # IndexError and negative indices as for a list
    if i in self._cache:
      self._cache.move_to_end(i)
      return self._cache[i]
    ex = self.reader.get(self.ids[i])
    self._cache[i] = ex
    if len(self._cache) > self._cache_size:
      self._cache.popitem(last=False)
    return ex


def _preprocessor(dataset: str, kw: dict) -> tuple[Callable, int]:
  if dataset == "emnist":
    return emnist_preprocess, int(kw.pop("num_classes", 62))
  if dataset == "shakespeare":
    seq = checks.check_positive_int(kw.pop("sequence_length", 80), "sequence_length")
    return (lambda cid, ex: shakespeare_preprocess(cid, ex, seq)), SHAKESPEARE_VOCAB_SIZE
  if dataset == "stackoverflow":
    if "vocab" not in kw:
      raise ValueError("dataset='stackoverflow' needs vocab= (a word list, e.g. from "
                       "word_count_vocab or count_vocab)")
    vocab = list(kw.pop("vocab"))
    return stackoverflow_tokenizer(vocab, kw.pop("max_length", 20)), len(vocab) + 4
  mode, label = kw.pop("mode", "fedjax"), kw.pop("label", "label")
  cifar100_preprocess(None, {"image": np.zeros((0, 32, 32, 3), np.uint8),  # validates now
                             label: np.zeros(0, np.int64)}, mode=mode, label=label)
  return ((lambda cid, ex: cifar100_preprocess(cid, ex, mode=mode, label=label)),
          20 if label == "coarse_label" else 100)


def _nonempty_ids(reader: SQLiteClients, limit: Optional[int]) -> list[ClientId]:
  """The first `limit` client ids (file order) whose metadata count is > 0."""
  out = []
  for cid, n in reader.metadata():
    if limit is not None and len(out) == limit:
      break
    if n > 0:
      out.append(cid)
  return out


def load_sqlite(train_path: str, test_path: Optional[str] = None, *, dataset: str,
                max_clients: Optional[int] = None, max_test_clients: Optional[int] = None,
                train_split: Optional[str] = None, test_split: Optional[str] = None,
                lazy: bool = False, cache_size: int = 64, **options: Any) -> FederatedData:
  """A FedJAX/TFF SQLite dataset as `FederatedData`, preprocessed as FedJAX does.

  `dataset`: 'emnist' (62 classes, writers as clients; `num_classes=10` for the digits-only
  files), 'shakespeare' (speaking roles, `sequence_length=80`, 90 labels), 'stackoverflow'
  (users; `vocab=[...]` required, `max_length=20`, `len(vocab) + 4` labels) or 'cifar100'
  (`mode='fedjax'|'tff'|'fedjax_tff'`, `label='label'|'coarse_label'`). The clients are
  the first `max_clients` with a non-zero example count in the metadata, in FedJAX's order.
  `lazy=False` reads them into memory one at a time; `lazy=True` only reads their ids and
  makes `clients` a `SQLiteClientList` that decodes a client when a cohort asks for it
  (keeping the last `cache_size`; the file stays open; `FederatedData.client_sizes()` then
  decodes every client once, e.g. for Shakespeare, whose metadata count snippets rather
  than sequences). The test file's first
  `max_test_clients` clients are pooled into `test` (empty arrays without `test_path`).
  For a TFF file holding both splits pass the same path twice with `train_split='train',
  test_split='test'`.
  """
  if dataset not in _DATASETS:
    raise ValueError(f"dataset must be one of {_DATASETS}, got {dataset!r}")
  for v, name in ((max_clients, "max_clients"), (max_test_clients, "max_test_clients")):
    if v is not None:
      checks.check_positive_int(v, name)
  kw = dict(options)
  prep, num_classes = _preprocessor(dataset, kw)
  if kw:
    raise ValueError(f"unknown options for dataset={dataset!r}: {sorted(kw)}")
  reader = SQLiteClients(train_path, split=train_split, preprocess=prep)
  ids = _nonempty_ids(reader, max_clients)
  if not ids:
    reader.close()
    raise ValueError(f"{train_path!r} holds no non-empty client")
  if lazy:
    clients: Any = SQLiteClientList(reader, ids, cache_size)
  else:
    with reader:
      clients = [reader.get(cid) for cid in ids]
  first = clients[0]
  tests = []
  if test_path is not None:
    with SQLiteClients(test_path, split=test_split, preprocess=prep) as r:
      tests = [r.get(cid) for cid in _nonempty_ids(r, max_test_clients)]
  test = {k: (np.concatenate([t[k] for t in tests]) if tests
              else np.zeros((0,) + v.shape[1:], v.dtype)) for k, v in first.items()}
  return FederatedData(clients, test, num_classes, f"sqlite:{dataset}")
