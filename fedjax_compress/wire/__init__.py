"""Real bytes for payloads: `pack`, `unpack`, `total_bits` (host-side NumPy)."""

from fedjax_compress.wire._pack import pack, total_bits, unpack

__all__ = ["pack", "unpack", "total_bits"]
