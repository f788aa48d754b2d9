"""Bit accounting derived from payload types.

The cost of a message is `sum over Field leaves of  width * n + header`, where `n` is the
field's element count (`count` for variable-length fields, else `data.size`) and
`header = length_bits(data.size)` for variable-length fields only. Each field's bits
are an int32 computed in the graph; totals over rounds and clients are summed on the
host in Python ints (`wire.total_bits`), because float32 is exact only to 2^24 and int32
overflows above ~67M float32 parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src.base import Field

_INT32_LIMIT = 2**31


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


def field_bits(field: Field, batch_dims: int = 0) -> jax.Array:
  """int32 bits of one field (shape = the leading `batch_dims` dims of its data)."""
  size = _message_size(field, batch_dims)
  if size * field.width + length_bits(size) >= _INT32_LIMIT:
    raise ValueError(
        f"a field of {size} elements x {field.width} bits does not fit int32 "
        "bit accounting; split it into several smaller fields (e.g. blocks)")
  batch_shape = np.shape(field.data)[:batch_dims]
  if field.count is None:
    return jnp.full(batch_shape, size * field.width, jnp.int32)
  count = jnp.asarray(field.count, jnp.int32)
  return count * field.width + length_bits(size)


def count(payload: Any, batch_dims: int = 0) -> jax.Array:
  """Exact int32 bits of a message; with `batch_dims`, one count per leading index."""
  total = None
  for f in fields(payload):
    b = field_bits(f, batch_dims)
    total = b if total is None else total + b
  if total is None:
    return jnp.zeros((), jnp.int32)
  return total


def dense_bits(tree: Any) -> int:
  """Bits of sending `tree` uncompressed at its own dtypes (Python int)."""
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize * 8
             for x in jax.tree.leaves(tree))
