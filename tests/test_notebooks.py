"""Execute notebooks/quickstart.ipynb headless (as nbmake does in CI) with small settings."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.setenv("QUICKSTART_ROUNDS", "12")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError on any failing cell (incl. its asserts)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "uplink bits" in text and "QSGD" in text
  assert not any(o.get("output_type") == "error" for c in nb.cells
                 if c.cell_type == "code" for o in c.get("outputs", []))
