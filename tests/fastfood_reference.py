"""Float64 NumPy references for the Fastfood map (spec IGC Appendix A, plus the blocked form).

Not a test module: imported by tests/test_fastfood.py and tests/test_igc.py.
"""

import numpy as np
import scipy.linalg


def fwht(x):
  """Unnormalized Walsh-Hadamard transform of a 1-D float64 vector (butterfly)."""
  x, h, n = np.asarray(x, np.float64).copy(), 1, x.shape[0]
  while h < n:
    y = x.reshape(-1, 2, h)
    x = np.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(n)
    h *= 2
  return x


def make(d, D, rng, const_g=False):  # pylint: disable=invalid-name
  """Independent float64 global Fastfood map (Appendix A `make`)."""
  L = 1 << int(np.ceil(np.log2(D)))  # pylint: disable=invalid-name
  B = rng.integers(0, 2, L) * 2 - 1  # pylint: disable=invalid-name
  perm = rng.permutation(L)
  G = np.ones(L) if const_g else rng.standard_normal(L)  # pylint: disable=invalid-name
  scale = 1.0 / (np.sqrt(L * np.sum(G ** 2)) * np.sqrt(D / L))
  return dict(B=B, perm=perm, G=G, L=L, d=d, D=D, scale=scale)


def project(p, z):
  """`V z` (Appendix A)."""
  x = np.zeros(p["L"])
  x[: p["d"]] = z
  x = fwht(x * p["B"])[p["perm"]]
  return fwht(x * p["G"])[: p["D"]] * p["scale"]


def project_T(p, y):  # pylint: disable=invalid-name
  """`V^T y` (Appendix A)."""
  x = np.zeros(p["L"])
  x[: p["D"]] = y
  x = fwht(x) * p["G"]
  u = np.empty_like(x)
  u[p["perm"]] = x
  return (fwht(u) * p["B"])[: p["d"]] * p["scale"]


def dense_from_factors(signs, perm, gauss, d, D, block_rows):  # pylint: disable=invalid-name
  """Dense float64 `V` [D, d] from explicit matrices `H`, `diag(B)`, `P`, `diag(G)` per block.

  Block `b` contributes `(1/sqrt(L ||G_b||^2)) R (H G_b P_b H B_b) E_d` (first `block_rows`
  rows, the last block fewer); the stack is divided by `sqrt(D / L)`.
  """
  signs, perm, gauss = (np.asarray(a) for a in (signs, perm, gauss))
  nb, L = signs.shape  # pylint: disable=invalid-name
  H = scipy.linalg.hadamard(L).astype(np.float64)  # pylint: disable=invalid-name
  blocks = []
  for b in range(nb):
    P = np.zeros((L, L))  # pylint: disable=invalid-name
    P[np.arange(L), perm[b]] = 1.0                       # (P x)_i = x_{perm[i]}
    M = H @ np.diag(gauss[b].astype(np.float64)) @ P @ H @ np.diag(signs[b].astype(np.float64))  # pylint: disable=invalid-name
    M /= np.sqrt(L * np.sum(gauss[b].astype(np.float64) ** 2))
    blocks.append(M[:block_rows, :d])
  return np.concatenate(blocks, axis=0)[:D] / np.sqrt(D / L)
