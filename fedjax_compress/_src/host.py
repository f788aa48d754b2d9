"""Host memory allocator settings for large models on CPU (glibc malloc via `mallopt`).

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh `mmap`,
and thread arenas serve anything above their 64 MiB heaps the same way. Every such buffer
is unmapped when freed, so each new one page-faults all its pages in again. XLA:CPU
allocates a fresh output buffer per op. Once a leaf passes ~8M float32 entries, most of an
op's time goes to page faults. Measured on the 2-core box (benchmarks/BENCHMARKS.md, "Host
allocator"): `x + 1` over 124M float32 takes 139 ms with the defaults and 34 ms tuned
(6.8 -> 31.6 GB/s). Tuning keeps freed memory in the process for reuse:
- `M_MMAP_MAX = 0`: no mmap'd chunks. Requests too large for a thread arena's heap still
  fall back to mmap inside glibc.
- `M_TRIM_THRESHOLD = -1`: the heap is never handed back to the OS (a finite threshold, at
  most 2 GiB through `mallopt`, trims the free top of the heap after a 100M model's codec
  temporaries, and the next buffers page-fault again).
- `M_ARENA_MAX = 1`: one arena. Threads started later share the main heap instead of
  64 MiB thread heaps.

The cost: the process's resident memory stays at its peak. The settings are process-wide,
so nothing here runs at import. Scripts opt in with `tune_cpu_allocator()` before JAX's CPU
backend starts (the first computation; importing the library starts nothing): the backend's
threads keep the arenas they already hold, and big buffers from those still page-fault
(measured: no gain at 100M when tuned after the backend started). The environment
variables in `ENV` (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776
MALLOC_ARENA_MAX=1`) do the same for any process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
SETTINGS = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
            "M_ARENA_MAX": (M_ARENA_MAX, 1)}
"""`mallopt(param, value)` pairs; a trim threshold of -1 disables trimming (mallopt(3))."""
ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_ARENA_MAX": "1"}
"""The same settings as environment variables, read by glibc at process start (a 1 TiB trim
threshold stands for "never")."""


@functools.lru_cache(maxsize=None)
def _libc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version") else None
  except OSError:
    return None


def tune_cpu_allocator() -> dict[str, bool]:
  """Keep freed host memory for reuse (glibc `mallopt`, see the module doc); `{setting: applied}`.

  Returns all False where the C library is not glibc (macOS, musl): nothing is changed there.
  Idempotent. Call it before JAX's CPU backend starts (see the module doc).
  """
  lib = _libc()
  if lib is None:
    return {name: False for name in SETTINGS}
  return {name: bool(lib.mallopt(ctypes.c_int(p), ctypes.c_int(v)))
          for name, (p, v) in SETTINGS.items()}
