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
