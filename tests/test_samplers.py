"""Client samplers: distributions over many rounds, reproducibility by round, sample_cohort use."""

import itertools

import numpy as np
import pytest

from fedjax_compress import data, federated

N, C, R = 10, 3, 4000


def _within(count, expected, p, n, sigmas=5.0):
  return abs(count - expected) <= sigmas * np.sqrt(n * p * (1 - p))


def test_uniform_without_replacement_distribution_and_reproducibility():
  s = federated.uniform_sampler(N, C, seed=7)
  rounds = [s(r) for r in range(R)]
  assert all(len(set(ids.tolist())) == C for ids in rounds)  # distinct within a round
  np.testing.assert_array_equal(s(123), rounds[123])  # a pure function of the round
  np.testing.assert_array_equal(federated.uniform_sampler(N, C, seed=7)(5), rounds[5])
  assert not np.array_equal(federated.uniform_sampler(N, C, seed=8)(5), rounds[5]) or \
      not np.array_equal(federated.uniform_sampler(N, C, seed=8)(6), rounds[6])
  counts = np.bincount(np.concatenate(rounds), minlength=N)
  for k in range(N):  # inclusion probability C / N
    assert _within(counts[k], R * C / N, C / N, R)
  pair = sum(1 for ids in rounds if 0 in ids and 1 in ids)  # C (C - 1) / (N (N - 1))
  p2 = C * (C - 1) / (N * (N - 1))
  assert _within(pair, R * p2, p2, R)


def test_uniform_with_replacement_slots_are_independent_draws():
  s = federated.uniform_sampler(N, C, replace=True, seed=1)
  rounds = np.stack([s(r) for r in range(R)])
  for j in range(C):  # every slot uniform over the clients
    counts = np.bincount(rounds[:, j], minlength=N)
    assert all(_within(c, R / N, 1 / N, R) for c in counts)
  dup = np.mean([len(set(r.tolist())) < C for r in rounds])
  p = 1 - (N - 1) * (N - 2) / N**2  # P(some repeat among 3 draws)
  assert _within(dup * R, p * R, p, R)
  big = federated.uniform_sampler(3, 5, replace=True)(0)
  assert len(big) == 5 and big.max() < 3
  with pytest.raises(ValueError, match="replace=True"):
    federated.uniform_sampler(3, 5)


def test_epoch_sampler_visits_every_client_once_per_epoch():
  s = federated.epoch_sampler(N, C, seed=3)
  assert s.rounds_per_epoch == 4
  epochs = []
  for e in range(300):
    rs = [s(e * 4 + j) for j in range(4)]
    assert [len(r) for r in rs] == [3, 3, 3, 1]
    flat = np.concatenate(rs)
    assert sorted(flat.tolist()) == list(range(N))  # each client exactly once
    epochs.append(flat)
  epochs = np.stack(epochs)
  assert len({tuple(e) for e in epochs}) > 290  # a fresh order every epoch
  first = np.bincount(epochs[:, 0], minlength=N)  # position 0 uniform over clients
  assert all(_within(c, 300 / N, 1 / N, 300) for c in first)
  np.testing.assert_array_equal(federated.epoch_sampler(N, C, seed=3)(41), s(41))
  whole = federated.epoch_sampler(4, 9)
  assert whole.cohort_size == 4 and sorted(whole(5).tolist()) == [0, 1, 2, 3]


def test_fixed_sampler_schedule_and_validation():
  s = federated.fixed_sampler([4, 2, 7])
  assert all(s(r).tolist() == [4, 2, 7] for r in range(5)) and s.cohort_size == 3
  sched = federated.fixed_sampler(np.array([[0, 1], [2, 3], [4, 5]]), num_clients=6)
  assert [sched(r).tolist() for r in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]
  ragged = federated.fixed_sampler([[1], [2, 3]])
  assert ragged.cohort_size == 2 and ragged(1).dtype == np.int64
  for bad, match in (([], "empty"), ([1, 1], "repeat"), ([[0], []], "non-empty"),
                     ([0.5], "integer"), ([-1], "outside")):
    with pytest.raises(ValueError, match=match):
      federated.fixed_sampler(bad)
  with pytest.raises(ValueError, match="outside"):
    federated.fixed_sampler([5], num_clients=5)
  with pytest.raises(ValueError, match="round_index"):
    s(-1)


def test_sample_cohort_with_samplers():
  d = data.synthetic(0.5, 0.5, num_clients=N, dim=3, samples_per_client=8, size_sigma=0.0,
                     seed=0)
  kw = dict(cohort_size=C, local_steps=1, batch_size=2, seed=5)
  # the uniform sampler with the run's seed draws the default cohorts
  for r in range(5):
    a = federated.sample_cohort(d, r, **kw)
    b = federated.sample_cohort(d, r, sampler=federated.uniform_sampler(N, C, seed=5), **kw)
    np.testing.assert_array_equal(a.ids, b.ids)
  ep = federated.epoch_sampler(N, C, seed=1)
  seen = []
  for r in range(4):
    c = federated.sample_cohort(d, r, sampler=ep, pad_to=2, **kw)
    real = c.weight > 0
    np.testing.assert_array_equal(c.ids[real], ep(r))
    assert c.ids.shape == (4,)  # cohort_size 3 padded to a multiple of 2
    seen += c.ids[real].tolist()
  assert sorted(seen) == list(range(N))
  again = federated.sample_cohort(d, 2, sampler=ep, pad_to=2, **kw)
  c2 = federated.sample_cohort(d, 2, sampler=ep, pad_to=2, **kw)
  np.testing.assert_array_equal(again.batches["x"], c2.batches["x"])
  rep = federated.sample_cohort(d, 0, sampler=federated.fixed_sampler([2, 5]),
                                **kw)
  assert rep.ids[:2].tolist() == [2, 5]
  dup = federated.uniform_sampler(N, C, replace=True, seed=0)
  r = next(r for r in itertools.count() if len(set(dup(r).tolist())) < C)
  c = federated.sample_cohort(d, r, sampler=dup, **kw)
  assert c.ids.tolist() == dup(r).tolist() and (c.weight > 0).all()
  with pytest.raises(ValueError, match="more than cohort_size"):
    federated.sample_cohort(d, 0, sampler=federated.fixed_sampler(list(range(4))), **kw)
  with pytest.raises(ValueError, match="num_clients=11"):
    federated.sample_cohort(d, 0, sampler=federated.uniform_sampler(11, C), **kw)
  with pytest.raises(ValueError, match="outside"):
    federated.sample_cohort(d, 0, sampler=lambda r: np.array([0, N]), **kw)
  with pytest.raises(ValueError, match="1-D integer"):
    federated.sample_cohort(d, 0, sampler=lambda r: np.array([0.0]), **kw)
