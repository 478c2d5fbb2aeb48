"""experiments/quickstart.ipynb runs top to bottom (the digits default on this CPU), every cell's
own checks included."""

import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      "commit the notebook without outputs")
  monkeypatch.setenv("MLN_QUICKSTART_WORKDIR", str(tmp_path / "workdir"))
  client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError, naming the cell, where one fails
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.outputs)
  assert "best-by-meta test accuracy" in outputs and "most suspicious labels are wrong" in outputs
  images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 4  # accuracy, soft labels, confusion, the gallery
  assert (tmp_path / "workdir" / "metalabelnet" / "label_issues.csv").exists()
