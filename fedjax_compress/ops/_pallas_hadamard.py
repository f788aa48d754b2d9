"""Pallas kernel path of the FWHT (Kronecker form, one kernel launch per dense factor).

`H_n = H_{m_1} (x) ... (x) H_{m_j}` with `m_i <= 2^6`. Pass `i` views the (batched) input
as `(pre, m_i, post)` and multiplies the middle axis by the dense +-1 matrix `H_{m_i}`
inside the kernel (`H @ X_block`, or `X_block @ H` for the contiguous last factor), so every
pass is one read and one write of the array. Factors are capped at 64 so `H` (16 KiB in
float32) and one block stay in on-chip memory on GPUs. On CPU the kernel runs with
`interpret=True` (tests only; slow). Reverse-mode autodiff uses `H^T = H` (custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from fedjax_compress.ops import _hadamard

PALLAS_MAX_LOG2 = 6
_BLOCK = 128  # rows / columns per kernel program (a power of two)
_MIN_ROWS = 16  # smallest row block (GPU matmul tiles need >= 16 rows)


def _lowbit(n: int) -> int:
  """Largest power of two dividing `n` (n >= 1)."""
  return n & -n


def _right_kernel(h_ref, x_ref, o_ref):
  o_ref[...] = jnp.dot(x_ref[...], h_ref[...], precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _left_kernel(h_ref, x_ref, o_ref):
  o_ref[...] = jnp.dot(h_ref[...], x_ref[...], precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _apply_factor(y: jax.Array, m: int, interpret: bool) -> jax.Array:
  """Multiply axis 1 of `y` (shape `(pre, m, post)`) by `H_m` with one Pallas call."""
  pre, _, post = y.shape
  h = jnp.asarray(_hadamard.hadamard_matrix_np(m), y.dtype)
  if post == 1:
    rows = y.reshape(pre, m)
    # Every row must be covered by a whole block: blocks of the largest power of two
    # (<= _BLOCK) that divides the row count; counts with a small power-of-two part (odd,
    # 200 = 8 * 25, ...) are first padded to a multiple of _MIN_ROWS (matmul tiles below 16
    # rows do not lower on GPUs). (Blocks of min(pre, 128) left the rows past the last whole
    # block unwritten.)
    pad = -pre % _MIN_ROWS if _lowbit(pre) < _MIN_ROWS else 0
    if pad:
      rows = jnp.pad(rows, ((0, pad), (0, 0)))
    total = pre + pad
    br = min(_BLOCK, _lowbit(total))
    out = pl.pallas_call(
        _right_kernel,
        out_shape=jax.ShapeDtypeStruct(rows.shape, y.dtype),
        grid=(total // br,),
        in_specs=[pl.BlockSpec((m, m), lambda i: (0, 0)),
                  pl.BlockSpec((br, m), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((br, m), lambda i: (i, 0)),
        interpret=interpret,
    )(h, rows)
    return out[:pre].reshape(y.shape)
  bp = min(post, _BLOCK)
  return pl.pallas_call(
      _left_kernel,
      out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
      grid=(pre, post // bp),
      in_specs=[pl.BlockSpec((m, m), lambda i, j: (0, 0)),
                pl.BlockSpec((None, m, bp), lambda i, j: (i, 0, j))],
      out_specs=pl.BlockSpec((None, m, bp), lambda i, j: (i, 0, j)),
      interpret=interpret,
  )(h, y)


def _fwht_pallas_impl(x: jax.Array, interpret: bool) -> jax.Array:
  n = x.shape[-1]
  factors = _hadamard.kron_factors(_hadamard.check_length(n), PALLAS_MAX_LOG2)
  flat = x.reshape(-1)
  total = flat.shape[0]
  post = n
  for m in factors:
    post //= m
    if m == 1:
      continue
    flat = _apply_factor(flat.reshape(total // (m * post), m, post), m, interpret).reshape(-1)
  return flat.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fwht_pallas(x: jax.Array, interpret: bool) -> jax.Array:
  return _fwht_pallas_impl(x, interpret)


def _fwd(x, interpret):
  return _fwht_pallas_impl(x, interpret), None


def _bwd(interpret, _, ct):
  return (_fwht_pallas_impl(ct, interpret),)  # H is symmetric: the VJP is another FWHT


_fwht_pallas.defvjp(_fwd, _bwd)


def fwht_pallas(x: jax.Array, *, interpret: bool | None = None) -> jax.Array:
  """Unnormalized FWHT of the last axis with the Pallas kernel (`interpret` on CPU by default).

  Supports `jit`, `vmap` and reverse-mode autodiff (`grad`, `vjp`); forward-mode (`jvp`,
  `jacfwd`) is not supported through the custom VJP, use a `jnp` method there.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  _hadamard.check_length(x.shape[-1])
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"fwht_pallas needs a floating input, got {x.dtype}")
  return _fwht_pallas(x, bool(interpret))
