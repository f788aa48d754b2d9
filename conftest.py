"""Test configuration shared by tests/ and the doctests: 4 fake CPU devices, strict ranks."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
