"""Fastfood random projection `V: R^d -> R^D` (intrinsic-dimension form), regenerated from a key.

Global map (spec IGC 1.2, one block): with `L = 2^ceil(log2 D)`,
`V z = c * R_D H G P H B E_d z`, `c = 1 / (sqrt(L ||G||^2) sqrt(D / L))`, where `E_d` zero-pads
`z` to length `L`, `B` = Rademacher signs, `H` = unnormalized FWHT, `(P x)_i = x_{perm[i]}`,
`G ~ N(0, I_L)` and `R_D` keeps the first `D` rows. Every column of `H G P H B` has squared
norm `L ||G||^2`, so columns of `V` are unit-norm when `D = L` and ~1 otherwise.

Blocked map (spec 1.3, `block_rows=D_b`): the `D` output rows are cut into
`nb = ceil(D / D_b)` consecutive blocks; block `b` has its own `(B_b, perm_b, G_b)` from
`fold_in(key, b)`, is scaled by `1 / sqrt(L ||G_b||^2)` and keeps its first `D_b` rows (the
last block fewer), and the concatenation is divided by `sqrt(D / L)`. All blocks share
`L = next_pow2(max(D_b, d))` so they batch as one array; the spec gives the last (shorter)
block `next_pow2(max(D_last, d))` instead; with equal `L` its normalization is unchanged
in expectation. With one block this is exactly the global map (`key` folded with 0).

Memory is `O(nb L) = O(D)`; `V` is never materialized. `fastfood_transpose` is the exact
adjoint: `V^T y = c E_d^T B H P^T G H R_D^T y` (the inverse permutation is a scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_compress._src import checks
from fedjax_compress._src.keys import as_key
from fedjax_compress.ops import _hadamard


@struct.dataclass
class FastfoodParams:
  """Random factors of one Fastfood map (arrays carry a leading block axis `[nb, L]`).

  `scale[b] = 1 / (sqrt(L ||G_b||^2) sqrt(D / L))` already includes the global factor.
  """

  signs: jax.Array   # f32[nb, L], +-1 (B)
  perm: jax.Array    # int32[nb, L] (P: gather x[perm])
  gauss: jax.Array   # f32[nb, L] (G)
  scale: jax.Array   # f32[nb]
  d: int = struct.field(pytree_node=False)
  D: int = struct.field(pytree_node=False)
  block_rows: int = struct.field(pytree_node=False)
  method: str = struct.field(pytree_node=False, default="auto")

  @property
  def L(self) -> int:  # pylint: disable=invalid-name
    """Padded (power-of-two) length of every block."""
    return int(self.signs.shape[-1])

  @property
  def num_blocks(self) -> int:
    """Number of stacked blocks `nb`."""
    return int(self.signs.shape[0])


def check_dims(d: int, D: int) -> tuple[int, int]:  # pylint: disable=invalid-name
  """Validate `0 < d <= D` (eagerly, with a clear error)."""
  d = checks.check_positive_int(d, "d (intrinsic dimension)")
  D = checks.check_positive_int(D, "D (number of parameters)")  # pylint: disable=invalid-name
  if d > D:
    raise ValueError(f"intrinsic dimension d={d} exceeds the number of parameters D={D}; "
                     "need 0 < d <= D (use an uncompressed baseline instead)")
  return d, D


_FEISTEL_ROUNDS = 6
PERMUTATIONS = ("uniform", "feistel")


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (xorshift-multiply finalizer), elementwise on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def feistel_permutation(key, n: int) -> jax.Array:
  """Pseudo-random permutation of `0..n-1` (`n` a power of two) without sorting, O(n).

  Index bits are split in two halves `(a, b)` and `6` keyed Feistel rounds
  `(a, b) -> (b, a XOR hash(b XOR k_r) mod 2^|a|)` are applied; every round is a bijection,
  so the result is a permutation (pseudo-random, not uniform over all `n!`). ~1 memory pass
  instead of the several sorts of `jax.random.permutation`.
  """
  log2n = _hadamard.check_length(n)
  if log2n < 2:
    return jax.random.permutation(key, n).astype(jnp.int32)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
  i = jnp.arange(n, dtype=jnp.uint32)
  wa, wb = log2n - log2n // 2, log2n // 2        # bit widths of (a, b)
  a, b = i >> wb, i & jnp.uint32((1 << wb) - 1)
  for r in range(_FEISTEL_ROUNDS):
    f = _mix32(b ^ round_keys[r]) & jnp.uint32((1 << wa) - 1)
    a, b, wa, wb = b, a ^ f, wb, wa
  return ((a << wb) | b).astype(jnp.int32)


def fastfood_params(key, d: int, D: int, *, block_rows: int | None = None,  # pylint: disable=invalid-name
                    gaussian: bool = True, method: str = "auto",
                    permutation: str = "uniform") -> FastfoodParams:
  """Regenerate the Fastfood factors of `V: R^d -> R^D` from `key` (works inside `jit`).

  Args:
    key: typed key, raw key data or int seed; block `b` uses `fold_in(key, b)`.
    d, D: input and output dimensions, `0 < d <= D` (static).
    block_rows: rows per block `D_b` (None: one global block, the spec's exact map).
    gaussian: if False, `G := 1` (then `V` is orthogonal when `d = D = L`; a test map).
    method: FWHT method used by project/transpose (see `fwht`).
    permutation: 'uniform' (`jax.random.permutation`, the spec's uniform `Pi`; sort-based,
      the dominant cost of regenerating a large map) or 'feistel' (`feistel_permutation`:
      pseudo-random, O(L), much cheaper to regenerate every round).

  >>> p = fastfood_params(0, 3, 5)
  >>> (p.num_blocks, p.L, p.d, p.D)
  (1, 8, 3, 5)
  """
  d, D = check_dims(d, D)  # pylint: disable=invalid-name
  if method not in _hadamard.METHODS:
    raise ValueError(f"method must be one of {_hadamard.METHODS}, got {method!r}")
  if permutation not in PERMUTATIONS:
    raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
  rows = D if block_rows is None else checks.check_positive_int(block_rows, "block_rows")
  rows = min(rows, D)
  nb = -(-D // rows)
  L = _hadamard.next_power_of_two(max(rows, d))  # pylint: disable=invalid-name
  key = as_key(key)

  def one_block(b):
    kb, kp, kg = jax.random.split(jax.random.fold_in(key, b), 3)
    signs = jax.random.rademacher(kb, (L,), jnp.float32)
    perm = (jax.random.permutation(kp, L).astype(jnp.int32) if permutation == "uniform"
            else feistel_permutation(kp, L))
    gauss = (jax.random.normal(kg, (L,), jnp.float32) if gaussian
             else jnp.ones((L,), jnp.float32))
    return signs, perm, gauss

  signs, perm, gauss = jax.vmap(one_block)(jnp.arange(nb, dtype=jnp.uint32))
  sq = jnp.sum(jnp.square(gauss), axis=-1)
  scale = jax.lax.rsqrt(jnp.float32(L) * sq) * jnp.float32(np.sqrt(L / D))
  return FastfoodParams(signs, perm, gauss, scale, d, D, rows, method)


def _fwht(p: FastfoodParams, x: jax.Array) -> jax.Array:
  return _hadamard.fwht(x, method=p.method)


def fastfood_project(p: FastfoodParams, z: jax.Array) -> jax.Array:
  """`V z`: f32[d] -> f32[D] (two FWHTs of length `L` per block)."""
  checks.check_finite(z, "z")
  z = jnp.asarray(z, jnp.float32)
  if z.shape != (p.d,):
    raise ValueError(f"z must have shape ({p.d},), got {z.shape}")
  x = jnp.pad(z, (0, p.L - p.d))[None, :] * p.signs            # B E_d z, per block
  x = _fwht(p, x)
  x = jnp.take_along_axis(x, p.perm, axis=-1)                   # gather: x[perm]
  x = _fwht(p, x * p.gauss) * p.scale[:, None]
  return x[:, :p.block_rows].reshape(-1)[:p.D]                 # keep D_b rows per block


def fastfood_transpose(p: FastfoodParams, y: jax.Array) -> jax.Array:
  """`V^T y`: f32[D] -> f32[d], the exact adjoint of `fastfood_project`."""
  checks.check_finite(y, "y")
  y = jnp.asarray(y, jnp.float32)
  if y.shape != (p.D,):
    raise ValueError(f"y must have shape ({p.D},), got {y.shape}")
  nb, rows = p.num_blocks, p.block_rows
  x = jnp.pad(y, (0, nb * rows - p.D)).reshape(nb, rows)
  x = jnp.pad(x, ((0, 0), (0, p.L - rows))) * p.scale[:, None]
  x = _fwht(p, x) * p.gauss
  # Inverse permutation = scatter: u[perm[i]] = x[i] (perm is a bijection, no collisions).
  x = jax.vmap(lambda xi, pi: jnp.zeros_like(xi).at[pi].set(xi, unique_indices=True))(x, p.perm)
  x = _fwht(p, x) * p.signs
  return jnp.sum(x[:, :p.d], axis=0)
