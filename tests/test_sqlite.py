"""FedJAX / TFF SQLite client data: schema, streaming, FedJAX's preprocessing (float64 refs).

The files are written here in the exact on-disk schemas with independent writers: msgpack
extension types for FedJAX's `federated_data` table, and `tf.train.Example` protos built
from a protobuf descriptor (no TensorFlow) for TFF's `examples` / `client_metadata` tables.
"""

import sqlite3
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_compress import data, federated
from fedjax_compress.data import _sqlite

# ----------------------------------------------------------------------------- writers


def _ext(x):
  if isinstance(x, np.ndarray) and x.dtype == object:  # FedJAX's bytes ndarray, ext 4
    return msgpack.ExtType(4, msgpack.packb((list(x.shape), [bytes(v) for v in x.ravel()]),
                                            use_bin_type=True))
  if isinstance(x, np.ndarray):  # (shape, dtype name, C-order bytes), ext 1
    return msgpack.ExtType(1, msgpack.packb((list(x.shape), x.dtype.name, x.tobytes("C")),
                                            use_bin_type=True))
  raise TypeError(type(x))


def write_fedjax(path, clients):
  """`clients`: [(bytes id, {feature: ndarray})] in insertion (rowid) order."""
  conn = sqlite3.connect(path)
  conn.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
               "data BLOB NOT NULL, num_examples INTEGER NOT NULL);")
  rows = [(cid, zlib.compress(msgpack.packb(ex, default=_ext, strict_types=True)),
           len(next(iter(ex.values())))) for cid, ex in clients]
  conn.executemany("INSERT INTO federated_data VALUES (?, ?, ?);", rows)
  conn.commit()
  conn.close()


def _example_class(packed):
  pb = pytest.importorskip("google.protobuf")
  del pb
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name=f"example_{packed}.proto",
                                           package="tensorflow", syntax="proto2")
  for name, typ in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT),
                    ("Int64List", F.TYPE_INT64)):
    m = fdp.message_type.add(name=name)
    f = m.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=typ)
    if typ != F.TYPE_BYTES:
      f.options.packed = packed
  feat = fdp.message_type.add(name="Feature")
  feat.oneof_decl.add(name="kind")
  for i, (name, typ) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                   ("int64_list", "Int64List"))):
    feat.field.add(name=name, number=i + 1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                   type_name=f".tensorflow.{typ}", oneof_index=0)
  feats = fdp.message_type.add(name="Features")
  entry = feats.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
  entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                  type_name=".tensorflow.Feature")
  feats.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                  type_name=".tensorflow.Features.FeatureEntry")
  ex = fdp.message_type.add(name="Example")
  ex.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
               type_name=".tensorflow.Features")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def tf_example(cls, features):
  """`features`: {name: ('bytes' | 'float' | 'int64', list)} -> serialized proto."""
  e = cls()
  for name, (kind, values) in features.items():
    f = e.features.feature[name]
    getattr(f, f"{kind}_list").value.extend(values)
  return e.SerializeToString()


def write_tff(path, split_rows):
  """`split_rows`: [(split, client id str, serialized proto)] in insertion order."""
  conn = sqlite3.connect(path)
  conn.executescript("""
    CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL,
                           serialized_example_proto BLOB NOT NULL);
    CREATE INDEX idx_examples_client_id ON examples (client_id);
    CREATE INDEX idx_examples_client_id_split ON examples (split_name, client_id);
    CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL,
                                  num_examples INTEGER NOT NULL);
    CREATE INDEX idx_metadata_client_id ON client_metadata (client_id);""")
  conn.executemany("INSERT INTO examples VALUES (?, ?, ?)", split_rows)
  counts = {}
  for s, c, _ in split_rows:
    counts[(s, c)] = counts.get((s, c), 0) + 1
  conn.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)",
                   [(c, s, n) for (s, c), n in counts.items()])
  conn.commit()
  conn.close()


def _emnist_clients(rng, sizes, ids=None):
  ids = ids or [f"f{i:04d}_{i % 100:02d}".encode() for i in range(len(sizes))]
  return [(cid, {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                 "label": rng.integers(0, 62, n).astype(np.int32)})
          for cid, n in zip(ids, sizes)]


@pytest.fixture(scope="module")
def emnist_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  # ids deliberately not sorted: FedJAX's order is the rowid (insertion) order
  clients = _emnist_clients(rng, [3, 0, 5, 2],
                            [b"f0300_01", b"f0001_02", b"f0100_03", b"f0002_04"])
  path = str(tmp_path_factory.mktemp("sq") / "emnist_train.sqlite")
  write_fedjax(path, clients)
  return path, clients


# ----------------------------------------------------------------------------- FedJAX format


def test_fedjax_reader_order_values_and_metadata(emnist_file):
  path, clients = emnist_file
  with data.SQLiteClients(path, preprocess=data.emnist_preprocess) as r:
    assert r.format == "fedjax" and len(r) == 4
    assert r.client_ids() == [c for c, _ in clients]
    np.testing.assert_array_equal(r.client_sizes(), [3, 0, 5, 2])
    got = list(r)
    assert [c for c, _ in got] == [c for c, _ in clients]
    for (_, ex), (_, raw) in zip(got, clients):
      # FedJAX: x = 1 - pixels[..., None] (ink -> 1), y = label
      ref = 1.0 - raw["pixels"].astype(np.float64)[..., None]
      assert ex["x"].dtype == np.float32 and ex["x"].shape == raw["pixels"].shape + (1,)
      np.testing.assert_allclose(ex["x"], ref, rtol=0, atol=1e-7)
      np.testing.assert_array_equal(ex["y"], raw["label"])
    one = r.get(b"f0100_03")
    np.testing.assert_array_equal(one["y"], clients[2][1]["label"])
    with pytest.raises(KeyError):
      r.get(b"nope")


def test_fedjax_blob_roundtrip_dtypes_and_bytes():
  ex = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.float16([1.5, -2]),
        "s": np.array([b"x y", b"", b"\xff"], dtype=object)}
  out = _sqlite.decode_fedjax_blob(zlib.compress(msgpack.packb(ex, default=_ext,
                                                               strict_types=True)))
  assert out["a"].dtype == np.int64 and out["b"].dtype == np.float16
  np.testing.assert_array_equal(out["a"], ex["a"])
  np.testing.assert_array_equal(out["b"], ex["b"])
  assert out["s"].dtype == object and out["s"].tolist() == [b"x y", b"", b"\xff"]
  out["a"][0, 0] = 7  # decoded arrays are writable copies, not views of the blob


def test_sizes_read_no_client_and_lazy_reads_only_what_is_asked(emnist_file, monkeypatch):
  path, clients = emnist_file
  calls = []
  real = _sqlite.decode_fedjax_blob

  def counting(blob):
    calls.append(1)
    return real(blob)

  monkeypatch.setattr(_sqlite, "decode_fedjax_blob", counting)
  with data.SQLiteClients(path) as r:
    r.client_sizes(), r.client_ids(), len(r)
  assert not calls
  d = data.load_sqlite(path, dataset="emnist", lazy=True, cache_size=2)
  assert len(calls) == 1 and d.num_clients == 3  # only the first client (its shapes) is read;
  # the empty client is skipped from its metadata
  np.testing.assert_array_equal(d.clients[1]["y"], clients[2][1]["label"])
  d.clients[1], d.clients[0]
  assert len(calls) == 2  # both cached
  d.clients[2], d.clients[1]
  assert len(calls) == 4  # cache of 2: reading client 2 evicted the least recent, client 1
  assert len(d.clients[0:2]) == 2 and d.clients[-1]["x"].shape == (2, 28, 28, 1)
  with pytest.raises(IndexError):
    d.clients[3]
  d.clients.reader.close()


def test_load_sqlite_eager_equals_lazy_and_samples_cohorts(emnist_file, tmp_path):
  path, clients = emnist_file
  test_path = str(tmp_path / "emnist_test.sqlite")
  rng = np.random.default_rng(1)
  write_fedjax(test_path, _emnist_clients(rng, [2, 3]))
  eager = data.load_sqlite(path, test_path, dataset="emnist")
  lazy = data.load_sqlite(path, test_path, dataset="emnist", lazy=True)
  assert eager.num_classes == 62 and eager.num_clients == 3 and eager.name == "sqlite:emnist"
  np.testing.assert_array_equal(eager.client_sizes(), [3, 5, 2])
  np.testing.assert_array_equal(lazy.client_sizes(), [3, 5, 2])
  assert eager.test["x"].shape == (5, 28, 28, 1)
  c1 = federated.sample_cohort(eager, 2, cohort_size=2, local_steps=2, batch_size=2, seed=3)
  c2 = federated.sample_cohort(lazy, 2, cohort_size=2, local_steps=2, batch_size=2, seed=3)
  for k in c1.batches:
    np.testing.assert_array_equal(c1.batches[k], c2.batches[k])
  np.testing.assert_array_equal(c1.ids, c2.ids)
  two = data.load_sqlite(path, dataset="emnist", max_clients=2)
  assert two.num_clients == 2 and len(two.test["y"]) == 0
  assert two.test["x"].shape == (0, 28, 28, 1)
  lazy.clients.reader.close()


def test_load_sqlite_validation(emnist_file, tmp_path):
  path, _ = emnist_file
  with pytest.raises(ValueError, match="dataset"):
    data.load_sqlite(path, dataset="mnist")
  with pytest.raises(ValueError, match="unknown options"):
    data.load_sqlite(path, dataset="emnist", sequence_length=3)
  with pytest.raises(ValueError, match="vocab"):
    data.load_sqlite(path, dataset="stackoverflow")
  with pytest.raises(ValueError, match="mode"):
    data.load_sqlite(path, dataset="cifar100", mode="torch")
  with pytest.raises(ValueError, match="max_clients"):
    data.load_sqlite(path, dataset="emnist", max_clients=0)
  with pytest.raises(ValueError, match="split"):
    data.SQLiteClients(path, split="train")
  with pytest.raises(FileNotFoundError, match="path"):
    data.SQLiteClients(str(tmp_path / "absent.sqlite"))
  other = str(tmp_path / "other.sqlite")
  conn = sqlite3.connect(other)
  conn.execute("CREATE TABLE t (a INTEGER)")
  conn.commit()
  conn.close()
  with pytest.raises(ValueError, match="neither a FedJAX"):
    data.SQLiteClients(other)
  empty = str(tmp_path / "empty.sqlite")
  write_fedjax(empty, _emnist_clients(np.random.default_rng(0), [0]))
  with pytest.raises(ValueError, match="no non-empty client"):
    data.load_sqlite(empty, dataset="emnist")


# ----------------------------------------------------------------------------- preprocessing

# FedJAX's Shakespeare vocabulary (86 bytes; label = 3 + index; PAD 0, BOS 1, EOS 2, OOV 89)
_VOCAB = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquy"
          "AEIMQUY]!%)-159\r")


def _shakespeare_ref(snippets, seq):
  joined = []
  for s in snippets:
    joined += [1] + [3 + _VOCAB.index(chr(b)) if chr(b) in _VOCAB else 89 for b in s] + [2]
  x, y = joined[:-1], joined[1:]
  m = -(-len(x) // seq) * seq
  x, y = x + [0] * (m - len(x)), y + [0] * (m - len(y))
  return np.array(x).reshape(-1, seq), np.array(y).reshape(-1, seq)


def test_shakespeare_preprocess_matches_fedjax():
  assert len(set(_VOCAB)) == 86 and _sqlite.SHAKESPEARE_VOCAB_SIZE == 90
  assert _sqlite.SHAKESPEARE_VOCAB == _VOCAB.encode()
  # FedJAX's documented example, sequence_length=3
  out = data.shakespeare_preprocess(None, {"snippets": np.array([b"ABCD", b"E"], object)}, 3)
  A, B, C, D, E = (3 + _VOCAB.index(c) for c in "ABCDE")
  assert out["x"].tolist() == [[1, A, B], [C, D, 2], [1, E, 0]]
  assert out["y"].tolist() == [[A, B, C], [D, 2, 1], [E, 2, 0]]
  rng = np.random.default_rng(0)
  alphabet = [bytes([c]) for c in range(9, 127)] + ["é".encode()]
  snippets = np.array([b"".join(rng.choice(alphabet, int(n))) for n in (0, 7, 200, 79)],
                      object)
  for seq in (1, 5, 80):
    out = data.shakespeare_preprocess(b"role", {"snippets": snippets}, seq)
    rx, ry = _shakespeare_ref(snippets, seq)
    assert out["x"].dtype == np.int32 and out["x"].shape == rx.shape
    np.testing.assert_array_equal(out["x"], rx)
    np.testing.assert_array_equal(out["y"], ry)
  empty = data.shakespeare_preprocess(None, {"snippets": np.array([], object)}, 4)
  assert empty["x"].shape == (0, 4)


def test_shakespeare_sqlite_file(tmp_path):
  path = str(tmp_path / "shakespeare_train.sqlite")
  snippets = [np.array([b"To be, or not", b"that is"], object), np.array([b"Ay~"], object)]
  write_fedjax(path, [(b"HAMLET", {"snippets": snippets[0]}),
                      (b"OPHELIA", {"snippets": snippets[1]})])
  d = data.load_sqlite(path, dataset="shakespeare", sequence_length=8)
  assert d.num_classes == 90 and d.num_clients == 2
  for c, s in zip(d.clients, snippets):
    rx, ry = _shakespeare_ref(s, 8)
    np.testing.assert_array_equal(c["x"], rx)
    np.testing.assert_array_equal(c["y"], ry)


def test_stackoverflow_tokenizer_matches_fedjax_rules():
  vocab = ["the", "a", "is", "python"]
  tok = data.stackoverflow_tokenizer(vocab, max_length=5)
  posts = np.array([b"the python is", b"a  b", b"is the the the the the the", b"zzz"], object)
  out = tok(None, {"tokens": posts})
  # ids: word i -> 3 + i, OOV -> 7, BOS 1, EOS 2, PAD 0; x = ids[:-1], y = ids[1:], cut at 5
  assert out["x"].tolist() == [[1, 3, 6, 5, 0], [1, 4, 7, 7, 0], [1, 5, 3, 3, 3],
                               [1, 7, 0, 0, 0]]
  assert out["y"].tolist() == [[3, 6, 5, 2, 0], [4, 7, 7, 2, 0], [5, 3, 3, 3, 3],
                               [7, 2, 0, 0, 0]]
  with pytest.raises(ValueError, match="repeated"):
    data.stackoverflow_tokenizer(["a", "a"])


def test_stackoverflow_vocab_helpers(tmp_path):
  wc = tmp_path / "stackoverflow.word_count"
  wc.write_text("the 100\nto 50\n\na 10\n")
  assert data.word_count_vocab(str(wc), 2) == ["the", "to"]
  assert data.word_count_vocab(str(wc), 9) == ["the", "to", "a"]
  clients = [(0, {"tokens": np.array([b"b a b", b"c"], object)}),
             (1, {"tokens": np.array([b"a b"], object)})]
  assert data.count_vocab(clients, 2) == ["b", "a"]  # counts 3, 2; ties by word


def _cifar_ref(img, mode):
  x = img.astype(np.float64)
  if mode == "fedjax":
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2023, 0.1994, 0.2010])
    return (x / 255 - mean) / std
  x = x[:, 4:28, 4:28]
  n = 24 * 24 * 3
  floor = np.sqrt(n) if mode == "fedjax_tff" else 1 / np.sqrt(n)
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  s = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), floor)
  return (x - m) / s


@pytest.mark.parametrize("mode", ["fedjax", "tff", "fedjax_tff"])
def test_cifar100_preprocess_float64_reference(mode):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  img[1] = 9  # constant image: std 0, both floors apply
  img[2] = img[2] // 16  # low contrast: std below sqrt(N), 'tff' and 'fedjax_tff' differ
  ex = {"image": img, "label": np.arange(4), "coarse_label": np.arange(4) % 2}
  out = data.cifar100_preprocess(None, ex, mode=mode)
  assert out["x"].dtype == np.float32
  np.testing.assert_allclose(out["x"], _cifar_ref(img, mode), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["y"], [0, 1, 2, 3])
  coarse = data.cifar100_preprocess(None, ex, mode=mode, label="coarse_label")
  np.testing.assert_array_equal(coarse["y"], [0, 1, 0, 1])
  if mode != "fedjax":
    assert out["x"].shape == (4, 24, 24, 3)
  if mode == "tff":
    other = data.cifar100_preprocess(None, ex, mode="fedjax_tff")["x"]
    assert not np.allclose(other[2], out["x"][2]) and np.allclose(other[0], out["x"][0])


# ----------------------------------------------------------------------------- TFF format


@pytest.mark.parametrize("packed", [True, False])
def test_parse_tf_example_against_protobuf(packed):
  cls = _example_class(packed)
  ints = [0, 1, -1, 127, 128, 2**40, -2**63, 2**63 - 1]
  proto = tf_example(cls, {"i": ("int64", ints), "f": ("float", [0.5, -1e30, 3.25]),
                           "b": ("bytes", [b"hello", b""]), "e": ("int64", [])})
  out = _sqlite.parse_tf_example(proto)
  assert out["i"][0] == "int64" and out["i"][1].tolist() == ints
  assert out["f"][0] == "float"
  np.testing.assert_array_equal(out["f"][1], np.float32([0.5, -1e30, 3.25]))
  assert out["b"] == ("bytes", [b"hello", b""])
  assert len(out["e"][1]) == 0


def test_tff_file_cifar_and_split_selection(tmp_path):
  cls = _example_class(True)
  rng = np.random.default_rng(0)
  rows, raw = [], {}
  for split, cid, n in (("train", "7", 3), ("train", "10", 2), ("test", "0", 2)):
    for _ in range(n):
      img = rng.integers(0, 256, (32, 32, 3))
      lab = int(rng.integers(0, 100))
      raw.setdefault((split, cid), []).append((img, lab))
      rows.append((split, cid, tf_example(cls, {
          "image": ("int64", img.ravel().tolist()), "label": ("int64", [lab]),
          "coarse_label": ("int64", [lab // 5])})))
  rng.shuffle(rows)  # rows of one client interleave with others; order within a client kept
  rows.sort(key=lambda r: r[0] == "test")
  path = str(tmp_path / "cifar100.sqlite")
  write_tff(path, rows)
  with pytest.raises(ValueError, match="split must be one of"):
    data.SQLiteClients(path)
  with data.SQLiteClients(path, split="train") as r:
    assert r.format == "tff" and r.client_ids() == ["10", "7"]  # TFF order: sorted ids
    np.testing.assert_array_equal(r.client_sizes(), [2, 3])
    ex = r.get("7")
    assert ex["image"].shape == (3, 32 * 32 * 3) and ex["image"].dtype == np.int64
  d = data.load_sqlite(path, path, dataset="cifar100", train_split="train",
                       test_split="test", label="coarse_label")
  assert d.num_classes == 20 and d.num_clients == 2 and d.test["x"].shape == (2, 32, 32, 3)
  # order inside a client follows the table's rowid order of its examples
  kept = [r for r in rows if r[:2] == ("train", "7")]
  want = [_sqlite.parse_tf_example(p)["label"][1][0] // 5 for _, _, p in kept]
  np.testing.assert_array_equal(d.clients[1]["y"], want)
  imgs = np.stack([np.asarray(_sqlite.parse_tf_example(p)["image"][1]).reshape(32, 32, 3)
                   for _, _, p in kept])
  np.testing.assert_allclose(d.clients[1]["x"], _cifar_ref(imgs, "fedjax"), atol=1e-5)


def test_tff_file_emnist_and_stackoverflow_features(tmp_path):
  cls = _example_class(True)
  rng = np.random.default_rng(2)
  px = rng.random((2, 28, 28), dtype=np.float32)
  rows = [("train", "w1", tf_example(cls, {"pixels": ("float", p.ravel().tolist()),
                                           "label": ("int64", [i + 3])}))
          for i, p in enumerate(px)]
  path = str(tmp_path / "emnist.sqlite")
  write_tff(path, rows)
  d = data.load_sqlite(path, dataset="emnist")
  np.testing.assert_allclose(d.clients[0]["x"][..., 0], 1.0 - px.astype(np.float64),
                             atol=1e-7)
  np.testing.assert_array_equal(d.clients[0]["y"], [3, 4])
  so = [("train", "u", tf_example(cls, {"tokens": ("bytes", [t]), "score": ("int64", [s]),
                                        "type": ("bytes", [b"question"])}))
        for t, s in ((b"how to python", 3), (b"to", -2))]
  path = str(tmp_path / "so.sqlite")
  write_tff(path, so)
  d = data.load_sqlite(path, dataset="stackoverflow", vocab=["to", "python"], max_length=4)
  assert d.num_classes == 6
  assert d.clients[0]["x"].tolist() == [[1, 5, 3, 4], [1, 3, 0, 0]]
  with data.SQLiteClients(path) as r:
    raw = r.get("u")
  assert raw["score"].tolist() == [3, -2] and raw["tokens"].tolist() == [b"how to python", b"to"]
