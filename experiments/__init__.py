"""Experiment scripts for fedjax_compress (ml_collections configs + absl flags)."""
