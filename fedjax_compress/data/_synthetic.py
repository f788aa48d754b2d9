"""FedProx-style Synthetic(alpha, beta): non-IID multinomial logistic regression data (NumPy)."""

from __future__ import annotations

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData


def synthetic(alpha: float, beta: float, num_clients: int = 30, *, dim: int = 60,
              num_classes: int = 10, samples_per_client: int = 100, size_sigma: float = 0.5,
              test_fraction: float = 0.2, iid: bool = False, seed: int = 0) -> FederatedData:
  """Synthetic(alpha, beta) federated classification data, generated offline from `seed`.

  Client k draws `u_k ~ N(0, alpha^2)`, `B_k ~ N(0, beta^2)` (alpha, beta are standard
  deviations), a model `W_k ~ N(u_k, 1)^{dim x classes}`, `b_k ~ N(u_k, 1)^{classes}`, a
  feature mean `v_k ~ N(B_k, 1)^{dim}`, and examples `x ~ N(v_k, diag(j^-1.2))`,
  `y = argmax(x W_k + b_k)`. `alpha` controls how much the models differ across clients,
  `beta` how much the features do; `iid=True` shares one model and `v = 0`. Client sizes
  are log-normal around `samples_per_client` (spread `size_sigma`, at least 10);
  `test_fraction` of every client's examples is pooled into `test`.

  >>> d = synthetic(1.0, 1.0, num_clients=5, seed=0)
  >>> d.num_clients, d.clients[0]['x'].shape[1], d.test['y'].dtype
  (5, 60, dtype('int32'))
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  dim = checks.check_positive_int(dim, "dim")
  num_classes = checks.check_positive_int(num_classes, "num_classes")
  samples_per_client = checks.check_positive_int(samples_per_client, "samples_per_client")
  if alpha < 0 or beta < 0 or size_sigma < 0:
    raise ValueError(f"alpha, beta, size_sigma must be >= 0, got {alpha}, {beta}, {size_sigma}")
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  std_x = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
  sizes = np.maximum(10, rng.lognormal(np.log(samples_per_client), size_sigma,
                                       num_clients)).astype(np.int64)
  shared_w = rng.normal(0, 1, (dim, num_classes))
  shared_b = rng.normal(0, 1, num_classes)
  clients, test_x, test_y = [], [], []
  for k in range(num_clients):
    if iid:
      w, b, v = shared_w, shared_b, np.zeros(dim)
    else:
      u = rng.normal(0, alpha)
      big_b = rng.normal(0, beta)
      w = rng.normal(u, 1, (dim, num_classes))
      b = rng.normal(u, 1, num_classes)
      v = rng.normal(big_b, 1, dim)
    x = v[None, :] + std_x[None, :] * rng.normal(0, 1, (sizes[k], dim))
    y = np.argmax(x @ w + b[None, :], axis=1)
    n_test = int(round(test_fraction * sizes[k]))
    clients.append({"x": x[n_test:].astype(np.float32), "y": y[n_test:].astype(np.int32)})
    test_x.append(x[:n_test])
    test_y.append(y[:n_test])
  test = {"x": np.concatenate(test_x).astype(np.float32),
          "y": np.concatenate(test_y).astype(np.int32)}
  return FederatedData(clients, test, num_classes, f"synthetic({alpha},{beta})")
