"""Native CPU FWHT: a cache-blocked C++ kernel (`_fwht_cpu.cc`) called through the XLA FFI.

The kernel is compiled on first use with the system C++ compiler (`$CXX`, else `g++`/`c++`)
against the FFI headers that jaxlib ships, and cached under `$FEDJAX_COMPRESS_CACHE` (default
`~/.cache/fedjax_compress`), keyed by the source, compiler flags, CPU flags and jaxlib version.
Where no compiler is found or the build fails, `available()` is False and `fwht` keeps the jnp
butterfly; `FEDJAX_COMPRESS_NATIVE=0` turns the kernel off. Float32 and float64 only.

The kernel is wrapped in a linear primitive whose transpose is itself (`H_n` is symmetric), so
jit, vmap, jvp, grad and `jax.linear_transpose` all work.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.extend
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

_SOURCE = pathlib.Path(__file__).with_name("_fwht_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
_TARGETS = {jnp.dtype(jnp.float32): "fedjax_compress_fwht_f32",
            jnp.dtype(jnp.float64): "fedjax_compress_fwht_f64"}
_SYMBOLS = {"fedjax_compress_fwht_f32": "FedjaxFwhtF32", "fedjax_compress_fwht_f64": "FedjaxFwhtF64"}
_log = logging.getLogger(__name__)


def _compiler() -> str | None:
  """The C++ compiler to use: `$CXX`, else the first of g++ / c++ / clang++ on PATH."""
  env = os.environ.get("CXX")
  if env:
    return env
  return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def _cpu_flags() -> str:
  """The CPU feature line (the build uses -march=native, so the cache must depend on it)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def _cache_path(cxx: str, source: pathlib.Path = _SOURCE, flags: tuple[str, ...] = _FLAGS,
                stem: str = "fwht_cpu") -> pathlib.Path:
  """Where the built library for this source / compiler / flags / CPU / jaxlib lives."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for part in (source.read_bytes(), cxx.encode(), " ".join(flags).encode(),
               _cpu_flags().encode(), jaxlib.__version__.encode(), platform.machine().encode()):
    digest.update(part)
  root = os.environ.get("FEDJAX_COMPRESS_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "fedjax_compress"))
  return pathlib.Path(root) / f"{stem}_{digest.hexdigest()[:16]}.so"


def _build(cxx: str, out: pathlib.Path, source: pathlib.Path = _SOURCE,
           flags: tuple[str, ...] = _FLAGS) -> None:
  """Compile `source` into `out` atomically (a temp file, then rename), so parallel builds race safely."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def load_library(source: pathlib.Path, flags: tuple[str, ...], stem: str,
                 symbols: dict[str, str], what: str) -> bool:
  """Build `source` (once per machine, cached) and register its FFI `symbols` (target -> C
  symbol) on CPU; False, logged with `what`, where no compiler, the build or the load fails
  or `FEDJAX_COMPRESS_NATIVE=0`."""
  if os.environ.get("FEDJAX_COMPRESS_NATIVE", "1") == "0":
    return False
  cxx = _compiler()
  if cxx is None or not source.exists():
    _log.info("%s unavailable: no C++ compiler or source", what)
    return False
  path = _cache_path(cxx, source, flags, stem)
  try:
    if not path.exists():
      _build(cxx, path, source, flags)
    lib = ctypes.CDLL(str(path))
    for target, symbol in symbols.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, subprocess.SubprocessError, AttributeError) as err:
    _log.info("%s unavailable: %s", what, getattr(err, "stderr", "") or err)
    return False
  return True


@functools.lru_cache(maxsize=None)
def _load() -> bool:
  """Build (once per machine) and register the kernel; False where that is not possible."""
  return load_library(_SOURCE, _FLAGS, "fwht_cpu", _SYMBOLS,
                      "native FWHT (using the jnp butterfly)")


def available(dtype=jnp.float32) -> bool:
  """True when the native kernel is built and handles `dtype` (float32 / float64) on CPU."""
  return jnp.dtype(dtype) in _TARGETS and _load()


def _call(x: jax.Array) -> jax.Array:
  """The FFI call itself: unnormalized `H_n x` over the last axis, leading axes as rows."""
  target = _TARGETS[jnp.dtype(x.dtype)]
  # In place on the input buffer: XLA reuses a dead intermediate (as in Fastfood's
  # `H (B x)`) or a donated argument, and copies only when the input is still live.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="broadcast_all", input_output_aliases={0: 0})(x)


# A primitive rather than custom_jvp / custom_vjp: it is linear, so one `deflinear2` rule
# gives jvp, linearize, vjp and transpose (H_n is symmetric: the transpose is H_n again).
fwht_p = jax.extend.core.Primitive("fedjax_compress_fwht_cpu")
fwht_p.def_impl(_call)
fwht_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(fwht_p, mlir.lower_fun(_call, multiple_results=False), platform="cpu")
ad.deflinear2(fwht_p, lambda ct, _: [fwht_p.bind(ad.instantiate_zeros(ct))])


def _batch_rule(args, dims):
  """vmap: move a batch axis that sits on the transform axis out of the way."""
  (x,), (d,) = args, dims
  if d == x.ndim - 1:
    x, d = jnp.moveaxis(x, d, 0), 0
  return fwht_p.bind(x), d


batching.primitive_batchers[fwht_p] = _batch_rule


def fwht_native(x: jax.Array) -> jax.Array:
  """Unnormalized FWHT of the last axis with the native kernel (call `available()` first)."""
  n = x.shape[-1] if x.ndim else 0
  if n < 1 or n & (n - 1):
    raise ValueError(f"FWHT length must be a power of two, got shape {x.shape}")
  return fwht_p.bind(x)
