"""Offline synthetic data (NumPy): FedProx-style Synthetic(alpha, beta) and stroke images."""

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


def _stroke(size: int, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
  """`[size, size]` image of the segment p0-p1 (row, col) with a Gaussian profile of `width` px."""
  grid = np.stack(np.mgrid[0:size, 0:size], -1).astype(np.float64)
  d = p1 - p0
  t = np.clip((grid - p0) @ d / max(float(d @ d), 1e-12), 0.0, 1.0)
  dist2 = ((grid - p0 - t[..., None] * d) ** 2).sum(-1)
  return np.exp(-dist2 / (2 * width**2))


def _templates(rng: np.random.Generator, num_classes: int, prototypes: int, strokes: int,
               size: int) -> np.ndarray:
  """`[classes, prototypes, size, size]` images, each the max of `strokes` random strokes."""
  lo, hi = 0.25 * size, 0.75 * size
  out = np.zeros((num_classes, prototypes, size, size))
  for c in range(num_classes):
    for p in range(prototypes):
      for _ in range(strokes):
        seg = _stroke(size, rng.uniform(lo, hi, 2), rng.uniform(lo, hi, 2), 1.0)
        out[c, p] = np.maximum(out[c, p], seg)
  return out


def synthetic_images(num_train: int, num_test: int = 1000, *, image_size: int = 28,
                     num_classes: int = 10, prototypes: int = 3, strokes: int = 3,
                     max_shift: int = 2, noise: float = 0.3, seed: int = 0
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """MNIST-shaped stroke images `(train, test)`, generated offline from `seed`.

  Every class has `prototypes` templates, each the pixelwise max of `strokes` random
  line segments (Gaussian profile, 1 px) in the central half of the image. An example of
  class `c` is a uniformly chosen template of `c`, shifted by up to `max_shift` pixels in
  each direction (zero fill), scaled by `U(0.6, 1.4)`, plus `N(0, noise^2)` pixel noise.
  Labels are balanced (`n // classes` or one more per class) and shuffled. Arrays:
  `x: float32[n, image_size, image_size, 1]`, `y: int32[n]`; train and test share the
  templates. Shifts make it a task for convolutions; `noise` sets the difficulty.

  >>> tr, te = synthetic_images(20, 10, seed=0)
  >>> tr['x'].shape, tr['x'].dtype, te['y'].dtype, sorted(set(tr['y'].tolist())) == list(range(10))
  ((20, 28, 28, 1), dtype('float32'), dtype('int32'), True)
  """
  num_train = checks.check_positive_int(num_train, "num_train")
  num_test = checks.check_positive_int(num_test, "num_test")
  size = checks.check_positive_int(image_size, "image_size")
  num_classes = checks.check_positive_int(num_classes, "num_classes")
  prototypes = checks.check_positive_int(prototypes, "prototypes")
  strokes = checks.check_positive_int(strokes, "strokes")
  if max_shift < 0 or not noise >= 0:
    raise ValueError(f"max_shift and noise must be >= 0, got {max_shift}, {noise}")
  rng = np.random.default_rng(seed)
  s = int(max_shift)
  padded = np.pad(_templates(rng, num_classes, prototypes, strokes, size),
                  ((0, 0), (0, 0), (s, s), (s, s)))

  def draw(n: int) -> dict[str, np.ndarray]:
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    proto = rng.integers(0, prototypes, n)
    shift = rng.integers(-s, s + 1, (n, 2))
    amp = rng.uniform(0.6, 1.4, n)
    x = np.empty((n, size, size), np.float32)
    for i in range(n):
      r, c = s - shift[i, 0], s - shift[i, 1]
      x[i] = amp[i] * padded[y[i], proto[i], r:r + size, c:c + size]
    x += (noise * rng.standard_normal(x.shape)).astype(np.float32)
    return {"x": x[..., None], "y": y}

  return draw(num_train), draw(num_test)
