"""Fast Walsh-Hadamard transform (FWHT) in plain `jax.numpy`: butterfly and Kronecker forms.

`H_n` is the unnormalized Sylvester-Hadamard matrix (`H_1 = [1]`,
`H_2n = [[H_n, H_n], [H_n, -H_n]]`), symmetric with `H_n H_n = n I`. Both forms apply it to
the last axis of `x` (length a power of two) and batch over leading axes:

- butterfly: `log2 n` stages `(a, b) -> (a + b, a - b)`, `n log2 n` adds, one memory pass each;
- Kronecker: `H_n = H_{m_1} (x) ... (x) H_{m_j}` with `m_i <= 2^7`, so `x` is reshaped to
  `(m_1, ..., m_j)` and each axis is multiplied by a small dense +-1 matrix (`j` passes,
  matmul-unit friendly; exact up to float rounding since the entries are +-1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress.ops import _native

# Largest dense factor of the Kronecker form (log2). 2^7 = 128 keeps every factor's matmul
# small on CPU; the Pallas path picks its own factor sizes.
KRON_MAX_LOG2 = 7


def is_power_of_two(n: int) -> bool:
  """True for 1, 2, 4, 8, ..."""
  return n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
  """Smallest power of two `>= n` (n >= 1)."""
  return 1 << max(0, int(n - 1).bit_length())


def check_length(n: int) -> int:
  """Return `log2 n`, or raise `ValueError` unless `n` is a power of two."""
  if not is_power_of_two(int(n)):
    raise ValueError(f"FWHT length must be a power of two, got {n}")
  return int(n).bit_length() - 1


@functools.lru_cache(maxsize=None)
def hadamard_matrix_np(n: int) -> np.ndarray:
  """Dense Sylvester-Hadamard matrix `H_n` as float32 NumPy (for small `n` only)."""
  check_length(n)
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def kron_factors(log2n: int, max_log2: int = KRON_MAX_LOG2) -> tuple[int, ...]:
  """Split `2^log2n` into near-equal power-of-two factors of at most `2^max_log2`."""
  if log2n == 0:
    return (1,)
  parts = -(-log2n // max_log2)
  base, extra = divmod(log2n, parts)
  return tuple(1 << (base + (i < extra)) for i in range(parts))


def fwht_butterfly(x: jax.Array) -> jax.Array:
  """Unnormalized FWHT of the last axis by `log2 n` butterfly stages."""
  n = x.shape[-1]
  log2n = check_length(n)
  lead = x.shape[:-1]
  y = x.reshape((-1, n))
  for s in range(log2n):
    h = 1 << s
    y = y.reshape((y.shape[0], n // (2 * h), 2, h))
    a, b = y[:, :, 0, :], y[:, :, 1, :]
    y = jnp.stack([a + b, a - b], axis=2)
  return y.reshape(lead + (n,))


def fwht_kron(x: jax.Array, max_log2: int = KRON_MAX_LOG2) -> jax.Array:
  """Unnormalized FWHT of the last axis as a Kronecker product of small dense Hadamards."""
  n = x.shape[-1]
  factors = kron_factors(check_length(n), max_log2)
  lead = x.shape[:-1]
  y = x.reshape((-1,) + factors)
  for i, m in enumerate(factors):
    if m == 1:
      continue
    h = jnp.asarray(hadamard_matrix_np(m), x.dtype)
    # Contract axis i+1 with H (symmetric), then put the new axis back in place.
    y = jnp.moveaxis(jnp.tensordot(h, y, axes=((1,), (i + 1,)),
                                   precision=jax.lax.Precision.HIGHEST), 0, i + 1)
  return y.reshape(lead + (n,))


METHODS = ("auto", "butterfly", "kron", "pallas", "native")
PALLAS_MIN_N = 1 << 12


def default_method(backend: str | None = None) -> str:
  """The method `fwht(method='auto')` uses: Pallas on GPU, Kronecker on TPU, native on CPU.

  The CPU choice is measured (benchmarks/bench_fwht.py): the cache-blocked native kernel
  (`_native.py`) runs near one memory pass per radix-8 level, while XLA runs every butterfly
  stage as its own pass and the Kronecker form's small matmuls are slower still. Where the
  kernel cannot be built (no C++ compiler), CPU falls back to the butterfly.
  """
  backend = jax.default_backend() if backend is None else backend
  method = {"gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "kron"}.get(backend)
  if method is None:
    method = "native" if _native.available() else "butterfly"
  return method


def fwht(x: jax.Array, *, normalize: bool = False, method: str = "auto") -> jax.Array:
  """Walsh-Hadamard transform of the last axis: `H_n x` (or `H_n x / sqrt(n)` if `normalize`).

  `n = x.shape[-1]` must be a power of two; leading axes are batch axes. `H_n` is
  symmetric and `H_n H_n = n I`, so the normalized transform is its own inverse.
  `method`: 'butterfly' | 'kron' (jnp) | 'pallas' (kernel; interpret mode on CPU) |
  'native' (C++ kernel through the XLA FFI, CPU, float32/float64) | 'auto'
  (`default_method()`, by backend). 'auto' falls back to the butterfly for dtypes the
  chosen kernel lacks and, for Pallas, for `n < PALLAS_MIN_N`.

  >>> import jax.numpy as jnp
  >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
  [1.0, 1.0, 1.0, 1.0]
  >>> fwht(jnp.array([1.0, 2.0, 3.0, 4.0])).tolist()
  [10.0, -2.0, -4.0, 0.0]
  >>> fwht(jnp.array([2.0, 0.0, 0.0, 0.0]), normalize=True).tolist()
  [1.0, 1.0, 1.0, 1.0]
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  n = x.shape[-1] if x.ndim else 0
  check_length(n)
  if method == "auto":
    method = default_method()
    if method == "pallas" and (n < PALLAS_MIN_N or not jnp.issubdtype(x.dtype, jnp.floating)):
      method = "butterfly"
    if method == "native" and not _native.available(x.dtype):
      method = "butterfly"
  if method == "native":
    if jax.default_backend() != "cpu" or not _native.available(x.dtype):
      raise ValueError("method='native' needs the CPU backend, float32/float64 input and a "
                       f"built kernel (got {jax.default_backend()}, {x.dtype}); "
                       "see fedjax_compress/ops/_native.py")
    y = _native.fwht_native(x)
  elif method == "butterfly":
    y = fwht_butterfly(x)
  elif method == "kron":
    y = fwht_kron(x)
  else:
    from fedjax_compress.ops import _pallas_hadamard  # pylint: disable=import-outside-toplevel
    y = _pallas_hadamard.fwht_pallas(x)
  if normalize:
    y = y * jnp.asarray(1.0 / np.sqrt(n), y.dtype)
  return y
