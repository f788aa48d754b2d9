"""Check before any work that a compiled program fits in device memory.

`check_memory(fn, *args)` compiles `fn` for the shapes of `args` (nothing runs: arguments
may be `jax.ShapeDtypeStruct`s) and reads XLA's memory analysis. The program needs

    need = arguments + outputs - aliased (donated) + temporaries

bytes. It raises `MemoryError`-derived `InsufficientMemoryError` (also a `ValueError`) with
the figures and what to change (e.g. a smaller `clients_per_chunk`) when `need` exceeds
`fraction * limit`, where `limit` is the device's memory: `bytes_limit` of the accelerator's
allocator, or on CPU the smaller of physical memory and the cgroup limit of this container.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
from flax import struct


class InsufficientMemoryError(MemoryError, ValueError):
  """The compiled program needs more memory than the device has."""


@struct.dataclass
class MemoryEstimate:
  """Bytes of one compiled program (XLA's `memory_analysis`) and the device limit."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  limit_bytes: Optional[int]

  @property
  def need_bytes(self) -> int:
    """Peak bytes the program holds: arguments + outputs - aliased + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _cgroup_limit() -> Optional[int]:
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 1 << 60:
      return int(text)
  return None


def device_memory_limit(device: Optional[jax.Device] = None) -> Optional[int]:
  """Bytes of memory of `device` (default: the first device); None when unknown."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without allocator stats)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  try:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    physical = None
  limits = [v for v in (physical, _cgroup_limit()) if v]
  return min(limits) if limits else None


def estimate_memory(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = (),
                    limit_bytes: Optional[int] = None) -> MemoryEstimate:
  """Compile `jax.jit(fn, donate_argnums)` for `args`' shapes and return its `MemoryEstimate`."""
  # Committed arrays (and ShapeDtypeStructs) keep their sharding: per-device figures of the
  # program a later call with them runs, so it is compiled once; uncommitted ones jit places.
  shapes = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else (
      jax.ShapeDtypeStruct(jax.numpy.shape(x), x.dtype,
                           sharding=x.sharding if getattr(x, "committed", False) else None)
      if hasattr(x, "dtype") else x), args)
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*shapes).compile()
  ma = compiled.memory_analysis()
  limit = limit_bytes if limit_bytes is not None else device_memory_limit()
  if ma is None:  # backend without memory analysis
    return MemoryEstimate(0, 0, 0, 0, limit)
  return MemoryEstimate(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                        int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes), limit)


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def check_memory(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = (),
                 limit_bytes: Optional[int] = None, fraction: float = 0.9,
                 what: str = "the round") -> MemoryEstimate:
  """`estimate_memory`, raising `InsufficientMemoryError` if it needs > `fraction * limit`.

  >>> import jax, jax.numpy as jnp
  >>> est = check_memory(lambda x: x * 2, jax.ShapeDtypeStruct((1024,), jnp.float32))
  >>> est.argument_bytes, est.output_bytes
  (4096, 4096)
  >>> check_memory(lambda x: x * 2, jnp.zeros(1024), limit_bytes=1000)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  fedjax_compress.federated._memory.InsufficientMemoryError: the round needs 0.00 GiB ...
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  est = estimate_memory(fn, *args, donate_argnums=donate_argnums, limit_bytes=limit_bytes)
  if est.limit_bytes is not None and est.need_bytes > fraction * est.limit_bytes:
    raise InsufficientMemoryError(
        f"{what} needs {_gib(est.need_bytes)} (arguments {_gib(est.argument_bytes)}, outputs "
        f"{_gib(est.output_bytes)}, donated {_gib(est.alias_bytes)}, temporaries "
        f"{_gib(est.temp_bytes)}) but the device has {_gib(est.limit_bytes)} "
        f"({fraction:.0%} usable): use a smaller clients_per_chunk (peak memory grows with "
        f"the chunk, not the cohort), a smaller cohort, batch or model, or a compressor "
        f"with smaller state")
  return est
