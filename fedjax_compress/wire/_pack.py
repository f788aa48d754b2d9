"""Host-side packing of payloads to real bytes (NumPy; never traced).

Body (what `bits.count` bills, exactly): the payload's `Field` leaves in pytree order,
concatenated as one bit stream (most significant bit first). Each element takes exactly
`width` bits: floats are sent as their IEEE bit pattern (width must equal the dtype's
bits), integers as `width`-bit unsigned or two's-complement values, bools as 0/1. A
variable-length field starts with a `length_bits(capacity)`-bit header holding its count.
Only the end of the stream is padded with zero bits to a whole byte:
`len(body) == ceil(total_bits(p) / 8)`.

Frame (framing outside the reported bits, like a transport's headers; `raw=True` omits it),
`FRAME_BYTES = 24` bytes around the body, integers big-endian:

  ====== ===== ==========================================================================
  offset bytes field
  ====== ===== ==========================================================================
  0      4     magic `b"FJW1"` (format version 1)
  4      4     layout id: CRC-32 of the template's layout (`layout_id`)
  8      4     codec tag: CRC-32 of the `codec=` string, 0 without one
  12     8     body length in bits (`total_bits`)
  20     n     body, `n = ceil(bits / 8)`
  20+n   4     CRC-32 of bytes `[0, 20 + n)`
  ====== ===== ==========================================================================

So a receiver rejects (`ValueError`) a corrupted message (CRC-32 detects every error burst
of up to 32 bits, hence every single-bit flip), a message of another layout (another
codec's payload, another model's shapes) and, with `codec=`, another codec of the same
layout. Lengths are checked against the header and the template before anything is
allocated. A CRC is an integrity check against accidents, not an authenticator.

Memory, at any message size: `pack` writes into one preallocated buffer of the output's
size (copied once into the returned `bytes`), and `unpack` reads its input in place and
allocates only the decoded arrays; besides those (and the host copy of each field's data,
one field at a time), both use at most `TEMP_BYTES` (16 MiB) of temporaries.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src.base import Field

MAGIC = b"FJW1"
FRAME_BYTES = 24
"""Bytes of framing `pack` adds around the body (not billed by `bits.count`)."""
_HEAD = 20  # magic, layout id, codec tag, body bits
_CHUNK = 1 << 16  # elements processed at a time, bounds temporary memory
TEMP_BYTES = _CHUNK * 256
"""Bound on `pack`/`unpack` temporaries besides the output and one field's host copy."""


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


def _check_count(f: Field, size: int) -> int:
  n = int(np.asarray(f.count))
  if not 0 <= n <= size:
    raise ValueError(f"field count {n} outside [0, {size}] (the field's capacity)")
  return n


class _Writer:
  """Sequential bit writer into a preallocated bytearray (no intermediate copies)."""

  def __init__(self, out: bytearray, start: int):
    self.out = out
    self.byte = start  # next whole byte to write
    self.pending = np.zeros(0, np.uint8)  # < 8 bits not yet written

  def write(self, vals: np.ndarray, width: int) -> None:
    """Append `width`-bit unsigned values (uint64) in chunks of `_CHUNK`."""
    for s in range(0, vals.size, _CHUNK):
      v = vals[s:s + _CHUNK]
      if not self.pending.size and width % 8 == 0:  # byte-aligned fast path
        raw = v.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width // 8:]
        self._put(raw.tobytes())
        continue
      bits = np.unpackbits(v.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
      stream = np.concatenate([self.pending, bits[:, 64 - width:].ravel()])
      whole = stream.size - stream.size % 8
      self._put(np.packbits(stream[:whole]).tobytes())
      self.pending = stream[whole:]

  def _put(self, data: bytes) -> None:
    self.out[self.byte:self.byte + len(data)] = data
    self.byte += len(data)

  def flush(self) -> None:
    if self.pending.size:
      self._put(np.packbits(self.pending).tobytes())  # zero-padded to a byte
      self.pending = np.zeros(0, np.uint8)


class _Reader:
  """Sequential bit reader over a read-only buffer, reading in place chunk by chunk."""

  def __init__(self, buf: np.ndarray, nbits: int):
    self.buf = buf  # uint8 view of the body
    self.nbits = nbits
    self.pos = 0

  def read(self, n: int, width: int) -> np.ndarray:
    end = self.pos + n * width
    if end > self.nbits:
      raise ValueError(f"malformed message: needs at least {end} bits, got {self.nbits}")
    out = np.empty(n, np.uint64)
    for s in range(0, n, _CHUNK):
      cnt = min(n, s + _CHUNK) - s
      p0 = self.pos + s * width
      b0, off = divmod(p0, 8)
      if off == 0 and width % 8 == 0:  # byte-aligned fast path
        raw = self.buf[b0:b0 + cnt * width // 8].reshape(cnt, width // 8)
        wide = np.zeros((cnt, 8), np.uint8)
        wide[:, 8 - width // 8:] = raw
      else:
        b1 = (p0 + cnt * width + 7) // 8
        bits = np.unpackbits(self.buf[b0:b1])[off:off + cnt * width].reshape(cnt, width)
        wide = np.packbits(np.pad(bits, ((0, 0), (64 - width, 0))), axis=1)
      out[s:s + cnt] = wide.view(">u8").ravel()
    self.pos = end
    return out


def layout_id(template: Any) -> int:
  """CRC-32 of a payload's layout: tree structure, and per field shape, dtype, width,
  whether it is variable-length, and its `source` stamps (the encoded updates' shapes)."""
  leaves, treedef = jax.tree.flatten(template, is_leaf=_bits.is_field)
  parts = [repr(treedef)]
  for f in leaves:
    if not isinstance(f, Field):
      raise TypeError(f"template leaves must be Field, got {type(f).__name__}")
    parts.append(f"{tuple(np.shape(f.data))}|{np.dtype(f.data.dtype).name}|{f.width}|"
                 f"{f.count is not None}|{f.source!r}")
  return zlib.crc32("\n".join(parts).encode())


def _codec_tag(codec: Any) -> int:
  if codec is None:
    return 0
  if not isinstance(codec, str) or not codec:
    raise ValueError(f"codec must be a non-empty str naming the compressor, got {codec!r}")
  return zlib.crc32(codec.encode()) or 1


def pack(payload: Any, *, codec: str | None = None, raw: bool = False) -> bytes:
  """Serialize one (unbatched) message: `FRAME_BYTES + ceil(total_bits / 8)` bytes.

  `codec` (optional) names the compressor configuration; `unpack` with another name then
  rejects the message. `raw=True` returns the body alone (exactly the billed bits, no
  integrity check). Raises `ValueError` for counts outside a field's capacity, values that
  do not fit their width, or float widths other than the dtype's.
  """
  tag = _codec_tag(codec)
  fields = _bits.fields(payload)
  for f in fields:
    _check_width(np.dtype(f.data.dtype), f.width)
  nbits = total_bits(payload)  # validates counts before any allocation
  start = 0 if raw else _HEAD
  out = bytearray(start + (nbits + 7) // 8 + (0 if raw else 4))
  writer = _Writer(out, start)
  for f in fields:
    flat = np.asarray(f.data).reshape(-1)
    if f.count is not None:
      n = _check_count(f, flat.size)
      writer.write(np.array([n], np.uint64), _bits.length_bits(flat.size))
      flat = flat[:n]
    for s in range(0, flat.size, _CHUNK):
      writer.write(_to_unsigned(flat[s:s + _CHUNK], f.width), f.width)
  writer.flush()
  if raw:
    return bytes(out)
  out[:_HEAD] = (MAGIC + layout_id(payload).to_bytes(4, "big") + tag.to_bytes(4, "big")
                 + nbits.to_bytes(8, "big"))
  out[-4:] = zlib.crc32(memoryview(out)[:-4]).to_bytes(4, "big")
  return bytes(out)


def total_bits(payload: Any, batch_dims: int = 0) -> int:
  """Exact bits of a message (or the sum over `batch_dims` leading axes) as a Python int.

  The body only (`bits.count`); `pack`'s frame adds `8 * FRAME_BYTES`. Counts outside
  a field's capacity raise `ValueError`, as in `bits.count` and `pack`.
  """
  total = 0
  for f in _bits.fields(payload):
    shape = np.shape(f.data)
    size = int(np.prod(shape[batch_dims:], dtype=np.int64))
    n_msgs = int(np.prod(shape[:batch_dims], dtype=np.int64))
    if f.count is None:
      total += n_msgs * size * f.width
    else:
      counts = np.asarray(f.count, np.int64)
      if counts.size and (counts.min() < 0 or counts.max() > size):
        bad = counts.min() if counts.min() < 0 else counts.max()
        raise ValueError(f"field count {bad} outside [0, {size}] (the field's capacity)")
      total += int(counts.sum()) * f.width + n_msgs * _bits.length_bits(size)
  return total


def _bit_range(leaves: list) -> tuple[int, int]:
  """Smallest and largest body bits of a message with these template fields."""
  lo = hi = 0
  for f in leaves:
    size = int(np.prod(np.shape(f.data), dtype=np.int64))
    if f.count is None:
      lo, hi = lo + size * f.width, hi + size * f.width
    else:
      lo, hi = lo + _bits.length_bits(size), hi + _bits.max_field_bits(f)
  return lo, hi


def _template_fields(template: Any) -> tuple[list, Any]:
  leaves, treedef = jax.tree.flatten(template, is_leaf=_bits.is_field)
  for f in leaves:
    if not isinstance(f, Field):
      raise TypeError(f"template leaves must be Field, got {type(f).__name__}")
    _check_width(np.dtype(f.data.dtype), f.width)
  return leaves, treedef


def unpack(data: bytes, template: Any, *, codec: str | None = None, raw: bool = False) -> Any:
  """Inverse of `pack`: rebuild a payload shaped like `template` from bytes.

  `template` is a payload (or `jax.eval_shape` of an encode) giving each field's shape,
  dtype, width and whether it is variable-length; `codec` must be what `pack` was given.
  Elements past a variable-length field's count are zero. Raises `ValueError` on
  malformed input, before allocating anything for it: wrong magic, a length that
  disagrees with the header or the template, a CRC mismatch (corruption), another
  layout or codec tag, counts out of range, non-zero padding.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"unpack expects bytes, got {type(data).__name__}")
  leaves, treedef = _template_fields(template)
  tag = _codec_tag(codec)
  buf = np.frombuffer(data, np.uint8)  # a view, no copy
  lo, hi = _bit_range(leaves)
  if raw:
    if not (lo + 7) // 8 <= buf.size <= (hi + 7) // 8:
      raise ValueError(f"malformed message: {buf.size} bytes given, the template needs "
                       f"{(lo + 7) // 8} to {(hi + 7) // 8}")
    body, nbits = buf, 8 * buf.size
  else:
    if buf.size < FRAME_BYTES or bytes(buf[:4]) != MAGIC:
      raise ValueError("malformed message: not a fedjax_compress wire message "
                       f"(bad magic or {buf.size} < {FRAME_BYTES} bytes)")
    nbits = int.from_bytes(bytes(buf[12:20]), "big")
    if not lo <= nbits <= hi:
      raise ValueError(f"malformed message: header says {nbits} bits, the template needs "
                       f"{lo} to {hi} (corrupted, or another codec's message)")
    if buf.size != FRAME_BYTES + (nbits + 7) // 8:
      raise ValueError(f"malformed message: {buf.size} bytes given, its header needs "
                       f"{FRAME_BYTES + (nbits + 7) // 8}")
    if zlib.crc32(buf[:-4]) != int.from_bytes(bytes(buf[-4:]), "big"):
      raise ValueError("corrupted message: CRC-32 mismatch")
    if int.from_bytes(bytes(buf[4:8]), "big") != layout_id(template):
      raise ValueError("message layout differs from the template's (another codec's or "
                       "another model's message)")
    if int.from_bytes(bytes(buf[8:12]), "big") != tag:
      raise ValueError(f"message codec tag differs from codec={codec!r}'s "
                       "(packed for another compressor)")
    body = buf[_HEAD:-4]
  reader = _Reader(body, nbits)
  out = []
  for f in leaves:
    shape, dtype = tuple(f.data.shape), np.dtype(f.data.dtype)
    size = int(np.prod(shape, dtype=np.int64))
    count, n = None, size
    if f.count is not None:
      n = int(reader.read(1, _bits.length_bits(size))[0])
      if n > size:
        raise ValueError(f"malformed message: field count {n} exceeds capacity {size}")
      count = np.int32(n)
    flat = np.zeros(size, dtype)
    for s in range(0, n, _CHUNK):
      cnt = min(n, s + _CHUNK) - s
      flat[s:s + cnt] = _from_unsigned(reader.read(cnt, f.width), dtype, f.width)
    out.append(Field(flat.reshape(shape), f.width, count, f.source))
  used = (reader.pos + 7) // 8
  if raw and body.size != used:
    raise ValueError(f"malformed message: {body.size} bytes given, the template needs {used}")
  if not raw and reader.pos != nbits:
    raise ValueError(f"malformed message: header says {nbits} bits, the fields hold "
                     f"{reader.pos}")
  if reader.pos % 8 and body[used - 1] & ((1 << (8 - reader.pos % 8)) - 1):
    raise ValueError("malformed message: non-zero padding bits")
  return jax.tree.unflatten(treedef, out)
