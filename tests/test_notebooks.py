"""The notebooks under ``notebooks/`` (jupytext percent-format scripts) run top to bottom on
tiny inputs and save their figures: each code cell is executed in order in one fresh
namespace, from ``notebooks/`` as Jupyter would start it, without a kernel."""

import csv
import json
import shutil
from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from retrieval.data import synthetic
from retrieval.data.video import read_frames
from retrieval.recipes import build_retriever, read_recipe

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "experiments" / "results"
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


def test_notebooks_are_jupytext_percent_scripts():
    names = {path.stem for path in NOTEBOOKS.glob("*.py")}
    assert names == {"methods_side_by_side", "results_plots", "order_blind_failure"}
    for name in names:
        notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
        kinds = {cell.cell_type for cell in notebook.cells}
        assert kinds == {"markdown", "code"}, name
        assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# "), name


def test_methods_side_by_side(monkeypatch):
    namespace = run_notebook("methods_side_by_side", monkeypatch, VTR_NB_FRAMES=2, VTR_NB_VIDEOS=2, VTR_NB_WORDS=8)
    rows = namespace["rows"]
    assert set(rows) == RECIPES
    assert {name for name, row in rows.items() if row["fusion_free"]} == {
        "meanpool", "seqtransf", "clip2video", "stan", "prompt_switch"}
    assert rows["meanpool"]["new_params"] == 0
    assert all(row["new_params"] > 0 for name, row in rows.items() if name != "meanpool")
    assert all(row["score"] == [3, 2] for row in rows.values())


def _with_intervals(source: Path, target: Path) -> None:
    """A one-seed compare CSV (the first row of each method) with ``_lo`` / ``_hi`` of its own
    beside every accuracy, as `vtr compare` writes them for one seed."""
    with open(source, newline="") as handle:
        rows = list({row["method"]: row for row in reversed(list(csv.DictReader(handle)))}.values())
    for row in rows:
        for metric in ("t2v_R@1", "static_R@1", "temporal_R@1", "temporal_pair_acc"):
            value = float(row[metric])
            row[f"{metric}_lo"], row[f"{metric}_hi"] = max(0.0, value - 4), min(100.0, value + 3)
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_results_plots(monkeypatch, tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "figures"
    results.mkdir()
    committed = sorted(RESULTS.glob("compare_*.csv")) + sorted(RESULTS.glob("latency_*.csv"))
    assert committed, "no committed compare/latency CSVs"
    for path in committed:
        shutil.copy(path, results)
    _with_intervals(min(RESULTS.glob("compare_*.csv")), results / "compare_with-ci.csv")
    namespace = run_notebook("results_plots", monkeypatch, VTR_NB_RESULTS=results, VTR_NOTEBOOK_OUT=out)
    expected = {f"{p.stem}_{kind}.png" for p in results.glob("compare_*.csv") for kind in ("accuracy", "tradeoff")}
    expected |= {f"{p.stem}.png" for p in results.glob("latency_*.csv")}
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in namespace["figures"]} == expected
    printed = capsys.readouterr().out
    assert "compare_with-ci.csv temporal_pair_acc: CI columns present; whiskers: 95 % bootstrap CI" in printed
    for path in results.glob("compare_cpu*.csv"):  # the committed one: three seeds, a row per seed
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        seeds = len({row["seed"] for row in rows}) if "seed" in rows[0] else 1
        if seeds > 1:
            assert f"{path.name} temporal_pair_acc: CI columns present; whiskers: ± std over {seeds} rows" in printed


def test_order_blind_failure(monkeypatch, tmp_path):
    namespace = run_notebook("order_blind_failure", monkeypatch, VTR_NB_SIZE=32, VTR_NB_CLIP_FRAMES=8,
                             VTR_NB_FRAMES=4, VTR_NOTEBOOK_OUT=tmp_path)
    results = namespace["results"]
    assert set(results) == RECIPES
    assert results["meanpool"]["order_blind"] and results["xpool"]["order_blind"]
    assert not any(results[name]["order_blind"] for name in ("seqtransf", "xclip", "clip2video", "prompt_switch"))
    assert {p.name for p in tmp_path.iterdir()} == {"order_blind_replace_frames.png", "order_blind_replace_margins.png"}
    # the pair the notebook renders is the one `generate` writes (test pair 4: 2 train + 2 val clips before it)
    root = synthetic.generate(tmp_path / "synthetic", num_train=2, num_val=2, num_test=10, size=32, num_frames=8,
                              progress=False)
    ids = ("video12", "video13")
    assert synthetic.pair_info(root)[ids[0]] == ("video13", "temporal", "replace")
    sentences = json.loads((root / "MSRVTT_data.json").read_text())["sentences"]
    assert [next(s["caption"] for s in sentences if s["video_id"] == i) for i in ids] == namespace["captions"]
    for video_id, rendered in zip(ids, (namespace["frames_a"], namespace["frames_b"])):
        decoded, _ = read_frames(root / "videos" / f"{video_id}.mp4", None)
        assert np.abs(decoded.astype(int) - rendered).mean() < 3  # libx264 at crf 18


def test_order_blind_failure_reads_compare_checkpoints(monkeypatch, tmp_path):
    """With VTR_NB_CHECKPOINTS (a `vtr compare --out` folder) a method's trained weights are scored."""
    retriever = build_retriever(read_recipe(ROOT / "experiments/model/meanpool.yaml")["model"]["retriever"],
                                {"backbone": "vtr-micro", "pretrained": None, "num_frames": 4, "max_words": 16})
    ckpt = tmp_path / "compare" / "meanpool" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"retriever.{k}": v for k, v in retriever.state_dict().items()},
                "hyper_parameters": {"retriever": retriever.config},
                "datamodule_hyper_parameters": {"frame_sampler": "vtr", "frame_segments": None}}, ckpt)
    namespace = run_notebook("order_blind_failure", monkeypatch, VTR_NB_SIZE=32, VTR_NB_CLIP_FRAMES=8,
                             VTR_NB_METHODS="meanpool", VTR_NB_CHECKPOINTS=tmp_path / "compare",
                             VTR_NB_TEMPLATE="recolour", VTR_NOTEBOOK_OUT=tmp_path / "figures")
    result = namespace["results"]["meanpool"]
    assert result["weights"] == "trained" and result["order_blind"]


def test_order_blind_failure_refuses_a_static_template(monkeypatch, tmp_path):
    with pytest.raises(AssertionError, match="'colour' is not a temporal template"):
        run_notebook("order_blind_failure", monkeypatch, VTR_NB_TEMPLATE="colour", VTR_NOTEBOOK_OUT=tmp_path)
