"""Host-side cohort builder: fixed-shape, padded `Cohort`s from a `FederatedData` (NumPy)."""

from __future__ import annotations

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


def sample_cohort(data: FederatedData, round_index: int, *, cohort_size: int,
                  local_steps: int, batch_size: int, seed: int = 0, pad_to: int = 1,
                  weighting: str = "num_examples", cycle: bool = True) -> Cohort:
  """Sample `cohort_size` distinct clients for round `round_index` and cut their batches.

  Deterministic in `(seed, round_index)` (so resumed runs see the same cohorts). Each client
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
  rng = np.random.default_rng([seed, round_index])
  real = min(cohort_size, data.num_clients)
  ids = rng.choice(data.num_clients, size=real, replace=False)
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
