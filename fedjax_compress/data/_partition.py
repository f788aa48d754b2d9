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


def partition_classes(labels: np.ndarray, num_clients: int, classes_per_client: int,
                      seed: int = 0) -> list[np.ndarray]:
  """Pathological label skew: every client holds (at most) `classes_per_client` classes.

  With the classes in a random order `pi` (from `seed`), client `i` holds classes
  `pi[(i k + j) mod C]`, `j < k`; each class's shuffled examples are split as evenly as
  possible among the clients holding it. When `num_clients * k >= C` every example goes to
  exactly one client; otherwise the classes nobody holds are left out. A client has fewer
  than `k` classes only if `k > C` or a class has fewer examples than holders.

  >>> parts = partition_classes(np.repeat(np.arange(4), 5), 4, 2, seed=0)
  >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(20))
  ([6, 6, 4, 4], True)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  k = checks.check_positive_int(classes_per_client, "classes_per_client")
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  classes = rng.permutation(np.unique(labels))
  holders: dict[int, list[int]] = {}
  for i in range(num_clients):
    for j in range(min(k, len(classes))):
      holders.setdefault(int((i * k + j) % len(classes)), []).append(i)
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for pos, hs in holders.items():
    idx = rng.permutation(np.flatnonzero(labels == classes[pos]))
    for h, chunk in zip(hs, np.array_split(idx, len(hs))):
      parts[h].append(chunk)
  return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
          for p in parts]
