"""`tune_cpu_allocator`: glibc keeps large freed buffers in the heap instead of mmap/munmap.

Checked in fresh subprocesses (the settings are process-wide): while a 100 MB array lives,
glibc's mmap'd bytes (`mallinfo2().hblkhd`) grow by its size with the defaults and stay
flat after tuning, for an allocation on the main thread and on a new thread.
"""

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fedjax_compress._src import host

PROBE = textwrap.dedent("""
    import ctypes, json, sys, threading
    import numpy as np
    class MI2(ctypes.Structure):
      _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                  "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI2
    applied = {}
    if sys.argv[1] == "tune":
      import fedjax_compress
      applied = fedjax_compress.tune_cpu_allocator()
    base = libc.mallinfo2().hblkhd
    grew = []
    def alloc():
      a = np.ones(25_000_000, np.float32)  # 100 MB
      grew.append(libc.mallinfo2().hblkhd - base)
      del a
    t = threading.Thread(target=alloc); t.start(); t.join(); alloc()
    kept = libc.mallinfo2().arena  # heap bytes still held after the frees
    print(json.dumps({"applied": applied, "grew": grew, "kept": kept}))
""")


def _glibc_with_mallinfo2() -> bool:
  try:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return False
  return hasattr(lib, "mallinfo2") and hasattr(lib, "gnu_get_libc_version")


def _probe(mode: str, env: dict | None = None) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       timeout=120, check=True,
                       env=None if env is None else dict(os.environ, **env))
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_tuned_allocator_serves_large_buffers_from_the_heap():
  default, tuned = _probe("default"), _probe("tune")
  assert all(g >= 100_000_000 for g in default["grew"]), default
  assert tuned["applied"] == {name: True for name in host.SETTINGS}, tuned
  assert all(g < 10_000_000 for g in tuned["grew"]), tuned
  assert tuned["kept"] >= 100_000_000, tuned  # freed, not trimmed: the next buffer reuses it


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_environment_variables_do_the_same():
  """`host.ENV` (for scripts that cannot call Python first) has the same effect."""
  probe = _probe("default", host.ENV)
  assert all(g < 10_000_000 for g in probe["grew"]) and probe["kept"] >= 100_000_000, probe
  assert host.ENV["MALLOC_MMAP_MAX_"] == str(host.SETTINGS["M_MMAP_MAX"][1])
  assert host.ENV["MALLOC_ARENA_MAX"] == str(host.SETTINGS["M_ARENA_MAX"][1])
  assert host.SETTINGS["M_TRIM_THRESHOLD"][1] == -1  # mallopt(3): -1 disables trimming
  assert int(host.ENV["MALLOC_TRIM_THRESHOLD_"]) >= 2**40


def test_importing_the_library_starts_no_backend():
  """`tune_cpu_allocator` only helps before JAX's CPU backend starts, so importing the library,
  its test registry and the experiment runner must not start it (a module-level PRNG key did)."""
  code = ("import jax._src.xla_bridge as xb, fedjax_compress, fedjax_compress.testing, "
          "experiments.common, experiments.run; print(bool(xb._backends))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
