"""Bit accounting derived from payload types, exact at any message size.

The cost of a message is `sum over Field leaves of  width * n + header`, where `n` is the
field's element count (`count` for variable-length fields, else `data.size`) and
`header = length_bits(data.size)` for variable-length fields only.

In the graph a count is a `Bits` value: two int32 limbs `hi * 2^30 + lo` (`0 <= lo < 2^30`),
so any message up to 2^61 bits is billed exactly without `jax_enable_x64` (int32 wraps above
~67M float32 parameters, float32 is exact only to 2^24). Fixed-size fields cost a static
Python int, so `count(jax.eval_shape(encode, ...))` is exact even where memory forbids the
concrete payload. On the host `np.asarray(bits, np.int64)` and `int(bits)` give the value;
totals over rounds and clients are summed there in Python ints (`wire.total_bits`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_compress._src import checks
from fedjax_compress._src.base import Field

_LIMB = 30
_BASE = 1 << _LIMB
_MASK = _BASE - 1
MAX_BITS = (1 << 31) * _BASE - 1
"""Largest count a `Bits` value holds (`hi` is int32): 2^61 - 1 bits."""


def _normalize(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Carry `lo >= 2^30` into `hi` (both int32; `0 <= lo < 2^31`)."""
  return hi + (lo >> _LIMB), lo & _MASK


@struct.dataclass
class Bits:
  """Exact non-negative bit counts as int32 limbs: value = `hi * 2^30 + lo`, `0 <= lo < 2^30`.

  A pytree (works under `jit`/`vmap`, in `RoundMetrics`); `+` and `Bits.where` stay exact.
  Host side: `np.asarray(b, np.int64)`, `int(b)` (scalars), `b.tolist()`, `b.sum()` (Python int).
  """

  hi: jax.Array
  lo: jax.Array

  @staticmethod
  def const(n: int, shape: tuple[int, ...] = ()) -> "Bits":
    """A static Python int `0 <= n <= MAX_BITS` broadcast to `shape`."""
    n = int(n)
    if not 0 <= n <= MAX_BITS:
      raise ValueError(f"bit count {n} outside [0, 2^61)")
    hi, lo = divmod(n, _BASE)
    return Bits(jnp.full(shape, hi, jnp.int32), jnp.full(shape, lo, jnp.int32))

  @staticmethod
  def times(count: jax.Array, width: int) -> "Bits":
    """Exact `count * width` for int32 `0 <= count < 2^31` and a static `1 <= width <= 64`.

    `count = c1 2^24 + c0` with `c0 < 2^24`, so `c0 w < 2^30` and `c1 w < 2^13` never wrap.
    """
    count = jnp.asarray(count, jnp.int32)
    c1, c0 = count >> 24, count & ((1 << 24) - 1)
    high = c1 * width                        # weight 2^24 = 2^30 / 2^6
    return Bits(*_normalize(high >> 6, ((high & 63) << 24) + c0 * width))

  def __add__(self, other: "Bits | int") -> "Bits":
    if not isinstance(other, Bits):
      other = Bits.const(other)
    return Bits(*_normalize(self.hi + other.hi, self.lo + other.lo))

  __radd__ = __add__

  @staticmethod
  def where(cond: jax.Array, a: "Bits", b: "Bits | int") -> "Bits":
    """Elementwise `a if cond else b` (`b` may be an int, e.g. 0)."""
    if not isinstance(b, Bits):
      b = Bits.const(b)
    return Bits(jnp.where(cond, a.hi, b.hi), jnp.where(cond, a.lo, b.lo))

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the (batch of) counts."""
    return tuple(np.shape(self.lo))

  def __getitem__(self, index) -> "Bits":
    return Bits(self.hi[index], self.lo[index])

  def __len__(self) -> int:
    if not self.shape:
      raise TypeError("len() of a scalar Bits")
    return self.shape[0]

  def __iter__(self):
    # Explicit: jax indexing clamps out-of-range ints, so `__getitem__` alone never stops.
    return (self[i] for i in range(len(self)))

  def value(self) -> np.ndarray:
    """Host-side int64 array of the counts (needs concrete limbs)."""
    hi = np.asarray(jax.device_get(self.hi), np.int64)
    lo = np.asarray(jax.device_get(self.lo), np.int64)
    return hi * _BASE + lo

  def __array__(self, dtype=None, copy=None):  # pylint: disable=unused-argument
    v = self.value()
    return v if dtype is None else v.astype(dtype)

  def __int__(self) -> int:
    v = self.value()
    if v.shape:
      raise TypeError(f"int() of Bits with shape {v.shape}; use .tolist() or .sum()")
    return int(v)

  def tolist(self) -> Any:
    """Counts as (nested) Python ints."""
    return self.value().tolist()

  def sum(self) -> int:
    """Sum of all counts as a Python int (host side, no overflow)."""
    return int(self.value().sum(dtype=np.int64)) if self.shape else int(self)

  def __repr__(self) -> str:
    if checks.is_concrete(self.hi) and checks.is_concrete(self.lo):
      return f"Bits({self.value().tolist()})"
    return f"Bits(<traced {self.shape}>)"


def length_bits(size: int) -> int:
  """Bits of the length header of a variable-length field of capacity `size`: ceil(log2(size+1))."""
  return max(1, math.ceil(math.log2(size + 1)))


def index_bits(size: int) -> int:
  """Bits needed to address one of `size` positions: ceil(log2(size)), at least 1."""
  return max(1, math.ceil(math.log2(size))) if size > 1 else 1


def is_field(x: Any) -> bool:
  """True for `Field` leaves (used as `is_leaf` when walking payloads)."""
  return isinstance(x, Field)


def fields(payload: Any) -> list[Field]:
  """The `Field` leaves of a payload in wire order (pytree leaf order)."""
  leaves = jax.tree.leaves(payload, is_leaf=is_field)
  for leaf in leaves:
    if not isinstance(leaf, Field):
      raise TypeError(
          f"payload leaves must be Field, got {type(leaf).__name__}; wrap arrays "
          "in Field(data, width) so their bit cost is declared")
  return leaves


def _message_size(field: Field, batch_dims: int) -> int:
  shape = np.shape(field.data)
  return int(np.prod(shape[batch_dims:], dtype=np.int64))


def max_field_bits(field: Field, batch_dims: int = 0) -> int:
  """Static bound of one field's bits: `size * width`, plus `length_bits(size)` if variable."""
  size = _message_size(field, batch_dims)
  return size * field.width + (0 if field.count is None else length_bits(size))


def check_count(field: Field, batch_dims: int = 0) -> jax.Array:
  """A variable field's int32 `count`, checked against `[0, capacity]`.

  Concrete counts outside the range raise `ValueError` (as `wire.pack` does); traced ones
  are clipped into it (nothing can be raised inside `jit`).
  """
  size = _message_size(field, batch_dims)
  count = field.count
  if checks.is_concrete(count):
    c = np.asarray(count)
    if c.size and (c.min() < 0 or c.max() > size):
      raise ValueError(f"field count {c.min() if c.min() < 0 else c.max()} outside "
                       f"[0, {size}] (the field's capacity)")
  return jnp.clip(jnp.asarray(count, jnp.int32), 0, size)


def field_bits(field: Field, batch_dims: int = 0) -> Bits:
  """Exact bits of one field (shape = the leading `batch_dims` dims of its data)."""
  size = _message_size(field, batch_dims)
  batch_shape = tuple(np.shape(field.data)[:batch_dims])
  if field.count is None:
    return Bits.const(size * field.width, batch_shape)
  count = jnp.broadcast_to(check_count(field, batch_dims), batch_shape)
  return Bits.times(count, field.width) + Bits.const(length_bits(size), batch_shape)


def count(payload: Any, batch_dims: int = 0) -> Bits:
  """Exact bits of a message as `Bits`; with `batch_dims`, one count per leading index.

  The static part (fixed-size fields, length headers) is summed in Python ints and the
  variable part in exact limbs, so nothing wraps at any size (up to 2^61 bits).

  >>> import jax.numpy as jnp
  >>> from fedjax_compress import Field
  >>> int(count({'v': Field(jnp.zeros(3), 32), 'i': Field(jnp.zeros(4, jnp.int8), 5, 2)}))
  109
  >>> int(count(Field(jax.ShapeDtypeStruct((124_439_808,), jnp.float32), 32)))  # abstract
  3982073856
  """
  fs = fields(payload)
  batch_shape = tuple(np.shape(fs[0].data)[:batch_dims]) if fs else ()
  static = 0
  total = None
  for f in fs:
    if f.count is None:
      static += _message_size(f, batch_dims) * f.width
    else:
      b = field_bits(f, batch_dims)
      total = b if total is None else total + b
  const = Bits.const(static, batch_shape)
  return const if total is None else total + const


def dense_bits(tree: Any) -> int:
  """Bits of sending `tree` uncompressed at its own dtypes (Python int)."""
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize * 8
             for x in jax.tree.leaves(tree))
