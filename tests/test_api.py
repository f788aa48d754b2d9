"""Public API: every name in each public `__all__` exists and is documented."""

import importlib
import inspect

import pytest

PUBLIC = ["fedjax_compress", "fedjax_compress.compressors", "fedjax_compress.bits",
          "fedjax_compress.wire", "fedjax_compress.testing"]
OPTIONAL = ["fedjax_compress.ops", "fedjax_compress.federated", "fedjax_compress.data",
            "fedjax_compress.models"]


def _modules():
  out = list(PUBLIC)
  for name in OPTIONAL:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if hasattr(module, "__all__"):
      out.append(name)
  return out


def _names():
  return [(m, n) for m in _modules() for n in importlib.import_module(m).__all__]


@pytest.mark.parametrize("module", _modules())
def test_all_is_a_unique_list_and_module_documented(module):
  mod = importlib.import_module(module)
  assert isinstance(mod.__all__, (list, tuple))
  assert len(set(mod.__all__)) == len(mod.__all__), "duplicate names in __all__"
  assert (mod.__doc__ or "").strip(), f"{module} has no module docstring"


@pytest.mark.parametrize("module,name", _names(), ids=lambda x: str(x))
def test_public_name_exists_and_is_documented(module, name):
  obj = getattr(importlib.import_module(module), name)  # AttributeError if missing
  if not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)):
    return  # constants (REGISTRY, ...) carry no docstring of their own
  doc = obj.__doc__ or ""
  assert doc.strip(), f"{module}.{name} has no docstring"
  if inspect.isclass(obj):
    # NamedTuple / dataclass auto-docs look like "Name(field, ...)": not a real docstring.
    assert not doc.startswith(f"{obj.__name__}("), f"{module}.{name} has only an auto docstring"


def test_top_level_reexports_are_the_same_objects():
  import fedjax_compress as fc
  from fedjax_compress._src import adapters, base, combinators, keys
  assert fc.Compressor is base.Compressor and fc.Keys is base.Keys and fc.Field is base.Field
  assert fc.as_transformation is adapters.as_transformation
  assert fc.error_feedback is combinators.error_feedback
  assert fc.round_keys is keys.round_keys
