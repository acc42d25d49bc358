"""The notebooks under ``notebooks/`` (jupytext percent-format scripts) run top to bottom on
tiny inputs and save their figures: each code cell is executed in order in one fresh
namespace, from ``notebooks/`` as Jupyter would start it, without a kernel."""

from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RECIPES = {path.stem for path in (ROOT / "experiments" / "model").glob("*.yaml")}


def run_notebook(name: str, monkeypatch, **env) -> dict:
    """Execute ``notebooks/<name>.py`` cell by cell; returns the namespace it leaves."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.chdir(NOTEBOOKS)
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert notebook.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    namespace = {"__name__": "__main__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from a second thread on a loaded CPU
    try:
        for i, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                exec(compile(cell.source, f"notebooks/{name}.py [cell {i}]", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
    return namespace


def test_methods_side_by_side(monkeypatch):
    namespace = run_notebook("methods_side_by_side", monkeypatch, VTR_NB_FRAMES=2, VTR_NB_VIDEOS=2, VTR_NB_WORDS=8)
    rows = namespace["rows"]
    assert set(rows) == RECIPES
    assert {name for name, row in rows.items() if row["fusion_free"]} == {
        "meanpool", "seqtransf", "clip2video", "stan", "prompt_switch"}
    assert rows["meanpool"]["new_params"] == 0
    assert all(row["new_params"] > 0 for name, row in rows.items() if name != "meanpool")
    assert all(row["score"] == [3, 2] for row in rows.values())


