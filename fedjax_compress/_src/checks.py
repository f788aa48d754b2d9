"""Eager argument and input validation shared by all compressors."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` holds concrete values (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(tree: Any, what: str = "updates") -> None:
  """Raise `ValueError` if a concrete input contains NaN or Inf.

  Policy: under tracing (jit, vmap, grad) values are unknown, so nothing is checked and
  non-finite values propagate; the federated round reports them per client in
  `RoundMetrics.finite` and gives such clients zero weight.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_concrete(leaf):
      return
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) or arr.dtype == jnp.bfloat16:
      if not np.all(np.isfinite(arr.astype(np.float32))):
        raise ValueError(
            f"{what} at {jax.tree_util.keystr(path)} contain NaN or Inf; "
            "compressors need finite inputs (clip or skip this update)")


def check_positive_int(value: Any, name: str) -> int:
  """Return `value` as int, or raise `ValueError` unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


def check_fraction(value: Any, name: str) -> float:
  """Return `value` as float, or raise unless 0 < value <= 1."""
  value = float(value)
  if not (0.0 < value <= 1.0) or math.isnan(value):
    raise ValueError(f"{name} must be in (0, 1], got {value}")
  return value
