"""Exact bit accounting derived from payload `Field`s (`Bits`: exact at any message size)."""

from fedjax_compress._src.bits import (Bits, count, dense_bits, field_bits, fields, index_bits,
                                       length_bits)

__all__ = ["Bits", "count", "field_bits", "fields", "length_bits", "index_bits", "dense_bits"]
