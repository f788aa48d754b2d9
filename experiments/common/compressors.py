"""Name -> compressor factory table over `fedjax_compress.compressors` for configs."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Mapping

from fedjax_compress import compressors as _compressors
from fedjax_compress import error_feedback
from fedjax_compress._src.base import Compressor


def _returns_compressor(fn: Any) -> bool:
  """True if `fn`'s return annotation is `Compressor` (or a subclass)."""
  try:
    ret = typing.get_type_hints(fn).get("return")
  except Exception:  # pylint: disable=broad-except  (unresolvable annotations)
    ret = inspect.signature(fn).return_annotation
    return ret in ("Compressor", Compressor)
  return isinstance(ret, type) and issubclass(ret, Compressor)


def available() -> list[str]:
  """Names of the public factories of `fedjax_compress.compressors` that return a `Compressor`
  (derived from their return annotations; helpers such as `per_bit_accuracy` are left out)."""
  return sorted(n for n in _compressors.__all__
                if n[:1].islower() and callable(getattr(_compressors, n))
                and _returns_compressor(getattr(_compressors, n)))


def make_compressor(name: str, kwargs: Mapping[str, Any] | None = None, *,
                    ef: bool = False) -> Compressor:
  """`compressors.<name>(**kwargs)`, optionally wrapped in `error_feedback`.

  A kwarg given as `{"name": ..., "kwargs": {...}}` is built recursively (e.g. LBGM's inner
  compressor).

  >>> make_compressor("top_k", {"fraction": 0.1}, ef=True).init is not None
  True
  """
  if name not in available():
    raise ValueError(f"unknown compressor {name!r}; available: {available()}")
  built = {}
  for k, v in dict(kwargs or {}).items():
    if isinstance(v, Mapping) and "name" in v:
      v = make_compressor(v["name"], v.get("kwargs"), ef=bool(v.get("error_feedback", False)))
    built[k] = v
  try:
    c = getattr(_compressors, name)(**built)
  except TypeError as e:  # unknown / missing keyword arguments
    params = list(inspect.signature(getattr(_compressors, name)).parameters)
    raise ValueError(f"bad arguments for compressor {name!r} ({e}); it takes {params}") from e
  if not isinstance(c, Compressor):
    raise ValueError(f"compressors.{name} did not return a Compressor")
  return error_feedback(c) if ef else c
