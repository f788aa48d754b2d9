"""Float64 NumPy references for the baseline compressors (used by test_baselines.py)."""

from __future__ import annotations

import numpy as np


def ravel(tree_leaves) -> np.ndarray:
  """Concatenate arrays (pytree leaf order) into one float64 vector."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in tree_leaves])


def top_k(vec: np.ndarray, k: int) -> np.ndarray:
  """Keep the k largest |v_i| (ties: lowest index), zero the rest."""
  vec = np.asarray(vec, np.float64)
  idx = np.argsort(-np.abs(vec), kind="stable")[:k]
  out = np.zeros_like(vec)
  out[idx] = vec[idx]
  return out


def random_k(vec: np.ndarray, idx: np.ndarray, unbiased: bool) -> np.ndarray:
  """Keep coordinates `idx`, scaled by D/k if unbiased."""
  vec = np.asarray(vec, np.float64)
  out = np.zeros_like(vec)
  out[idx] = vec[idx] * (vec.size / idx.size if unbiased else 1.0)
  return out


def qsgd_bucket_norms(vec: np.ndarray, bucket_size: int) -> np.ndarray:
  """L2 norm of each zero-padded bucket."""
  vec = np.asarray(vec, np.float64)
  n = -(-vec.size // bucket_size)
  return np.linalg.norm(np.pad(vec, (0, n * bucket_size - vec.size)).reshape(n, -1), axis=1)


def qsgd_variance(vec: np.ndarray, levels: int, bucket_size: int) -> float:
  """Exact E||Q(v) - v||^2 = sum_i (n/s)^2 p_i (1 - p_i), p_i = frac(s |v_i| / n)."""
  vec = np.asarray(vec, np.float64)
  norms = np.repeat(qsgd_bucket_norms(vec, bucket_size), bucket_size)[:vec.size]
  safe = np.where(norms > 0, norms, 1.0)
  scaled = np.abs(vec) / safe * levels
  p = scaled - np.floor(scaled)
  return float(np.sum((norms / levels) ** 2 * p * (1 - p)))


def sign(vec: np.ndarray, scaled: bool) -> np.ndarray:
  """sign with 0 -> +1; times mean|v| if scaled."""
  vec = np.asarray(vec, np.float64)
  s = np.where(vec >= 0, 1.0, -1.0)
  return s * np.mean(np.abs(vec)) if scaled else s


def count_sketch(vec: np.ndarray, buckets: np.ndarray, signs: np.ndarray, cols: int) -> np.ndarray:
  """S[r, c] = sum_{i: h_r(i) = c} s_r(i) v_i."""
  vec = np.asarray(vec, np.float64)
  rows = buckets.shape[0]
  out = np.zeros((rows, cols))
  for r in range(rows):
    np.add.at(out[r], buckets[r], signs[r] * vec)
  return out


def unsketch(sketch: np.ndarray, buckets: np.ndarray, signs: np.ndarray, k=None) -> np.ndarray:
  """median_r s_r(i) S[r, h_r(i)], then optionally the top-k of the estimate."""
  rows = buckets.shape[0]
  est = np.median(signs * sketch[np.arange(rows)[:, None], buckets], axis=0)
  return est if k is None else top_k(est, k)


def power_iteration(mat: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One PowerSGD step: P = orth(M Q), Q' = M^T P; returns (P Q'^T, Q')."""
  mat = np.asarray(mat, np.float64)
  p, _ = np.linalg.qr(mat @ np.asarray(q, np.float64))
  q_new = mat.T @ p
  return p @ q_new.T, q_new
