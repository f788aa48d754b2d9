"""Testing utilities: the compressor registry and reusable conformance checks."""

from fedjax_compress.testing._registry import REGISTRY, Entry, by_name

__all__ = ["REGISTRY", "Entry", "by_name"]
