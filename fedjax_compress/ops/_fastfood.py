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

Factors are never stored: `FastfoodParams` keeps the block keys and the normalization, and
`fastfood_project` / `fastfood_transpose` regenerate `B`, `P`, `G` inside the program where
they are used. With `permutation='feistel'` and `generator='hash'` every factor is an
elementwise function of the index (a keyed Feistel bijection, keyed integer hashes), so XLA
computes it inside the fused multiply / gather that consumes it: no sort, no random-bit
pass, no `[nb, L]` factor buffers. The uniform permutation (`jax.random.permutation`, a
sort) is the only factor that must be materialized.

Defaults (`'auto'`): maps with `next_pow2(max(D, d)) <= AUTO_GLOBAL_MAX` (2^16) are the
spec's exact global map (uniform permutation, `jax.random` signs and normals); larger maps
are blocked with `D_b = max(AUTO_BLOCK_ROWS, next_pow2(d))` rows per block (square blocks,
`L = D_b`: no padding waste except in the last block, one block fits the L2 cache) and use
the Feistel permutation and hashed factors. Both satisfy the map's tests (adjoint, dense
float64 reference, column norms, `V^T V` off-diagonals <= 6/sqrt(D), `E[V V^T] = (d/D) I`).

Blocked maps are applied `GRAM_CHUNK` entries (whole blocks) at a time (`lax.scan`): a
chunk's FWHTs, gathers and regenerated factors stay in cache, the `D`-vector is read or
written in place once, and no `[nb, L]` temporary is made; `fastfood_gram` (`V^T V z`, for
CG solves) runs both directions per chunk and makes no `D`-sized buffer at all. One block
(the global map) is transformed as a whole array. `V` is never materialized. `fastfood_transpose` is the exact
adjoint: `V^T y = c E_d^T B H P^T G H R_D^T y` (the inverse permutation is a gather through
the inverse Feistel, or a scatter for the uniform permutation). Inputs are rescaled by a
power of two (exact) before the transforms, so no intermediate overflows for any finite
input; results beyond float32's range saturate at its largest finite value.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_compress._src import checks
from fedjax_compress._src.keys import as_key
from fedjax_compress.ops import _hadamard

AUTO_GLOBAL_MAX = 1 << 16
"""'auto' keeps the spec's exact global map up to this padded length `next_pow2(max(D, d))`."""
AUTO_BLOCK_ROWS = 1 << 16
"""Rows per block of the 'auto' blocked map (at least `next_pow2(d)`): one block's FWHT and
permutation stay in the L2 cache."""

PERMUTATIONS = ("auto", "uniform", "feistel")
GENERATORS = ("auto", "threefry", "hash")
_FEISTEL_ROUNDS = 6
_F32_MAX = float(np.finfo(np.float32).max)


@struct.dataclass
class FastfoodParams:
  """One Fastfood map: block keys, normalization and static shape (factors are regenerated).

  `scale[b] = 1 / (sqrt(L ||G_b||^2) sqrt(D / L))` already includes the global factor.
  Factors drawn with `jax.random` (threefry normals and signs, the sorted uniform
  permutation) are stored as `[nb, L]` tables; the Feistel permutation and hashed factors are
  computed where they are used. `signs`, `perm`, `gauss` (and `inverse_perm`) return the
  factors as `[nb, L]` arrays either way (for tests and references).
  """

  keys: jax.Array                    # typed key[nb]: fold_in(key, b)
  scale: jax.Array                   # f32[nb]
  perm_table: Optional[jax.Array]    # int32[nb, L] uniform permutation (None: Feistel)
  signs_table: Optional[jax.Array]   # f32[nb, L] threefry signs (None: hashed)
  gauss_table: Optional[jax.Array]   # f32[nb, L] threefry normals (None: hashed or G := 1)
  d: int = struct.field(pytree_node=False)
  D: int = struct.field(pytree_node=False)
  block_rows: int = struct.field(pytree_node=False)
  L: int = struct.field(pytree_node=False)  # pylint: disable=invalid-name
  method: str = struct.field(pytree_node=False, default="auto")
  permutation: str = struct.field(pytree_node=False, default="uniform")
  generator: str = struct.field(pytree_node=False, default="threefry")
  gaussian: bool = struct.field(pytree_node=False, default=True)

  @property
  def num_blocks(self) -> int:
    """Number of stacked blocks `nb`."""
    return int(self.keys.shape[-1])

  @property
  def signs(self) -> jax.Array:
    """`B`: f32[nb, L] of +-1."""
    return _signs(self, self.L)

  @property
  def perm(self) -> jax.Array:
    """`P`: int32[nb, L] (gather: `(P x)_i = x[perm[i]]`)."""
    return _perm(self)

  @property
  def inverse_perm(self) -> jax.Array:
    """`P^T`: int32[nb, L] with `inverse_perm[perm[i]] = i`."""
    return _inverse_perm(self)

  @property
  def gauss(self) -> jax.Array:
    """`G`: f32[nb, L]."""
    return _gauss(self)


def check_dims(d: int, D: int) -> tuple[int, int]:  # pylint: disable=invalid-name
  """Validate `0 < d <= D` (eagerly, with a clear error)."""
  d = checks.check_positive_int(d, "d (intrinsic dimension)")
  D = checks.check_positive_int(D, "D (number of parameters)")  # pylint: disable=invalid-name
  if d > D:
    raise ValueError(f"intrinsic dimension d={d} exceeds the number of parameters D={D}; "
                     "need 0 < d <= D (use an uncompressed baseline instead)")
  return d, D


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (xorshift-multiply finalizer), elementwise on uint32; a bijection."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _keyed_hash(i: jax.Array, words: jax.Array) -> jax.Array:
  """`mix32(mix32(i ^ k0) + k1)`: keyed 32-bit hash of uint32 indices (`words` = uint32[2])."""
  return _mix32(_mix32(i ^ words[0]) + words[1])


def _feistel_setup(key, n: int):
  log2n = _hadamard.check_length(n)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
  return log2n, round_keys, log2n - log2n // 2, log2n // 2   # widths of (a, b)


def feistel_permutation(key, n: int) -> jax.Array:
  """Pseudo-random permutation of `0..n-1` (`n` a power of two) without sorting, O(n).

  Index bits are split in two halves `(a, b)` and `6` keyed Feistel rounds
  `(a, b) -> (b, a XOR hash(b XOR k_r) mod 2^|a|)` are applied; every round is a bijection,
  so the result is a permutation (pseudo-random, not uniform over all `n!`). An elementwise
  function of the index: inside `jit` it fuses into the gather that uses it. `n < 4` falls
  back to `jax.random.permutation`.
  """
  log2n = _hadamard.check_length(n)
  if log2n < 2:
    return jax.random.permutation(key, n).astype(jnp.int32)
  _, round_keys, wa, wb = _feistel_setup(key, n)
  i = jnp.arange(n, dtype=jnp.uint32)
  a, b = i >> wb, i & jnp.uint32((1 << wb) - 1)
  for r in range(_FEISTEL_ROUNDS):
    f = _mix32(b ^ round_keys[r]) & jnp.uint32((1 << wa) - 1)
    a, b, wa, wb = b, a ^ f, wb, wa
  return ((a << wb) | b).astype(jnp.int32)


def feistel_inverse(key, n: int) -> jax.Array:
  """Inverse of `feistel_permutation(key, n)`: `inv[perm[i]] = i` (the rounds run backwards)."""
  log2n = _hadamard.check_length(n)
  if log2n < 2:
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32))
  _, round_keys, wa, wb = _feistel_setup(key, n)
  if _FEISTEL_ROUNDS % 2:
    wa, wb = wb, wa
  j = jnp.arange(n, dtype=jnp.uint32)
  a, b = j >> wb, j & jnp.uint32((1 << wb) - 1)
  for r in reversed(range(_FEISTEL_ROUNDS)):
    # forward: (a', b') -> (b', a' ^ f(b')), f masked to |a'| = |b| bits
    f = _mix32(a ^ round_keys[r]) & jnp.uint32((1 << wb) - 1)
    a, b, wa, wb = b ^ f, a, wb, wa
  return ((a << wb) | b).astype(jnp.int32)


def _sub_keys(p: FastfoodParams):
  """Per-block (signs, permutation, gauss) keys, each a typed key[nb] (as in `split(key, 3)`)."""
  ks = jax.vmap(lambda k: jax.random.split(k, 3))(p.keys)
  return ks[:, 0], ks[:, 1], ks[:, 2]


def _hash_words(keys: jax.Array) -> jax.Array:
  return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)   # uint32[nb, 2]


def _signs(p: FastfoodParams, n: int) -> jax.Array:
  """First `n` entries of every block's signs `B`: f32[nb, n]."""
  if p.signs_table is not None:
    return p.signs_table[:, :n]
  kb, _, _ = _sub_keys(p)
  i = jnp.arange(n, dtype=jnp.uint32)
  h = jax.vmap(lambda w: _keyed_hash(i, w))(_hash_words(kb))
  return 1.0 - 2.0 * (h >> 31).astype(jnp.float32)


def _hashed_gauss(words: jax.Array, i: jax.Array) -> jax.Array:
  """Hashed normals `G[b, i]` for uint32 indices `i`: f32[nb, len(i)] (`words`: uint32[nb, 2])."""
  h = jax.vmap(lambda w: _keyed_hash(i, w))(words)
  # u = (m + 1/2) 2^-24 with m the top 24 bits; 2u - 1 = (2m + 1 - 2^24) 2^-24 exactly.
  t = ((h >> 8).astype(jnp.int32) * 2 + (1 - (1 << 24))).astype(jnp.float32) * (2.0 ** -24)
  return jnp.float32(np.sqrt(2.0)) * jax.lax.erf_inv(t)


def _gauss(p: FastfoodParams) -> jax.Array:
  """`G`: f32[nb, L] (ones when `gaussian=False`)."""
  if p.gauss_table is not None:
    return p.gauss_table
  if not p.gaussian:
    return jnp.ones((p.num_blocks, p.L), jnp.float32)
  _, _, kg = _sub_keys(p)
  return _hashed_gauss(_hash_words(kg), jnp.arange(p.L, dtype=jnp.uint32))


_NORM_CHUNK = 1 << 12


def _gauss_sq_norms(p: FastfoodParams) -> jax.Array:
  """`||G_b||^2` per block: f32[nb]. Hashed normals are summed `_NORM_CHUNK` indices at a
  time (`lax.scan`), so no `[nb, L]` buffer is made (XLA:CPU does not fuse the normals into
  the reduction)."""
  if p.gauss_table is not None or not p.gaussian or p.L <= _NORM_CHUNK:
    return jnp.sum(jnp.square(_gauss(p)), axis=-1)
  _, _, kg = _sub_keys(p)
  words = _hash_words(kg)
  base = jnp.arange(_NORM_CHUNK, dtype=jnp.uint32)

  def step(acc, j):
    g = _hashed_gauss(words, base + j * jnp.uint32(_NORM_CHUNK))
    return acc + jnp.sum(jnp.square(g), axis=-1), None

  starts = jnp.arange(p.L // _NORM_CHUNK, dtype=jnp.uint32)
  return jax.lax.scan(step, jnp.zeros((p.num_blocks,), jnp.float32), starts)[0]


def _perm(p: FastfoodParams) -> jax.Array:
  if p.perm_table is not None:
    return p.perm_table
  _, kp, _ = _sub_keys(p)
  return jax.vmap(lambda k: feistel_permutation(k, p.L))(kp)


def _inverse_perm(p: FastfoodParams) -> jax.Array:
  if p.perm_table is not None:
    idx = jnp.broadcast_to(jnp.arange(p.L, dtype=jnp.int32), p.perm_table.shape)
    return jax.vmap(lambda t, i: jnp.zeros_like(t).at[t].set(i, unique_indices=True))(
        p.perm_table, idx)
  _, kp, _ = _sub_keys(p)
  return jax.vmap(lambda k: feistel_inverse(k, p.L))(kp)


def resolve(d: int, D: int, block_rows, permutation: str, generator: str  # pylint: disable=invalid-name
            ) -> tuple[int, int, str, str]:
  """`(rows, L, permutation, generator)` of a map after the 'auto' rules (module docstring)."""
  small = _hadamard.next_power_of_two(max(D, d)) <= AUTO_GLOBAL_MAX
  if block_rows == "auto":
    rows = D if small else max(AUTO_BLOCK_ROWS, _hadamard.next_power_of_two(d))
  elif block_rows is None:
    rows = D
  else:
    rows = checks.check_positive_int(block_rows, "block_rows")
  rows = min(rows, D)
  if permutation == "auto":
    permutation = "uniform" if small else "feistel"
  if generator == "auto":
    generator = "threefry" if small else "hash"
  return rows, _hadamard.next_power_of_two(max(rows, d)), permutation, generator


def fastfood_params(key, d: int, D: int, *, block_rows: int | str | None = "auto",  # pylint: disable=invalid-name
                    gaussian: bool = True, method: str = "auto", permutation: str = "auto",
                    generator: str = "auto") -> FastfoodParams:
  """The Fastfood map `V: R^d -> R^D` of `key` (works inside `jit`; factors regenerated lazily).

  Args:
    key: typed key, raw key data or int seed; block `b` uses `fold_in(key, b)`.
    d, D: input and output dimensions, `0 < d <= D` (static).
    block_rows: rows per block `D_b`; None: one global block (the spec's exact map);
      'auto': global up to `AUTO_GLOBAL_MAX`, else `max(AUTO_BLOCK_ROWS, next_pow2(d))`.
    gaussian: if False, `G := 1` (then `V` is orthogonal when `d = D = L`; a test map).
    method: FWHT method used by project/transpose (see `fwht`).
    permutation: 'uniform' (`jax.random.permutation`, the spec's uniform `Pi`; sort-based and
      materialized), 'feistel' (`feistel_permutation`: pseudo-random, computed inside the
      gather) or 'auto' (uniform for small maps, else Feistel).
    generator: signs and normals from 'threefry' (`jax.random`) or 'hash' (keyed integer
      hashes; normals by the inverse error function of a 24-bit uniform); 'auto' as above.

  Costs: the normalization `||G_b||^2` is computed here (one regeneration of `G`, no memory
  traffic with 'hash'); the uniform permutation is a sort of length `L` per block.

  >>> p = fastfood_params(0, 3, 5)
  >>> (p.num_blocks, p.L, p.d, p.D)
  (1, 8, 3, 5)
  """
  d, D = check_dims(d, D)  # pylint: disable=invalid-name
  if method not in _hadamard.METHODS:
    raise ValueError(f"method must be one of {_hadamard.METHODS}, got {method!r}")
  if permutation not in PERMUTATIONS:
    raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
  if generator not in GENERATORS:
    raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
  if isinstance(block_rows, str) and block_rows != "auto":
    raise ValueError(f"block_rows must be a positive int, None or 'auto', got {block_rows!r}")
  rows, L, permutation, generator = resolve(d, D, block_rows, permutation, generator)  # pylint: disable=invalid-name
  return _make_params(as_key(key), d, D, rows, L, method, permutation, generator,  # pylint: disable=invalid-name
                      bool(gaussian))


@functools.partial(jax.jit, static_argnums=range(1, 9))
def _make_params(key, d, D, rows, L, method, permutation, generator, gaussian):  # pylint: disable=invalid-name
  """The arrays of `fastfood_params` (one compiled program per static configuration)."""
  nb = -(-D // rows)
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(nb, dtype=jnp.uint32))
  p = FastfoodParams(keys, jnp.zeros((nb,), jnp.float32), None, None, None, d, D, rows, L,
                     method, permutation, generator, gaussian)
  kb, kp, kg = _sub_keys(p)
  if permutation == "uniform":
    p = p.replace(perm_table=jax.vmap(
        lambda k: jax.random.permutation(k, L).astype(jnp.int32))(kp))
  if generator == "threefry":
    p = p.replace(signs_table=jax.vmap(lambda k: jax.random.rademacher(k, (L,), jnp.float32))(kb))
    if gaussian:
      p = p.replace(gauss_table=jax.vmap(lambda k: jax.random.normal(k, (L,), jnp.float32))(kg))
  sq = _gauss_sq_norms(p)
  scale = jax.lax.rsqrt(jnp.float32(L) * sq) * jnp.float32(np.sqrt(L / D))
  return p.replace(scale=scale)


def _fwht(p: FastfoodParams, x: jax.Array) -> jax.Array:
  return _hadamard.fwht(x, method=p.method)


def pow2_scale(x: jax.Array) -> jax.Array:
  """A power of two `s` with `max|x| / s` in `[1, 2)` when `max|x| > 1`, else 1 (a constant
  for differentiation).

  Dividing by `s` is exact (no rounding), so a linear transform of `x / s` times `s` equals
  that of `x` bit for bit wherever the latter does not overflow; with `max|x / s| < 2` no
  intermediate of the Fastfood transforms can overflow.
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x))) if x.size else jnp.float32(0)
  big = jnp.isfinite(m) & (m > 1)
  _, e = jnp.frexp(jnp.where(big, m, 1.0))
  return jnp.where(big, jnp.ldexp(jnp.float32(1), e - 1), jnp.float32(1))


def _unscale(x: jax.Array, s: jax.Array) -> jax.Array:
  """`x * s`, finite results beyond float32's range saturated at its largest value."""
  big = (jnp.abs(x) > _F32_MAX / s) & jnp.isfinite(x)
  return jnp.where(big, jnp.sign(x) * _F32_MAX, x * s)


def fastfood_project(p: FastfoodParams, z: jax.Array) -> jax.Array:
  """`V z`: f32[d] -> f32[D] (two FWHTs of length `L` per block)."""
  checks.check_finite(z, "z")
  z = jnp.asarray(z, jnp.float32)
  if z.shape != (p.d,):
    raise ValueError(f"z must have shape ({p.d},), got {z.shape}")
  return _project(p, z)


@jax.jit
def _project(p: FastfoodParams, z: jax.Array) -> jax.Array:
  """Blocked maps in chunks of blocks (`_project_chunked`), one block as a whole array."""
  return _project_chunked(p, z) if p.num_blocks > 1 else _project_whole(p, z)


def _project_whole(p: FastfoodParams, z: jax.Array) -> jax.Array:
  s = pow2_scale(z)
  x = _chunk_forward(p, jnp.broadcast_to((z / s)[None, :], (p.num_blocks, p.d)))
  return _unscale(x[:, :p.block_rows].reshape(-1)[:p.D], s)    # keep D_b rows per block


def fastfood_transpose(p: FastfoodParams, y: jax.Array) -> jax.Array:
  """`V^T y`: f32[D] -> f32[d], the exact adjoint of `fastfood_project`."""
  checks.check_finite(y, "y")
  y = jnp.asarray(y, jnp.float32)
  if y.shape != (p.D,):
    raise ValueError(f"y must have shape ({p.D},), got {y.shape}")
  return _transpose(p, y)


@jax.jit
def _transpose(p: FastfoodParams, y: jax.Array) -> jax.Array:
  """Blocked maps in chunks of blocks (`_transpose_chunked`), one block as a whole array."""
  return _transpose_chunked(p, y) if p.num_blocks > 1 else _transpose_whole(p, y)


def _transpose_whole(p: FastfoodParams, y: jax.Array) -> jax.Array:
  s = pow2_scale(y)
  nb, rows = p.num_blocks, p.block_rows
  x = jnp.pad(y / s, (0, nb * rows - p.D)).reshape(nb, rows)
  x = jnp.pad(x, ((0, 0), (0, p.L - rows)))
  return _unscale(jnp.sum(_chunk_backward(p, x), axis=0), s)


GRAM_CHUNK = 1 << 16
"""Blocked maps are applied in chunks of about this many entries (`K` maps x blocks x `L`,
at least one block): a chunk's FWHTs, gathers and factors stay in cache, so a transform costs
about one memory pass of `D` plus the arithmetic (measured at D = 10M: `fastfood_gram` 3.1x
faster than project-then-transpose over whole `[nb, L]` arrays), and `fastfood_gram` makes
no `D`-sized buffer."""


def _chunk_size(nb: int, k: int, big_l: int, chunk: int = GRAM_CHUNK) -> int:
  return max(1, min(nb, chunk // (k * big_l)))


def _take_blocks(p: FastfoodParams, blk: jax.Array) -> FastfoodParams:
  """Blocks `blk` (int32[c], in range) of a single map `p`."""
  take = lambda x: None if x is None else jnp.take(x, blk, axis=0)  # noqa: E731
  return p.replace(keys=take(p.keys), scale=take(p.scale), perm_table=take(p.perm_table),
                   signs_table=take(p.signs_table), gauss_table=take(p.gauss_table))


def _project_chunked(p: FastfoodParams, z: jax.Array) -> jax.Array:
  """`V z` of a blocked map, `c` blocks at a time, written into the `D` output in place.

  Full chunks (`c D_b` rows inside `D`) are a `lax.scan`; the rest (< `c` blocks, the last
  block possibly cut) one more chunk. Same arithmetic per block as the whole-array path.
  """
  nb, rows = p.num_blocks, p.block_rows
  size = _chunk_size(nb, 1, p.L)
  span = size * rows
  full, rest = divmod(p.D, span)
  s = pow2_scale(z)
  zs = jnp.broadcast_to((z / s)[None, :], (size, p.d))

  def chunk_out(first):
    blk = jnp.minimum(first + jnp.arange(size, dtype=jnp.int32), nb - 1)
    x = _chunk_forward(_take_blocks(p, blk), zs)[:, :rows]
    return _unscale(x, s).reshape(-1)

  def step(out, j):
    return jax.lax.dynamic_update_slice_in_dim(out, chunk_out(j * size), j * span, 0), None

  out = jnp.zeros((p.D,), jnp.float32)
  if full:
    out = jax.lax.scan(step, out, jnp.arange(full, dtype=jnp.int32))[0]
  if rest:
    out = jax.lax.dynamic_update_slice_in_dim(out, chunk_out(full * size)[:rest], full * span, 0)
  return out


def _transpose_chunked(p: FastfoodParams, y: jax.Array) -> jax.Array:
  """`V^T y` of a blocked map, `c` blocks at a time read from `y` in place (no padded copy)."""
  nb, rows = p.num_blocks, p.block_rows
  size = _chunk_size(nb, 1, p.L)
  span = size * rows
  full, rest = divmod(p.D, span)
  s = pow2_scale(y)

  def chunk_in(first, x):
    blk = jnp.minimum(first + jnp.arange(size, dtype=jnp.int32), nb - 1)
    x = jnp.pad((x / s).reshape(size, rows), ((0, 0), (0, p.L - rows)))
    return jnp.sum(_chunk_backward(_take_blocks(p, blk), x), axis=0)

  def step(acc, j):
    return acc + chunk_in(j * size, jax.lax.dynamic_slice_in_dim(y, j * span, span, 0)), None

  acc = jnp.zeros((p.d,), jnp.float32)
  if full:
    acc = jax.lax.scan(step, acc, jnp.arange(full, dtype=jnp.int32))[0]
  if rest:
    acc = acc + chunk_in(full * size, jnp.pad(y[full * span:], (0, span - rest)))
  return _unscale(acc, s)


def _block_chunk(p: FastfoodParams, start: jax.Array, size: int) -> FastfoodParams:
  """Blocks `start .. start + size - 1` of `p` (a leading map axis, if any, kept)."""
  take = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(  # noqa: E731
      x, start, size, axis=x.ndim - 1 if x.ndim == p.keys.ndim else x.ndim - 2)
  return p.replace(keys=take(p.keys), scale=take(p.scale), perm_table=take(p.perm_table),
                   signs_table=take(p.signs_table), gauss_table=take(p.gauss_table))


def _chunk_forward(p: FastfoodParams, z: jax.Array) -> jax.Array:
  """`H G P H B E_d z_b` of a chunk of blocks, scaled per block: f32[c, L] (rows not cut;
  `z`: f32[c, d], one input per block)."""
  x = _fwht(p, jnp.pad(z * _signs(p, p.d), ((0, 0), (0, p.L - p.d))))
  x = jnp.take_along_axis(x, _perm(p), axis=-1, mode="promise_in_bounds")
  return _fwht(p, x * _gauss(p)) * p.scale[:, None]


def _chunk_backward(p: FastfoodParams, x: jax.Array) -> jax.Array:
  """`scale_b E_d^T B H P^T G H x_b` of a chunk of blocks `x`: f32[c, d]."""
  x = _fwht(p, x * p.scale[:, None]) * _gauss(p)
  # P^T: u[perm[i]] = x[i], i.e. a gather through the inverse permutation (a scatter for a
  # stored uniform permutation).
  if p.perm_table is not None:
    x = jax.vmap(lambda xi, pi: jnp.zeros_like(xi).at[pi].set(xi, unique_indices=True))(
        x, p.perm_table)
  else:
    x = jnp.take_along_axis(x, _inverse_perm(p), axis=-1, mode="promise_in_bounds")
  return _fwht(p, x)[:, :p.d] * _signs(p, p.d)


def fastfood_gram(p: FastfoodParams, z: jax.Array, *, chunk: int = GRAM_CHUNK) -> jax.Array:
  """`V^T V z` (f32[d] -> f32[d]), or for `K` stacked maps (leading axis, `z`: f32[K, d])
  `[V_1^T; ..; V_K^T] sum_k V_k z_k`, without any `D`-sized buffer.

  `V^T V = sum_b V_b^T V_b` over the row blocks `b`, so the blocks are processed in chunks
  (`lax.scan`): each chunk's `y_b = sum_k V_{k,b} z_k` (rows past `D_b`, and past `D` in
  the last block, zeroed: `R_D^T R_D`) goes straight back through the transposes. Equals
  `fastfood_transpose(p, fastfood_project(p, z))` up to float rounding of the block sum;
  temporaries are `O(chunk)`, not `O(D)` (a CG solve on `V^T V` is then `O(d)` memory).
  `chunk`: entries per chunk (at least one block of every map).
  """
  stacked = p.keys.ndim == 2
  ps = p if stacked else jax.tree.map(lambda x: x[None], p)
  z = jnp.asarray(z, jnp.float32)
  zs = z if stacked else z[None]
  if zs.shape != (ps.keys.shape[0], p.d):
    raise ValueError(f"z must have shape {(ps.keys.shape[0], p.d) if stacked else (p.d,)}, "
                     f"got {z.shape}")
  out = _gram(ps, zs, checks.check_positive_int(chunk, "chunk"))
  return out if stacked else out[0]


@functools.partial(jax.jit, static_argnums=2)
def _gram(ps: FastfoodParams, z: jax.Array, chunk: int) -> jax.Array:
  k, nb = ps.keys.shape
  size = _chunk_size(nb, k, ps.L, chunk)
  steps = -(-nb // size)
  s = pow2_scale(z)
  zs = z / s
  rows = jnp.arange(ps.L, dtype=jnp.int32)

  def step(acc, j):
    start = jnp.minimum(j * size, nb - size)   # the last chunk overlaps the previous one
    blk = start + jnp.arange(size, dtype=jnp.int32)
    fresh = blk >= j * size                      # blocks not done by an earlier chunk
    keep = (rows[None, :] < ps.block_rows) & (blk[:, None] * ps.block_rows + rows[None, :]
                                              < ps.D) & fresh[:, None]
    pc = _block_chunk(ps, start, size)   # the K maps' blocks as one flat chunk of K * size
    pc = jax.tree.map(lambda x: x.reshape((k * size,) + x.shape[2:]), pc)
    y = _chunk_forward(pc, jnp.repeat(zs, size, axis=0)).reshape(k, size, ps.L)
    y = jnp.where(keep, jnp.sum(y, axis=0), 0.0)
    back = _chunk_backward(pc, jnp.tile(y, (k, 1)))
    return acc + jnp.sum(back.reshape(k, size, ps.d), axis=1), None

  acc = jnp.zeros(z.shape, jnp.float32)
  return _unscale(jax.lax.scan(step, acc, jnp.arange(steps, dtype=jnp.int32))[0], s)
