"""`FederatedData`: per-client NumPy arrays plus a pooled evaluation set."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset held in host memory.

  Attributes:
    clients: one dict per client of arrays sharing their leading (example) axis, e.g.
      `{'x': float32[n_k, d], 'y': int32[n_k]}`; every client has the same keys. A list,
      or any sequence that reads clients on access (`data.SQLiteClientList`).
    test: pooled evaluation arrays with the same keys.
    num_classes: number of labels (vocabulary size for language models).
    name: a short description.
  """

  clients: list[dict[str, np.ndarray]]
  test: dict[str, np.ndarray]
  num_classes: int
  name: str = ""

  @property
  def num_clients(self) -> int:
    """Number of clients."""
    return len(self.clients)

  def client_sizes(self) -> np.ndarray:
    """int64[num_clients] example counts."""
    key = next(iter(self.clients[0])) if self.clients else None
    return np.array([len(c[key]) for c in self.clients], np.int64)


def from_partition(arrays: dict[str, np.ndarray], parts: list[np.ndarray],
                   test: dict[str, np.ndarray], num_classes: int, name: str = ""
                   ) -> FederatedData:
  """`FederatedData` whose client `k` holds `arrays[key][parts[k]]`."""
  clients = [{k: v[np.asarray(p, np.int64)] for k, v in arrays.items()} for p in parts]
  return FederatedData(clients, test, num_classes, name)
