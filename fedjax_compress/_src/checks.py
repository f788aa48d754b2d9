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


def float_max(dtype: Any) -> float:
  """Largest finite value of a float `dtype` (float32's for non-float dtypes)."""
  dtype = jnp.dtype(dtype)
  return float(jnp.finfo(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32).max)


def saturate(y: jax.Array, finite: Any = None, limit: float | None = None) -> jax.Array:
  """`y` clipped to `[-limit, limit]` (default float32's range) where `finite`, else unchanged.

  For results of finite inputs that are too large for their dtype (e.g. `D/k` times a value
  near float32's max): they saturate at the largest finite value instead of becoming inf,
  while results of non-finite inputs (`finite` False; default `isfinite(y)`) still
  propagate NaN/Inf. One elementwise op (fuses with its producer).
  """
  y = jnp.asarray(y)
  m = jnp.asarray(float_max(jnp.float32) if limit is None else limit, y.dtype)
  finite = jnp.isfinite(y) if finite is None else finite
  return jnp.where(finite, jnp.clip(y, -m, m), y)


def ratio(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a / b` (broadcasting) that stays right for `|b|` up to float32's max.

  XLA rewrites a division by a broadcast value into a multiplication by its reciprocal,
  and on CPU a reciprocal below 2^-126 flushes to zero, so `x / 3e38` gives 0 under
  `jit`. Here numerator and denominator are first scaled by 2^-64 where `|b| > 2^64`
  (exact powers of two; only quotients below ~2^-190 change, to 0).
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  big = jnp.abs(b) > 2.0**64
  return jnp.where(big, a * 2.0**-64, a) / jnp.where(big, b * 2.0**-64, b)


def cast_finite(y: jax.Array, dtype: Any) -> jax.Array:
  """`y.astype(dtype)`, saturating finite values at `dtype`'s range (NaN/Inf propagate).

  Decoders of a float16 (or bfloat16) model decode in float32; an estimate slightly beyond
  float16's 65504 (e.g. a quantization level or an error-feedback sum) saturates at 65504
  instead of becoming inf.
  """
  y = jnp.asarray(y)
  dtype = jnp.dtype(dtype)
  if (jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(y.dtype, jnp.floating)
      and jnp.finfo(dtype).max < jnp.finfo(y.dtype).max):
    y = saturate(y, limit=float_max(dtype))
  return y.astype(dtype)


def check_keys(keys: Any, what: str = "keys") -> None:
  """Raise `ValueError` unless `keys` is a `Keys(shared, private)` of PRNG keys (typed or raw)."""
  from fedjax_compress._src.base import Keys  # pylint: disable=import-outside-toplevel
  if not isinstance(keys, Keys):
    raise ValueError(f"{what} must be fedjax_compress.Keys(shared, private) for this "
                     f"compressor, got {type(keys).__name__}")
  for name, k in (("shared", keys.shared), ("private", keys.private)):
    dtype = getattr(k, "dtype", None)
    if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                             or dtype == jnp.uint32):
      raise ValueError(f"{what}.{name} must be a PRNG key (jax.random.key or raw uint32 key "
                       f"data), got {type(k).__name__} of dtype {dtype}")


def check_compressor(obj: Any, name: str = "inner") -> None:
  """Raise `ValueError` unless `obj` is a `Compressor` (not None, not its factory)."""
  from fedjax_compress._src.base import Compressor  # pylint: disable=import-outside-toplevel
  if isinstance(obj, Compressor):
    return
  hint = (" (a factory: call it, e.g. top_k(fraction=0.01))" if callable(obj) else "")
  raise ValueError(f"{name} must be a Compressor, got {type(obj).__name__}{hint}")


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
