"""Partitions of a centralized dataset into clients: IID and Dirichlet label skew."""

from __future__ import annotations

import numpy as np

from fedjax_compress._src import checks


def partition_iid(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """Shuffle `range(num_examples)` and split it into `num_clients` near-equal index arrays.

  >>> [len(p) for p in partition_iid(10, 3)]
  [4, 3, 3]
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int = 0) -> list[np.ndarray]:
  """Label-skewed split: for each class c, `p_c ~ Dir(alpha * 1_K)` over the K clients and
  the class's (shuffled) examples are cut in proportions `p_c`. Small alpha = more skew.
  Every example goes to exactly one client.

  >>> parts = partition_dirichlet(np.repeat(np.arange(3), 20), 4, alpha=0.5)
  >>> sum(len(p) for p in parts), len(np.unique(np.concatenate(parts)))
  (60, 60)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
    for k, chunk in enumerate(np.split(idx, cuts)):
      parts[k].append(chunk)
  return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
