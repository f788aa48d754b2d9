"""Native CPU HSQ greedy search and decode: SIMD C++ kernels (`_hsq_cpu.cc`) through the XLA FFI.

`greedy_search(vec, t, codebook)` reads the flattened leaf once: no padded or scaled copy, no
`[chunks, K]` score matrix. Per row of `vec[..., numel]` (leading axes: batch rows) and chunk
`x_i` of `dc` entries (the tail chunk zero-padded inside the kernel):
  `k_i = min argmax_k |<c_k, 2^-t x_i>|` (exact float32 argmax of the kernel's scores, lowest
  index on exact ties), `u_i = <c_{k_i}, 2^-t x_i>`; rows with a non-finite entry or an
  infinite score: `k = K-1`, `u = p_{K-1}`.
`2^-t` is applied exactly (one multiply, or two where `2^-t` is not a normal float, e.g. for a
subnormal layer maximum). Differentiable in `vec`: `du_i = 2^-t <c_{k_i}, dx_i>`.

`decode(index, level, scale, codebook, numel)` writes `y[..., numel]`, `y_{i dc + j} =
sat((l_i c_{k_i j}) s)` (indices clamped to `[0, K-1]` as XLA's gather; `sat` clips to
float32's range where `s` is finite), straight into the leaf's entries: no `[n, dc]` gather
and slice. Differentiable in a float `level` and in `scale` (the clip's derivative ignored).

Built and cached like the FWHT kernel (`_native.py`: `$CXX`/g++, `FEDJAX_COMPRESS_CACHE`);
`available()` is False without a compiler or with `FEDJAX_COMPRESS_NATIVE=0`. Jit, vmap
(`broadcast_all`: batch axes become rows), jvp and grad work.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress.ops import _native

_SOURCE = pathlib.Path(__file__).with_name("_hsq_cpu.cc")
_FLAGS = (*_native._FLAGS, "-ffp-contract=fast")  # pylint: disable=protected-access
_TARGETS = {"fedjax_compress_hsq_search_f32": "FedjaxHsqSearchF32",
            "fedjax_compress_hsq_decode_f32": "FedjaxHsqDecodeF32"}


@functools.lru_cache(maxsize=None)
def _load() -> bool:
  """Build (once per machine) and register the kernels; False where that is not possible."""
  return _native.load_library(_SOURCE, _FLAGS, "hsq_cpu", _TARGETS,
                              "native HSQ search (using the XLA search)")


def available() -> bool:
  """True when the kernel is built and registered (use it on the CPU backend only)."""
  return _load()


def multipliers(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(m1, m2)`, normal float32 powers of two with `m1 m2 = 2^-t` (`m2 = 1` where `2^-t` is normal)."""
  e = -t.astype(jnp.int32)
  one = (e >= -126) & (e <= 127)
  a = e // 2
  m1 = jnp.where(one, jnp.ldexp(jnp.float32(1), e), jnp.ldexp(jnp.float32(1), a))
  m2 = jnp.where(one, jnp.float32(1), jnp.ldexp(jnp.float32(1), e - a))
  return m1, m2


@functools.lru_cache(maxsize=32)
def _searcher(cb_bytes: bytes, size: int, dc: int):
  """The differentiable search for one codebook (`cb_bytes`: `[size, dc]` float32, C order)."""
  cb_np = np.frombuffer(cb_bytes, np.float32).reshape(size, dc)

  def call(vec: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = -(-vec.shape[-1] // dc)
    lead = vec.shape[:-1]
    out = (jax.ShapeDtypeStruct(lead + (n,), jnp.int32),
           jax.ShapeDtypeStruct(lead + (n,), jnp.float32))
    return jax.ffi.ffi_call("fedjax_compress_hsq_search_f32", out, vmap_method="broadcast_all")(
        vec, t, codebook=cb_np.reshape(-1), size=np.int32(size))

  @jax.custom_jvp
  def search(vec, t):
    return call(vec, t)

  @search.defjvp
  def _jvp(primals, tangents):
    vec, t = primals
    dvec = tangents[0]
    k, u = call(vec, t)
    numel, n = vec.shape[-1], k.shape[-1]
    pad = [(0, 0)] * (vec.ndim - 1) + [(0, n * dc - numel)]
    d = jnp.pad(dvec, pad).reshape(vec.shape[:-1] + (n, dc))
    m1, m2 = multipliers(t)
    du = (jnp.sum(jnp.asarray(cb_np)[k] * d, axis=-1) * m1[..., None]) * m2[..., None]
    return (k, u), (np.zeros(k.shape, jax.dtypes.float0), du)

  return search


def greedy_search(vec: jax.Array, t: jax.Array, codebook: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """`(k, u)` of every `dc`-chunk of `vec[..., numel]` (float32) scaled by `2^-t` (`t[...]`, int32).

  See the module docstring; raises `RuntimeError` where `available()` is False.
  `codebook`: `[K, dc]` float32.
  """
  _raise_unavailable()
  cb = np.ascontiguousarray(codebook, np.float32)
  if cb.ndim != 2 or cb.shape[0] < 1 or cb.shape[1] < 1:
    raise ValueError(f"codebook must be [K, dc], got shape {cb.shape}")
  vec = jnp.asarray(vec, jnp.float32)
  if vec.ndim < 1 or vec.shape[-1] < 1:
    raise ValueError(f"vec must be [..., numel] with numel >= 1, got shape {vec.shape}")
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), vec.shape[:-1])
  return _searcher(cb.tobytes(), cb.shape[0], cb.shape[1])(vec, t)


def _raise_unavailable() -> None:
  if not _load():
    raise RuntimeError("the native HSQ kernels are unavailable (see fedjax_compress/ops/_hsq_native.py)")


@functools.lru_cache(maxsize=32)
def _decoder(cb_bytes: bytes, size: int, dc: int, numel: int):
  """The differentiable decode for one codebook and leaf size."""
  cb_np = np.frombuffer(cb_bytes, np.float32).reshape(size, dc)

  def call(index, level, scale):
    out = jax.ShapeDtypeStruct(index.shape[:-1] + (numel,), jnp.float32)
    return jax.ffi.ffi_call("fedjax_compress_hsq_decode_f32", out, vmap_method="broadcast_all")(
        index, level, scale, codebook=cb_np.reshape(-1), size=np.int32(size))

  @jax.custom_jvp
  def dec(index, level, scale):
    return call(index, level, scale)

  @dec.defjvp
  def _jvp(primals, tangents):
    index, level, scale = primals
    _, dlevel, dscale = tangents
    y = call(index, level, scale)
    n = index.shape[-1]
    cw = jnp.asarray(cb_np)[jnp.clip(index.astype(jnp.int32), 0, size - 1)]   # [..., n, dc]
    lf = level.astype(jnp.float32)[..., None]
    dy = (lf * cw) * dscale[..., None, None]
    if jnp.issubdtype(level.dtype, jnp.floating):
      dy = dy + (dlevel[..., None] * cw) * scale[..., None, None]
    dy = dy.reshape(index.shape[:-1] + (n * dc,))[..., :numel]
    return y, dy

  return dec


def decode(index: jax.Array, level: jax.Array, scale: jax.Array, codebook: np.ndarray,
           numel: int) -> jax.Array:
  """`y[..., numel]` from `index[..., n]` (uint8/uint16/int32), `level[..., n]` (int8/int16/float32)
  and `scale[...]` (float32); `n = ceil(numel / dc)`. Raises `RuntimeError` where unavailable."""
  _raise_unavailable()
  cb = np.ascontiguousarray(codebook, np.float32)
  index, level = jnp.asarray(index), jnp.asarray(level)
  if index.shape != level.shape or index.ndim < 1 or index.shape[-1] != -(-numel // cb.shape[1]):
    raise ValueError(f"index {index.shape} and level {level.shape} must be [..., ceil(numel/dc)]")
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), index.shape[:-1])
  return _decoder(cb.tobytes(), cb.shape[0], cb.shape[1], int(numel))(index, level, scale)
