"""The lab as a notebook: notebooks/first_image_classifier.ipynb runs from top to bottom."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "first_image_classifier.ipynb"
FINAL = re.compile(r"Final test accuracy: (\d+\.\d+)% after (\d+) epoch")


def outputs(nb, kind: str) -> list[str]:
    """Every text (kind="text") or PNG (kind="png") output of the notebook, in order."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("output_type") == "stream":
                found.append(out["text"])
            elif kind == "png" and "image/png" in out.get("data", {}):
                found.append(out["data"]["image/png"])
    return found


def test_saved_notebook_carries_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    text = "".join(outputs(nb, "text"))
    accuracy, epochs = FINAL.search(text).groups()
    assert int(epochs) == 5 and float(accuracy) >= 97.0
    assert "the reloaded model gives the same predictions: True" in text
    assert len(outputs(nb, "png")) >= 10


@pytest.mark.slow
def test_notebook_executes_end_to_end(tmp_path, data_root, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("MNISTLAB_NB_EPOCHS", "1")
    monkeypatch.setenv("MNISTLAB_DATA", str(data_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two threads on a busy 2-core box crawl
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises CellExecutionError on the first failing cell
    text = "".join(outputs(nb, "text"))
    accuracy, epochs = FINAL.search(text).groups()
    assert int(epochs) == 1
    assert float(accuracy) >= 95.0  # the lab: 96.0% after one epoch
    assert "Epoch 1/1:" in text and "Step 938/938" in text
    assert "the reloaded model gives the same predictions: True" in text
    # mnistlab.plots keeps the kernel's inline backend: every figure is shown in the notebook.
    assert len(outputs(nb, "png")) >= 10
    assert list(tmp_path.iterdir()) == []  # it leaves nothing behind in its folder
