"""analysis/ablation_report.ipynb runs top to bottom against a real experiment."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "analysis" / "ablation_report.ipynb"


def test_notebook_executes_against_the_smoke_experiment(smoke_experiment: Path, tmp_path: Path,
                                                        monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("AVN_EXPERIMENT", str(smoke_experiment))
    monkeypatch.setenv("AVN_ANALYSIS_OUT", str(tmp_path / "out"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "| **unet** |" in text and "reference row 'unet'" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert (tmp_path / "out" / "summary.md").is_file()
    assert os.environ["AVN_EXPERIMENT"] == str(smoke_experiment)
