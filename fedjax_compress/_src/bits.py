"""Bit accounting derived from payload types.

The cost of a message is `sum over Field leaves of  width * n + header`, where `n` is the
field's element count (`count` for variable-length fields, else `data.size`) and
`header = length_bits(data.size)` for variable-length fields only. Each message's bits
are an int32 computed in the graph, guarded statically (`check_int32`) so that neither a
field nor the sum over a message's fields can wrap. Totals over rounds and clients are
summed on the host in Python ints (`wire.total_bits`), because float32 is exact only to
2^24 and int32 overflows above ~67M float32 parameters.
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


def check_int32(max_bits: int, what: str, hint: str) -> None:
  """Raise `ValueError` unless a static bound on an in-graph int32 bit count is `< 2^31`.

  The one guard of int32 accounting (fields, whole messages, the dense downlink); bounds
  are Python ints from static shapes and widths, so it runs at trace time.
  """
  if max_bits >= _INT32_LIMIT:
    raise ValueError(f"{what} does not fit int32 bit accounting ({max_bits} >= 2**31 "
                     f"bits); {hint}")


def max_field_bits(field: Field, batch_dims: int = 0) -> int:
  """Static bound of one field's bits: `size * width`, plus `length_bits(size)` if variable."""
  size = _message_size(field, batch_dims)
  return size * field.width + (0 if field.count is None else length_bits(size))


def field_bits(field: Field, batch_dims: int = 0) -> jax.Array:
  """int32 bits of one field (shape = the leading `batch_dims` dims of its data)."""
  size = _message_size(field, batch_dims)
  check_int32(max_field_bits(field, batch_dims),
              f"a field of {size} elements x {field.width} bits",
              "split it into several smaller fields (e.g. blocks)")
  batch_shape = np.shape(field.data)[:batch_dims]
  if field.count is None:
    return jnp.full(batch_shape, size * field.width, jnp.int32)
  count = jnp.asarray(field.count, jnp.int32)
  return count * field.width + length_bits(size)


def count(payload: Any, batch_dims: int = 0) -> jax.Array:
  """Exact int32 bits of a message; with `batch_dims`, one count per leading index.

  Raises `ValueError` at trace time if `sum_fields max_field_bits >= 2^31`, so the int32
  sum over fields can never wrap (`wire.total_bits` counts any size on the host).
  """
  fs = fields(payload)
  check_int32(sum(max_field_bits(f, batch_dims) for f in fs),
              f"a message of {len(fs)} fields",
              "compress it more or send the model as several messages (e.g. per layer); "
              "wire.total_bits counts messages of any size exactly on the host")
  total = None
  for f in fs:
    b = field_bits(f, batch_dims)
    total = b if total is None else total + b
  if total is None:
    return jnp.zeros((), jnp.int32)
  return total


def dense_bits(tree: Any) -> int:
  """Bits of sending `tree` uncompressed at its own dtypes (Python int)."""
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize * 8
             for x in jax.tree.leaves(tree))
