"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline) as `FederatedData`."""

from __future__ import annotations

from typing import Optional

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData, from_partition
from fedjax_compress.data._partition import (partition_classes, partition_dirichlet,
                                             partition_iid)

_PARTITIONS = ("dirichlet", "classes", "iid")


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits as sk_load  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("load_digits needs scikit-learn; install the data extra: "
                      "pip install 'fedjax_compress[data]' (or pip install scikit-learn)") from e
  bunch = sk_load()
  return np.asarray(bunch.images), np.asarray(bunch.target)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`(train_idx, test_idx)`: `round(test_fraction * n_c)` shuffled examples of each class c to test.

  >>> tr, te = stratified_split(np.repeat(np.arange(2), 10), 0.3)
  >>> len(tr), len(te), sorted(np.concatenate([tr, te]).tolist()) == list(range(20))
  (14, 6, True)
  """
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n = int(round(test_fraction * len(idx)))
    test.append(idx[:n])
    train.append(idx[n:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(num_clients: int = 20, *, partition: str = "dirichlet", alpha: float = 0.5,
                classes_per_client: int = 2, test_fraction: float = 0.2, seed: int = 0,
                images: Optional[tuple[np.ndarray, np.ndarray]] = None) -> FederatedData:
  """The 8x8 digits of `sklearn.datasets.load_digits`, label-skewed over `num_clients`.

  `x = pixels / 16` as `float32[n, 8, 8, 1]` (grey levels 0..16 -> [0, 1]), `y: int32[n]`
  in [0, 10). A stratified `test_fraction` of every class (`stratified_split`) is the pooled
  test set; the rest is split by `partition`: 'dirichlet' (`partition_dirichlet` with
  `alpha`; small alpha = more skew, some clients may be empty), 'classes'
  (`partition_classes`, `classes_per_client` labels per client) or 'iid'. Deterministic in
  `seed`. `images=(images[n, 8, 8], labels[n])` replaces the bundled arrays (for tests).
  Needs scikit-learn (the `data` extra); nothing is downloaded.

  >>> d = load_digits(10, partition="classes", classes_per_client=2)
  >>> d.num_clients, d.clients[0]['x'].shape[1:], len(d.test['y'])
  (10, (8, 8, 1), 359)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  if partition not in _PARTITIONS:
    raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
  img, lab = _sklearn_digits() if images is None else (np.asarray(images[0]),
                                                        np.asarray(images[1]))
  if img.ndim != 3 or img.shape[1:] != (8, 8) or len(lab) != len(img):
    raise ValueError(f"images must be ([n, 8, 8], [n]), got {img.shape} and {np.shape(lab)}")
  x = (img.astype(np.float32) / 16.0)[..., None]
  y = lab.astype(np.int32)
  tr, te = stratified_split(y, test_fraction, seed)
  train = {"x": x[tr], "y": y[tr]}
  test = {"x": x[te], "y": y[te]}
  if partition == "dirichlet":
    parts = partition_dirichlet(train["y"], num_clients, alpha, seed)
  elif partition == "classes":
    parts = partition_classes(train["y"], num_clients, classes_per_client, seed)
  else:
    parts = partition_iid(len(tr), num_clients, seed)
  tag = {"dirichlet": f"dirichlet({alpha})", "classes": f"classes({classes_per_client})",
         "iid": "iid"}[partition]
  return from_partition(train, parts, test, 10, f"digits:{tag}")
