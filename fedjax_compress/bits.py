"""Exact bit accounting derived from payload `Field`s (in-graph int32 per message)."""

from fedjax_compress._src.bits import count, dense_bits, field_bits, fields, index_bits, length_bits

__all__ = ["count", "field_bits", "fields", "length_bits", "index_bits", "dense_bits"]
