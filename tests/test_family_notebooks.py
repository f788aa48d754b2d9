"""Execute the per-family notebooks (notebooks/make_notebooks.py) headless with small settings.

Each notebook ends its plots with `assert` cells on the behaviour it shows, so a failing
cell (raised as `CellExecutionError`) means the compressor's behaviour changed.
"""

import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
FAMILIES = ("fastfood_igc", "m22", "lbgm", "laq", "hsq_baselines")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_notebook_executes(name, monkeypatch):
  monkeypatch.setenv("FAMILY_NB_ROUNDS", "10")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  path = NOTEBOOKS / f"{name}.ipynb"
  nb = nbformat.read(str(path), as_version=4)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert any("assert " in c.source for c in code_cells), "each notebook checks its behaviour"
  assert not any(c.get("outputs") for c in code_cells), "commit notebooks without outputs"
  start = time.time()
  nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  print(f"{name}: {time.time() - start:.1f}s")
  assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


def test_generator_matches_committed_notebooks():
  """The committed .ipynb files are what `make_notebooks.py` writes (no hand edits drift)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for name in FAMILIES:
    built = mod.build(name)
    committed = nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)
    assert [c.source for c in built.cells] == [c.source for c in committed.cells], name
