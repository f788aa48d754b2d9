"""Data: synthetic generator, partitions, cohort sampler, tfds error paths, text helpers."""

import sys

import numpy as np
import pytest

from fedjax_compress import data, federated


def test_synthetic_deterministic_and_well_formed():
  a = data.synthetic(1.0, 1.0, num_clients=6, dim=8, num_classes=4, samples_per_client=40,
                     seed=3)
  b = data.synthetic(1.0, 1.0, num_clients=6, dim=8, num_classes=4, samples_per_client=40,
                     seed=3)
  c = data.synthetic(1.0, 1.0, num_clients=6, dim=8, num_classes=4, samples_per_client=40,
                     seed=4)
  for ca, cb in zip(a.clients, b.clients):
    np.testing.assert_array_equal(ca["x"], cb["x"])
    np.testing.assert_array_equal(ca["y"], cb["y"])
  assert not np.array_equal(a.clients[0]["x"], c.clients[0]["x"][:len(a.clients[0]["x"])])
  assert a.num_clients == 6 and a.num_classes == 4
  for cl in a.clients:
    assert cl["x"].dtype == np.float32 and cl["x"].shape[1] == 8
    assert cl["y"].dtype == np.int32 and cl["y"].min() >= 0 and cl["y"].max() < 4
  total = a.client_sizes().sum() + len(a.test["y"])
  assert abs(len(a.test["y"]) / total - 0.2) < 0.05


def test_synthetic_beta_controls_feature_heterogeneity():
  def spread(beta):
    d = data.synthetic(0.0, beta, num_clients=40, dim=10, samples_per_client=50, seed=0)
    means = np.stack([c["x"].mean(0) for c in d.clients])
    return means.mean(1).std()  # spread of per-client shifts B_k
  assert spread(5.0) > 3 * spread(0.0)


def test_synthetic_iid_shares_one_labelling():
  d = data.synthetic(5.0, 5.0, num_clients=8, dim=6, num_classes=3, samples_per_client=200,
                     iid=True, seed=1)
  # identical feature distribution: per-client label histograms are close to the pooled one
  pooled = np.bincount(np.concatenate([c["y"] for c in d.clients]), minlength=3)
  pooled = pooled / pooled.sum()
  for c in d.clients:
    h = np.bincount(c["y"], minlength=3) / len(c["y"])
    assert np.abs(h - pooled).max() < 0.2


def test_synthetic_validation():
  with pytest.raises(ValueError, match="alpha"):
    data.synthetic(-1.0, 0.0)
  with pytest.raises(ValueError, match="num_clients"):
    data.synthetic(0.0, 0.0, num_clients=0)


def test_partitions_cover_disjointly_and_skew():
  parts = data.partition_iid(103, 10, seed=1)
  allidx = np.concatenate(parts)
  assert sorted(allidx.tolist()) == list(range(103))
  assert max(map(len, parts)) - min(map(len, parts)) <= 1
  labels = np.random.default_rng(0).integers(0, 10, 5000)

  def skew(alpha):
    ps = data.partition_dirichlet(labels, 20, alpha, seed=2)
    cat = np.concatenate(ps)
    assert len(cat) == len(labels) and len(np.unique(cat)) == len(labels)
    return np.mean([np.bincount(labels[p], minlength=10).max() / max(len(p), 1)
                    for p in ps if len(p)])
  assert skew(0.1) > skew(100.0) + 0.3
  with pytest.raises(ValueError, match="alpha"):
    data.partition_dirichlet(labels, 3, 0.0)


def test_sample_cohort_shapes_padding_and_membership():
  d = data.synthetic(0.5, 0.5, num_clients=7, dim=5, samples_per_client=12, size_sigma=0.0,
                     seed=0)
  c1 = federated.sample_cohort(d, 3, cohort_size=5, local_steps=2, batch_size=4, seed=9,
                               pad_to=4)
  c2 = federated.sample_cohort(d, 3, cohort_size=5, local_steps=2, batch_size=4, seed=9,
                               pad_to=4)
  c3 = federated.sample_cohort(d, 4, cohort_size=5, local_steps=2, batch_size=4, seed=9,
                               pad_to=4)
  np.testing.assert_array_equal(c1.ids, c2.ids)
  np.testing.assert_array_equal(c1.batches["x"], c2.batches["x"])
  assert not np.array_equal(c1.batches["x"], c3.batches["x"])
  assert c1.batches["x"].shape == (8, 2, 4, 5) and c1.mask.shape == (8, 2, 4)
  assert len(set(c1.ids[:5].tolist())) == 5
  np.testing.assert_array_equal(c1.weight[5:], 0.0)
  assert not c1.mask[5:].any() and c1.mask[:5].all()
  sizes = d.client_sizes()
  np.testing.assert_array_equal(c1.weight[:5], sizes[c1.ids[:5]])
  for slot in range(5):
    cx = d.clients[c1.ids[slot]]["x"]
    for row in c1.batches["x"][slot].reshape(-1, 5):
      assert np.any(np.all(cx == row, axis=1))


def test_sample_cohort_single_pass_masks_the_rest():
  d = data.synthetic(0.5, 0.5, num_clients=3, dim=4, samples_per_client=10, size_sigma=0.0,
                     seed=0)
  n = d.client_sizes()
  c = federated.sample_cohort(d, 0, cohort_size=3, local_steps=5, batch_size=4, cycle=False,
                              weighting="uniform")
  for slot in range(3):
    assert c.mask[slot].sum() == min(n[c.ids[slot]], 20)
    rows = c.batches["x"][slot].reshape(-1, 4)[c.mask[slot].reshape(-1)]
    assert len(np.unique(rows, axis=0)) == len(rows)  # no repeats within one pass
  np.testing.assert_array_equal(c.weight, 1.0)
  with pytest.raises(ValueError, match="weighting"):
    federated.sample_cohort(d, 0, cohort_size=1, local_steps=1, batch_size=1, weighting="x")


def test_load_tfds_without_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"fedjax_compress\[data\]"):
    data.load_tfds("cifar10", data_dir="/nonexistent")
  with pytest.raises(ValueError, match="partition"):
    data.load_tfds("cifar10", partition="bogus")


def test_load_tfds_missing_data_is_a_clear_error(monkeypatch):
  class FakeTfds:
    @staticmethod
    def load(*a, **k):
      raise AssertionError("Dataset cifar10: could not find data in /x")

    as_numpy = staticmethod(lambda x: x)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds)
  with pytest.raises(FileNotFoundError, match="download=True"):
    data.load_tfds("cifar10", data_dir="/x")


def test_shakespeare_helpers():
  text = "First Citizen:\nBefore we proceed.\nHear me.\n\nAll:\nSpeak.\n\nFirst Citizen:\nYou are.\n"
  roles = data.split_by_role(text)
  assert roles == {"First Citizen": "Before we proceed.\nHear me.\nYou are.\n", "All": "Speak.\n"}
  vocab = "".join(sorted(set(text)))
  seq = data.char_sequences(roles["All"], vocab, 3)
  ids = [vocab.index(ch) for ch in "Speak.\n"]
  assert seq["x"].tolist() == [ids[0:3], ids[3:6]]
  assert seq["y"].tolist() == [ids[1:4], ids[4:7]]


def _ids_images(n: int, shape: tuple, seed: int) -> np.ndarray:
  """uint8 images [n, *shape] whose first two pixels encode the example index (i % 256, i // 256)."""
  img = np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)
  img[:, 0, 0, 0] = np.arange(n) % 256
  img[:, 0, 1, 0] = np.arange(n) // 256
  return img


def _decode_ids(x: np.ndarray) -> np.ndarray:
  """Example indices from float images in [0, 1] made by `_ids_images`."""
  px = np.rint(x[:, 0, :2, 0] * 255).astype(np.int64)
  return px[:, 0] + 256 * px[:, 1]


class _FakeTfds:
  """`tensorflow_datasets` stand-in serving fixed splits; records every `load` call."""

  def __init__(self, splits: dict):
    self.splits, self.calls = splits, []

  def load(self, name, *, split, batch_size, data_dir, download):
    self.calls.append((name, split, batch_size, data_dir, download))
    return self.splits[split]

  @staticmethod
  def as_numpy(x):
    return x


def _image_splits(n_train: int, n_test: int, shape: tuple, classes: int) -> dict:
  """Fake tfds image splits (uint8 images, int64 labels covering every class)."""
  rng = np.random.default_rng(7)
  return {"train": {"image": _ids_images(n_train, shape, 0),
                    "label": rng.permutation(np.arange(n_train) % classes).astype(np.int64)},
          "test": {"image": _ids_images(n_test, shape, 1),
                   "label": (np.arange(n_test) % classes).astype(np.int64)}}


def _check_images(d, splits: dict, shape: tuple, classes: int) -> np.ndarray:
  """Shapes, dtypes, exact pixels and labels; the partition is disjoint and covering.

  Returns the client index arrays (into the train split)."""
  train, test = splits["train"], splits["test"]
  assert d.num_classes == classes
  parts = []
  for c in d.clients:
    assert c["x"].dtype == np.float32 and c["y"].dtype == np.int32
    assert c["x"].shape == (len(c["y"]),) + shape
    ids = _decode_ids(c["x"])
    np.testing.assert_array_equal(c["x"], train["image"][ids].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(c["y"], train["label"][ids])
    parts.append(ids)
  allids = np.concatenate(parts)
  assert len(allids) == len(train["label"])
  np.testing.assert_array_equal(np.sort(allids), np.arange(len(train["label"])))
  assert d.test["x"].dtype == np.float32 and d.test["y"].dtype == np.int32
  np.testing.assert_array_equal(d.test["x"], test["image"].astype(np.float32) / 255.0)
  np.testing.assert_array_equal(d.test["y"], test["label"])
  assert 0.0 <= min(c["x"].min() for c in d.clients if len(c["y"]))
  assert max(c["x"].max() for c in d.clients if len(c["y"])) <= 1.0
  return parts


def test_load_tfds_emnist_dirichlet(monkeypatch):
  """EMNIST (62 classes, 28x28x1): the loader's Dirichlet split (it has no per-writer split)."""
  splits = _image_splits(620, 124, (28, 28, 1), 62)
  fake = _FakeTfds(splits)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  d = data.load_tfds("emnist", data_dir="/tfds", num_clients=8, alpha=0.3, seed=1)
  assert d.num_clients == 8 and d.name == "emnist"
  assert sorted(fake.calls) == [("emnist", s, -1, "/tfds", False) for s in ("test", "train")]
  parts = _check_images(d, splits, (28, 28, 1), 62)
  want = data.partition_dirichlet(splits["train"]["label"], 8, 0.3, seed=1)
  for got, ref in zip(parts, want):
    np.testing.assert_array_equal(got, ref)
  again = data.load_tfds("emnist", data_dir="/tfds", num_clients=8, alpha=0.3, seed=1)
  other = data.load_tfds("emnist", data_dir="/tfds", num_clients=8, alpha=0.3, seed=2)
  assert all(np.array_equal(a["y"], b["y"]) for a, b in zip(d.clients, again.clients))
  assert not all(np.array_equal(a["y"], b["y"]) for a, b in zip(d.clients, other.clients))


def test_load_tfds_cifar10_iid(monkeypatch):
  """CIFAR-10 (32x32x3): IID split into near-equal clients, passing download through."""
  splits = _image_splits(303, 50, (32, 32, 3), 10)
  fake = _FakeTfds(splits)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  d = data.load_tfds("cifar10", num_clients=7, partition="iid", download=True, seed=3)
  assert {c[1:] for c in fake.calls} == {("train", -1, None, True), ("test", -1, None, True)}
  assert d.num_clients == 7
  parts = _check_images(d, splits, (32, 32, 3), 10)
  sizes = d.client_sizes()
  assert sizes.sum() == 303 and sizes.max() - sizes.min() <= 1
  for got, ref in zip(parts, data.partition_iid(303, 7, seed=3)):
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_load_tfds_fashion_mnist_partitions(monkeypatch, partition):
  """Fashion-MNIST: both partitions cover the train split disjointly; Dirichlet 0.1 is skewed."""
  splits = _image_splits(1000, 100, (28, 28, 1), 10)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds(splits))
  d = data.load_tfds("fashion_mnist", num_clients=10, partition=partition, alpha=0.1)
  assert d.num_clients == 10
  _check_images(d, splits, (28, 28, 1), 10)
  top = np.mean([np.bincount(c["y"], minlength=10).max() / len(c["y"])
                 for c in d.clients if len(c["y"])])
  if partition == "iid":
    assert top < 0.3  # ~uniform labels on every client (0.1 expected)
  else:
    assert top > 0.5  # alpha 0.1: most of a client's examples share one label


_PLAY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
         "All:\nSpeak, speak.\n\n"
         "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
         "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n\n"
         "Boy:\nAy.\n\n")


def test_load_tfds_tiny_shakespeare_by_role(monkeypatch):
  """tiny_shakespeare: one client per speaking role with enough text, windows of the role's lines."""
  test_text = "MENENIUS:\nZounds, what is the matter here?\n"  # 'Z' is not in the train vocab
  fake = _FakeTfds({"train": {"text": np.array([_PLAY.encode()])},
                    "test": {"text": np.array([test_text.encode()])}})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  d = data.load_tfds("tiny_shakespeare", num_clients=3, partition="iid", seq_len=8)
  vocab = "".join(sorted(set(_PLAY)))
  assert d.num_classes == len(vocab) and d.name == "tiny_shakespeare"
  roles = data.split_by_role(_PLAY)
  kept = [t for t in roles.values() if (len(t) - 1) // 8 > 0]  # 'Boy' (4 chars) has no window
  assert len(roles) == 4 and d.num_clients == len(kept) == 3  # num_clients is ignored
  for c, text in zip(d.clients, kept):
    assert c["x"].dtype == np.int32 and c["y"].dtype == np.int32
    n = (len(text) - 1) // 8
    assert c["x"].shape == c["y"].shape == (n, 8)
    assert "".join(vocab[i] for i in c["x"].reshape(-1)) == text[:8 * n]
    assert "".join(vocab[i] for i in c["y"].reshape(-1)) == text[1:8 * n + 1]
  ids = [vocab.index(ch) if ch in vocab else 0 for ch in test_text]
  n = (len(ids) - 1) // 8
  np.testing.assert_array_equal(d.test["x"], np.array(ids[:8 * n]).reshape(n, 8))
  np.testing.assert_array_equal(d.test["y"], np.array(ids[1:8 * n + 1]).reshape(n, 8))
  assert "Z" not in vocab and test_text[10] == "Z" and d.test["x"][1, 2] == 0  # unknown -> 0


def test_partition_classes_gives_each_client_k_classes():
  labels = np.random.default_rng(0).integers(0, 10, 3000)
  for clients, k in ((20, 2), (7, 3), (3, 2), (4, 12)):
    parts = data.partition_classes(labels, clients, k, seed=1)
    assert len(parts) == clients
    for p in parts:
      assert len(np.unique(labels[p])) == min(k, 10)
    cat = np.concatenate(parts)
    assert len(np.unique(cat)) == len(cat)  # disjoint
    held = {int(c) for p in parts for c in np.unique(labels[p])}
    assert len(cat) == np.isin(labels, list(held)).sum()  # every example of a held class
  assert len(np.unique(np.concatenate(data.partition_classes(labels, 20, 2)))) == 3000
  # 3 clients x 2 classes cover 6 of 10 classes; a different seed deals other classes
  a = {int(c) for p in data.partition_classes(labels, 3, 2, seed=1) for c in labels[p]}
  b = {int(c) for p in data.partition_classes(labels, 3, 2, seed=2) for c in labels[p]}
  assert len(a) == len(b) == 6 and a != b
  with pytest.raises(ValueError, match="classes_per_client"):
    data.partition_classes(labels, 3, 0)


def test_load_digits_real_data_partitions():
  pytest.importorskip("sklearn")
  from sklearn.datasets import load_digits as sk
  ref = sk()
  d = data.load_digits(12, partition="classes", classes_per_client=2, seed=0)
  assert d.num_clients == 12 and d.num_classes == 10 and d.name == "digits:classes(2)"
  assert d.clients[0]["x"].dtype == np.float32 and d.clients[0]["x"].shape[1:] == (8, 8, 1)
  assert d.test["y"].dtype == np.int32
  allx = np.concatenate([c["x"] for c in d.clients] + [d.test["x"]])
  ally = np.concatenate([c["y"] for c in d.clients] + [d.test["y"]])
  assert len(ally) == 1797 and allx.min() == 0.0 and allx.max() == 1.0
  # the same multiset of (image, label) pairs as scikit-learn's, pixels / 16
  key = lambda x, y: sorted(map(tuple, np.concatenate([x.reshape(len(y), -1),  # noqa: E731
                                                       y[:, None]], 1).round(3).tolist()))
  assert key(allx * 16, ally) == key(ref.images.astype(np.float64), ref.target)
  for c in d.clients:
    assert len(np.unique(c["y"])) == 2
  # stratified test split: 20% of each class
  counts = np.bincount(ref.target, minlength=10)
  np.testing.assert_array_equal(np.bincount(d.test["y"], minlength=10),
                                np.round(0.2 * counts).astype(int))
  skewed = data.load_digits(12, partition="dirichlet", alpha=0.1, seed=0)
  iid = data.load_digits(12, partition="iid", seed=0)
  top = lambda fd: np.mean([np.bincount(c["y"]).max() / len(c["y"])  # noqa: E731
                            for c in fd.clients if len(c["y"])])
  assert top(skewed) > top(iid) + 0.3
  np.testing.assert_array_equal(skewed.test["y"], iid.test["y"])  # same held-out split
  again = data.load_digits(12, partition="dirichlet", alpha=0.1, seed=0)
  np.testing.assert_array_equal(again.client_sizes(), skewed.client_sizes())
  with pytest.raises(ValueError, match="partition"):
    data.load_digits(5, partition="shards")
  with pytest.raises(ValueError, match="images"):
    data.load_digits(5, images=(np.zeros((3, 28, 28)), np.zeros(3)))


def test_readme_own_arrays_snippet_runs():
  import os
  import re
  readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
  section = readme.split("## Your own data", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len(code.strip().splitlines()) == 3
  rng = np.random.default_rng(0)
  ns = {"x_train": rng.normal(size=(500, 4)).astype(np.float32),
        "y_train": rng.integers(0, 10, 500).astype(np.int32),
        "x_test": rng.normal(size=(50, 4)).astype(np.float32),
        "y_test": rng.integers(0, 10, 50).astype(np.int32)}
  exec(code, ns)  # pylint: disable=exec-used
  fd = ns["fd"]
  assert fd.num_clients == 100 and fd.client_sizes().sum() == 500
  c = federated.sample_cohort(fd, 0, cohort_size=4, local_steps=1, batch_size=3)
  assert c.batches["x"].shape == (4, 1, 3, 4)


def test_runner_loads_digits_by_name():
  pytest.importorskip("sklearn")
  from experiments.common import runner
  d = runner.make_dataset({"name": "digits", "num_clients": 6, "partition": "classes",
                           "classes_per_client": 3, "seed": 1})
  ref = data.load_digits(6, partition="classes", classes_per_client=3, seed=1)
  assert d.name == ref.name and d.num_clients == 6
  for a, b in zip(d.clients, ref.clients):
    np.testing.assert_array_equal(a["y"], b["y"])
