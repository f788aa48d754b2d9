"""Test configuration shared by tests/ and the doctests: 4 fake CPU devices, strict ranks."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import pathlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

_SLOW_LIST = pathlib.Path(__file__).parent / "tests" / "slow_tests.txt"


def _slow_ids() -> set[str]:
  """Node ids listed in tests/slow_tests.txt (measured >= 3 s each on 2 cores)."""
  lines = _SLOW_LIST.read_text().splitlines() if _SLOW_LIST.exists() else []
  return {l.strip() for l in lines if l.strip() and not l.startswith("#")}


def pytest_collection_modifyitems(config, items):
  """Mark the listed tests `slow`; warn about listed ids whose file was collected but not them."""
  del config
  ids = _slow_ids()
  seen = set()
  for item in items:
    if item.nodeid in ids:
      item.add_marker(pytest.mark.slow)
      seen.add(item.nodeid)
  files = {item.nodeid.split("::")[0] for item in items}
  stale = sorted(i for i in ids - seen if i.split("::")[0] in files)
  if stale:
    warnings.warn(f"tests/slow_tests.txt names {len(stale)} test(s) not collected: {stale[:5]}")
