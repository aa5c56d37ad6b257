"""notebooks/specialization.ipynb: stored without outputs, and runs end to end on a checkpoint."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_eval import train_tiny_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "specialization.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_runs_on_a_checkpoint_and_draws_the_pyramids_tables_tau_sweep_and_reliability(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    run_dir = train_tiny_checkpoint(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("SFSEG_CKPT", str(run_dir / "checkpoints" / "last.ckpt"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and the traceback, if any cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 5  # the pyramids of a few images, Table 9, Fig. 3, the tau trade-off, reliability
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "L=4 levels" in printed and "labels needed" in printed and "unity level1" in printed
    assert "fuse rule of the model: hard" in printed and "oracle fuse" in printed and "rule soft" in printed
    assert "labels per image  <- the model's tau" in printed  # the tau sweep includes the model's own
    first_cell = next(cell for cell in notebook.cells if cell.cell_type == "code")
    shown = [
        output["data"]["text/plain"]
        for output in first_cell.outputs
        if output.output_type == "execute_result"
    ]
    assert shown and str(run_dir) in shown[0]  # it studied the checkpoint SFSEG_CKPT named
