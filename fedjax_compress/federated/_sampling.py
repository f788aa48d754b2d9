"""Host-side cohort builder: fixed-shape, padded `Cohort`s from a `FederatedData` (NumPy).

Client samplers (`uniform_sampler`, `epoch_sampler`, `fixed_sampler`) are pure functions of
the round number, `sampler(round_index) -> int64[<= cohort_size]` client ids, so a resumed
run draws the same cohorts; pass one to `sample_cohort(..., sampler=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData
from fedjax_compress.federated._state import Cohort


def _client_indices(rng: np.random.Generator, n: int, need: int, cycle: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`need` example indices of a client with `n` examples and their validity mask."""
  if n == 0:
    return np.zeros(need, np.int64), np.zeros(need, bool)
  if cycle:  # successive shuffled epochs, cut at `need` examples
    reps = -(-need // n)
    idx = np.concatenate([rng.permutation(n) for _ in range(reps)])[:need]
    return idx, np.ones(need, bool)
  take = min(n, need)  # at most one pass; the rest is padding
  idx = np.zeros(need, np.int64)
  idx[:take] = rng.permutation(n)[:take]
  mask = np.zeros(need, bool)
  mask[:take] = True
  return idx, mask


@dataclasses.dataclass(frozen=True)
class UniformSampler:
  """`cohort_size` clients drawn uniformly from `num_clients` each round (see `uniform_sampler`)."""

  num_clients: int
  cohort_size: int
  replace: bool = False
  seed: int = 0

  def __call__(self, round_index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, _round(round_index)])
    return rng.choice(self.num_clients, size=self.cohort_size, replace=self.replace
                      ).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class EpochSampler:
  """Shuffled epochs over the clients (see `epoch_sampler`)."""

  num_clients: int
  cohort_size: int
  seed: int = 0

  @property
  def rounds_per_epoch(self) -> int:
    """`ceil(num_clients / cohort_size)`."""
    return -(-self.num_clients // self.cohort_size)

  def __call__(self, round_index: int) -> np.ndarray:
    epoch, slot = divmod(_round(round_index), self.rounds_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_clients)
    return perm[slot * self.cohort_size:(slot + 1) * self.cohort_size].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class FixedSampler:
  """A fixed cohort, or a fixed schedule of cohorts cycled over rounds (see `fixed_sampler`)."""

  schedule: tuple[tuple[int, ...], ...]
  num_clients: Optional[int] = None

  @property
  def cohort_size(self) -> int:
    """The largest cohort of the schedule."""
    return max(len(c) for c in self.schedule)

  def __call__(self, round_index: int) -> np.ndarray:
    return np.array(self.schedule[_round(round_index) % len(self.schedule)], np.int64)


def _round(round_index: int) -> int:
  r = int(round_index)
  if r != round_index or r < 0:
    raise ValueError(f"round_index must be an integer >= 0, got {round_index}")
  return r


def uniform_sampler(num_clients: int, cohort_size: int, *, replace: bool = False,
                    seed: int = 0) -> UniformSampler:
  """Uniform client sampling, reproducible by round: ids of round r from `rng(seed, r)`.

  Without replacement (FedJAX's `UniformGetClientSampler`) every round is a uniformly random
  `cohort_size`-subset, each client in it with probability `cohort_size / num_clients`;
  with replacement every slot is an independent uniform draw, so a client can appear more
  than once (each draw trains and is weighted; duplicates share their round keys, and a
  stateful compressor keeps the state of one of them). `replace=False, seed=s` draws the
  same ids as `sample_cohort(..., seed=s)` without a sampler.

  >>> s = uniform_sampler(10, 3, seed=0)
  >>> s(4).tolist() == s(4).tolist(), len(set(s(4).tolist()))
  (True, 3)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  cohort_size = checks.check_positive_int(cohort_size, "cohort_size")
  if not replace and cohort_size > num_clients:
    raise ValueError(f"cohort_size={cohort_size} > num_clients={num_clients} needs "
                     "replace=True")
  return UniformSampler(num_clients, cohort_size, bool(replace), int(seed))


def epoch_sampler(num_clients: int, cohort_size: int, *, seed: int = 0) -> EpochSampler:
  """Shuffled epochs: every client exactly once per epoch, in a fresh order each epoch.

  Epoch `e = r // R` (`R = ceil(num_clients / cohort_size)` rounds) is the permutation
  `pi_e = rng(seed, e).permutation(num_clients)`, and round `r` takes its slice
  `pi_e[j C:(j + 1) C]`, `j = r mod R`; the last round of an epoch has
  `num_clients mod C` clients when C does not divide the count (`sample_cohort` pads it).

  >>> s = epoch_sampler(5, 2, seed=0)
  >>> sorted(np.concatenate([s(r) for r in range(3)]).tolist()), len(s(2))
  ([0, 1, 2, 3, 4], 1)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  cohort_size = checks.check_positive_int(cohort_size, "cohort_size")
  return EpochSampler(num_clients, min(cohort_size, num_clients), int(seed))


def fixed_sampler(cohorts: Union[Sequence[int], Sequence[Sequence[int]], np.ndarray], *,
                  num_clients: Optional[int] = None) -> FixedSampler:
  """The same cohort every round (1-D `cohorts`), or cohort `r mod len(cohorts)` of a list.

  `num_clients`, if given, checks the ids against `[0, num_clients)` now.

  >>> fixed_sampler([3, 1])(7).tolist(), fixed_sampler([[0], [2, 4]])(3).tolist()
  ([3, 1], [2, 4])
  """
  if num_clients is not None:
    num_clients = checks.check_positive_int(num_clients, "num_clients")
  seq = list(cohorts.tolist() if isinstance(cohorts, np.ndarray) else cohorts)
  if not seq:
    raise ValueError("cohorts must not be empty")
  nested = [list(np.atleast_1d(c).tolist()) for c in seq] if np.ndim(seq[0]) else [seq]
  schedule = []
  for c in nested:
    ids = np.asarray(c)
    if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"cohorts must be non-empty lists of integer client ids, got {c!r}")
    if len(np.unique(ids)) != len(ids):
      raise ValueError(f"cohorts must not repeat a client within a round, got {c!r}")
    if (ids < 0).any() or (num_clients is not None and (ids >= num_clients).any()):
      raise ValueError(f"cohorts hold ids outside [0, {num_clients or 'num_clients'}): {c!r}")
    schedule.append(tuple(int(i) for i in ids))
  return FixedSampler(tuple(schedule), num_clients)


Sampler = Callable[[int], np.ndarray]


def _sampled_ids(sampler: Sampler, round_index: int, num_clients: int,
                 cohort_size: int) -> np.ndarray:
  """`sampler(round_index)` checked: 1-D integer ids in range, at most `cohort_size`."""
  own = getattr(sampler, "num_clients", None)
  if own is not None and own != num_clients:
    raise ValueError(f"the sampler draws from num_clients={own} but the data have "
                     f"{num_clients} clients")
  ids = np.asarray(sampler(round_index))
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"sampler must return 1-D integer client ids, got {ids.dtype} {ids.shape}")
  if len(ids) > cohort_size:
    raise ValueError(f"sampler returned {len(ids)} clients for round {round_index}, more "
                     f"than cohort_size={cohort_size}")
  if len(ids) and (ids.min() < 0 or ids.max() >= num_clients):
    raise ValueError(f"sampler returned ids outside [0, {num_clients}) for round {round_index}")
  return ids.astype(np.int64)


def sample_cohort(data: FederatedData, round_index: int, *, cohort_size: int,
                  local_steps: int, batch_size: int, seed: int = 0, pad_to: int = 1,
                  weighting: str = "num_examples", cycle: bool = True,
                  sampler: Optional[Sampler] = None) -> Cohort:
  """Sample `cohort_size` distinct clients for round `round_index` and cut their batches.

  Deterministic in `(seed, round_index)` (so resumed runs see the same cohorts). `sampler`
  (e.g. `epoch_sampler(n, c)`) replaces the default uniform draw: the cohort is
  `sampler(round_index)` (at most `cohort_size` ids; fewer are padded). Each client
  gets `local_steps` minibatches of `batch_size` examples: successive shuffled epochs of its
  data (`cycle=True`) or at most one pass with the rest masked (`cycle=False`). The cohort is
  padded with weight-0, all-masked clients (id 0) up to a multiple of `pad_to` (e.g. the
  device count). `weighting`: 'num_examples' (FedAvg's n_k) or 'uniform'.

  >>> from fedjax_compress import data, federated
  >>> d = data.synthetic(0.5, 0.5, num_clients=10, seed=0)
  >>> c = federated.sample_cohort(d, 0, cohort_size=3, local_steps=2, batch_size=4, pad_to=4)
  >>> c.batches['x'].shape, c.mask.shape, int((c.weight > 0).sum())
  ((4, 2, 4, 60), (4, 2, 4), 3)
  """
  cohort_size = checks.check_positive_int(cohort_size, "cohort_size")
  local_steps = checks.check_positive_int(local_steps, "local_steps")
  batch_size = checks.check_positive_int(batch_size, "batch_size")
  pad_to = checks.check_positive_int(pad_to, "pad_to")
  if weighting not in ("num_examples", "uniform"):
    raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
  if round_index < 0:
    raise ValueError(f"round_index must be >= 0, got {round_index}")
  if sampler is None:
    rng = np.random.default_rng([seed, round_index])
    real = min(cohort_size, data.num_clients)
    ids = rng.choice(data.num_clients, size=real, replace=False)
  else:
    ids = _sampled_ids(sampler, round_index, data.num_clients, cohort_size)
    rng = np.random.default_rng([seed, round_index, 1])  # the batches' stream
  size = -(-cohort_size // pad_to) * pad_to
  need = local_steps * batch_size
  keys = sorted(data.clients[0])
  batches = {k: np.zeros((size, local_steps, batch_size) + data.clients[0][k].shape[1:],
                         data.clients[0][k].dtype) for k in keys}
  mask = np.zeros((size, local_steps, batch_size), bool)
  weight = np.zeros(size, np.float32)
  out_ids = np.zeros(size, np.int32)
  for slot, cid in enumerate(ids):
    client = data.clients[int(cid)]
    n = len(client[keys[0]])
    idx, m = _client_indices(rng, n, need, cycle)
    for k in keys:
      if n:
        batches[k][slot] = client[k][idx].reshape((local_steps, batch_size)
                                                  + client[k].shape[1:])
    mask[slot] = m.reshape(local_steps, batch_size)
    weight[slot] = float(n) if weighting == "num_examples" else float(n > 0)
    out_ids[slot] = cid
  return Cohort(ids=out_ids, batches=batches, mask=mask, weight=weight)
