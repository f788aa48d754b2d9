"""Host-side packing of payloads to real bytes (NumPy; never traced).

Wire format: the payload's `Field` leaves in pytree order, concatenated as one bit stream
(most significant bit first). Each element takes exactly `width` bits: floats are sent as
their IEEE bit pattern (width must equal the dtype's bits), integers as `width`-bit
unsigned or two's-complement values, bools as 0/1. A variable-length field starts with a
`length_bits(capacity)`-bit header holding its count. Only the end of the stream is
padded with zero bits to a whole byte, so `len(pack(p)) == ceil(total_bits(p) / 8)`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src.base import Field

_CHUNK = 1 << 18  # elements processed at a time, bounds temporary memory


def _int_range(dtype: np.dtype, width: int) -> tuple[int, int]:
  if np.issubdtype(dtype, np.signedinteger):
    return -(1 << (width - 1)), (1 << (width - 1)) - 1
  return 0, (1 << width) - 1


def _check_width(dtype: np.dtype, width: int) -> None:
  """Width against the dtype (`Field` itself guarantees an int in [1, 64])."""
  if dtype == np.bool_:
    return
  if np.issubdtype(dtype, np.integer):
    if width > dtype.itemsize * 8:
      raise ValueError(f"width {width} exceeds the {dtype} element size")
    return
  if width != dtype.itemsize * 8:
    raise ValueError(
        f"float field of dtype {dtype} must have width {dtype.itemsize * 8}, got {width}; "
        "quantize to integers to send fewer bits")


def _to_unsigned(arr: np.ndarray, width: int) -> np.ndarray:
  """Element bit patterns as uint64 in [0, 2^width)."""
  dtype = arr.dtype
  if dtype == np.bool_:
    return arr.astype(np.uint64)
  if np.issubdtype(dtype, np.integer):
    lo, hi = _int_range(dtype, width)
    if arr.size and (arr.min() < lo or arr.max() > hi):
      raise ValueError(
          f"integer values in [{arr.min()}, {arr.max()}] do not fit {width}-bit "
          f"{'signed' if lo < 0 else 'unsigned'} field")
    return arr.astype(np.int64).astype(np.uint64) & np.uint64((1 << width) - 1)
  uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
  return arr.view(uint).astype(np.uint64)


def _value_bits(vals: np.ndarray, width: int) -> np.ndarray:
  shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
  return ((vals[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


def _field_chunks(f: Field) -> Iterator[np.ndarray]:
  """Bit arrays (uint8 0/1) of one field, header first."""
  arr = np.asarray(f.data)
  dtype = arr.dtype
  _check_width(dtype, f.width)
  flat = arr.reshape(-1)
  if f.count is not None:
    n = int(np.asarray(f.count))
    if not 0 <= n <= flat.size:
      raise ValueError(f"field count {n} outside [0, {flat.size}]")
    yield _value_bits(np.array([n], np.uint64), _bits.length_bits(flat.size))
    flat = flat[:n]
  for start in range(0, flat.size, _CHUNK):
    yield _value_bits(_to_unsigned(flat[start:start + _CHUNK], f.width), f.width)


def pack(payload: Any) -> bytes:
  """Serialize one (unbatched) message to bytes of length `ceil(total_bits / 8)`."""
  out: list[bytes] = []
  pending = np.zeros(0, np.uint8)
  for f in _bits.fields(payload):
    for chunk in _field_chunks(f):
      stream = np.concatenate([pending, chunk])
      whole = stream.size - stream.size % 8
      out.append(np.packbits(stream[:whole]).tobytes())
      pending = stream[whole:]
  if pending.size:
    out.append(np.packbits(pending).tobytes())  # zero-padded to a byte
  return b"".join(out)


def total_bits(payload: Any, batch_dims: int = 0) -> int:
  """Exact bits of a message (or the sum over `batch_dims` leading axes) as a Python int."""
  total = 0
  for f in _bits.fields(payload):
    shape = np.shape(f.data)
    size = int(np.prod(shape[batch_dims:], dtype=np.int64))
    n_msgs = int(np.prod(shape[:batch_dims], dtype=np.int64))
    if f.count is None:
      total += n_msgs * size * f.width
    else:
      counts = np.asarray(f.count, np.int64)
      total += int(counts.sum()) * f.width + n_msgs * _bits.length_bits(size)
  return total


class _Reader:
  """Sequential bit reader over a byte string."""

  def __init__(self, data: bytes):
    self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
    self.pos = 0

  def read(self, n: int, width: int) -> np.ndarray:
    end = self.pos + n * width
    if end > self.bits.size:
      raise ValueError(
          f"malformed message: needs at least {end} bits, got {self.bits.size}")
    weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64))
    out = np.empty(n, np.uint64)
    for start in range(0, n, _CHUNK):
      stop = min(n, start + _CHUNK)
      block = self.bits[self.pos + start * width:self.pos + stop * width]
      out[start:stop] = (block.reshape(-1, width).astype(np.uint64) * weights).sum(
          axis=1, dtype=np.uint64)
    self.pos = end
    return out


def _from_unsigned(vals: np.ndarray, dtype: np.dtype, width: int) -> np.ndarray:
  if dtype == np.bool_:
    if np.any(vals > 1):
      raise ValueError("malformed message: boolean field holds a value > 1")
    return vals.astype(np.bool_)
  if np.issubdtype(dtype, np.integer):
    if np.issubdtype(dtype, np.signedinteger):
      signed = vals.astype(np.int64)
      signed = np.where(signed >= (1 << (width - 1)), signed - (1 << width), signed)
      return signed.astype(dtype)
    return vals.astype(dtype)
  uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
  return vals.astype(uint).view(dtype)


def unpack(data: bytes, template: Any) -> Any:
  """Inverse of `pack`: rebuild a payload shaped like `template` from bytes.

  `template` is a payload (or `jax.eval_shape` of an encode) giving each field's shape,
  dtype, width and whether it is variable-length. Elements past a variable-length
  field's count are zero. Raises `ValueError` on malformed input (wrong length, count
  out of range, non-zero padding).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"unpack expects bytes, got {type(data).__name__}")
  reader = _Reader(bytes(data))
  leaves, treedef = jax.tree.flatten(template, is_leaf=_bits.is_field)
  out = []
  for f in leaves:
    if not isinstance(f, Field):
      raise TypeError("template leaves must be Field")
    shape, dtype = tuple(f.data.shape), np.dtype(f.data.dtype)
    _check_width(dtype, f.width)
    size = int(np.prod(shape, dtype=np.int64))
    count = None
    n = size
    if f.count is not None:
      n = int(reader.read(1, _bits.length_bits(size))[0])
      if n > size:
        raise ValueError(f"malformed message: field count {n} exceeds capacity {size}")
      count = np.int32(n)
    vals = _from_unsigned(reader.read(n, f.width), dtype, f.width)
    flat = np.zeros(size, dtype)
    flat[:n] = vals
    out.append(Field(flat.reshape(shape), f.width, count, f.source))
  expected = math.ceil(reader.pos / 8)
  if len(data) != expected:
    raise ValueError(
        f"malformed message: {len(data)} bytes given, the template needs {expected}")
  if np.any(reader.bits[reader.pos:]):
    raise ValueError("malformed message: non-zero padding bits")
  return jax.tree.unflatten(treedef, out)
