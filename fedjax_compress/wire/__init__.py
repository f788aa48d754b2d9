"""Real bytes for payloads: `pack`, `unpack`, `total_bits` (host-side NumPy).

`pack` frames the billed bit stream with `FRAME_BYTES` of magic, layout id, codec tag,
length and CRC-32 (framing, not billed by `bits.count`); `raw=True` gives the bare body.
"""

from fedjax_compress.wire._pack import (FRAME_BYTES, MAGIC, TEMP_BYTES, layout_id, pack,
                                        total_bits, unpack)

__all__ = ["pack", "unpack", "total_bits", "layout_id", "FRAME_BYTES", "MAGIC", "TEMP_BYTES"]
