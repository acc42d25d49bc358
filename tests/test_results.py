"""`vtr results`: finished runs (fit/test folders, compare folders) into one table, seeds averaged,
intervals kept, checkpoints selected on test refused; and the tools' wandb logging (rank 0, offline)."""

import csv
import json
from pathlib import Path
from statistics import fmean, stdev

import pytest
import torch
import yaml

from retrieval.selection import TEST_RESULTS, selected_by
from retrieval.tools import results
from retrieval.tools.wandb_log import log_tables

SEQ = "baselines.clip4clip.SeqTransf"


def _checkpoint(path: Path, monitor: str | None) -> Path:
    """A checkpoint holding only the callback states a ModelCheckpoint saves in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {str(path): torch.tensor(1.0)} if monitor else {}
    torch.save({"callbacks": {f"ModelCheckpoint{{'monitor': {monitor!r}}}": {
        "monitor": monitor, "best_model_path": str(path) if monitor else "", "best_k_models": kept,
        "dirpath": str(path.parent)}}}, path)
    return path


def _metrics(r1: float, pair: float | None = None, post: str | None = None) -> dict[str, float]:
    out = {"test/t2v/R@1": r1, "test/t2v/R@1_lo": r1 - 4, "test/t2v/R@1_hi": r1 + 4, "test/t2v_R1": r1,
           "test/v2t/R@1": r1 + 1, "test/t2v/MdR": 3.0}
    if pair is not None:
        out.update({"test/temporal/pair_acc": pair, "test/temporal/pair_acc_lo": pair - 6,
                    "test/temporal/pair_acc_hi": pair + 6})
    if post:
        out.update({f"test/t2v+{post}/R@1": r1 + 2, f"test/t2v+{post}/R@1_lo": r1 - 2, f"test/t2v+{post}/R@1_hi": r1 + 6})
    return out


def _run(folder: Path, metrics: dict | None, seed: int = 0, method: str = SEQ, name: str = "lightning_logs",
         monitor: str | None = "val/t2v_R1", callbacks: list | None = None, tested: str = "best.ckpt",
         marker: bool = True) -> Path:
    """A `vtr fit --test_after_fit` / `vtr test` run folder as the CLI leaves it."""
    ckpt = _checkpoint(folder / "checkpoints" / tested, monitor)
    config = {"seed_everything": seed, "model": {"retriever": {"class_path": method, "init_args": {}}},
              "data": {"dataset": "synthetic"}, "ckpt_path": None if marker else str(ckpt),
              "trainer": {"callbacks": callbacks,
                          "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": name}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if marker and metrics is not None:
        mark = {"checkpoint": str(ckpt), "monitor": selected_by(ckpt), "seed": seed, "metrics": metrics}
        (folder / TEST_RESULTS).write_text(json.dumps(mark))
    elif metrics is not None:  # a CSVLogger metrics.csv: a validation row, then the test row
        keys = ["epoch", "step", "val/t2v/R@1", *metrics]
        with open(folder / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows([{"epoch": 0, "step": 1, "val/t2v/R@1": 5.0}, {"epoch": 0, "step": 1, **metrics}])
    return folder


def _compare(folder: Path) -> Path:
    """A `vtr compare --seeds 0 1 --dsl` folder: per-seed rows, CI columns, its best.ckpt per method."""
    folder.mkdir(parents=True)
    rows = [{"method": "meanpool", "seed": s, "fusion_free": True, "t2v_R@1": r, "t2v_R@1_lo": r - 3, "t2v_R@1_hi": r + 3,
             "temporal_pair_acc": p, "t2v+DSL_R@1": r + 1, "ms_per_query_test": 0.1}
            for s, r, p in ((0, 30.0, 50.0), (1, 34.0, 52.0))]
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _checkpoint(folder / "meanpool" / "checkpoints" / "best.ckpt", "val/t2v_R1")
    return folder


def test_runs_and_compare_folders_make_one_table_with_seed_spread_and_intervals(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep / "seed_everything=0,lr=0.1" / "version_0", None)  # interrupted: no test metrics
    _run(sweep / "seed_everything=0,lr=0.1" / "version_1", _metrics(40.0, 70.0, post="DSL"), name="seed_everything=0,lr=0.1")
    _run(sweep / "seed_everything=1,lr=0.1" / "version_0", _metrics(44.0, 74.0, post="DSL"), seed=1,
         name="seed_everything=1,lr=0.1")
    _run(tmp_path / "tests" / "version_0", _metrics(20.0), method="baselines.xclip.XCLIP", marker=False)  # metrics.csv only
    _run(tmp_path / "last" / "version_0", _metrics(99.0), method="baselines.xpool.XPool", monitor=None, tested="last.ckpt")
    _compare(tmp_path / "compare")

    out = tmp_path / "table"
    rows = results.main(["results", str(tmp_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "left out" in printed and "last.ckpt" in printed and "version_0: no test metrics" in printed
    by = {(r["method"], r["variant"], r["post"]): r for r in rows}
    assert set(by) == {("SeqTransf", "lr=0.1", ""), ("SeqTransf", "lr=0.1", "DSL"), ("XCLIP", "", ""),
                       ("meanpool", "", ""), ("meanpool", "", "DSL")}  # XPool tested last.ckpt: left out
    seq = by[("SeqTransf", "lr=0.1", "")]
    assert seq["seeds"] == "0 1" and seq["dataset"] == "synthetic"
    r1 = seq["cells"]["R@1"]
    assert (r1["mean"], r1["std"], r1["lo"], r1["hi"], r1["n"]) == (42.0, stdev([40.0, 44.0]), 38.0, 46.0, 2)
    assert seq["cells"]["pair acc"]["mean"] == fmean([70.0, 74.0]) and seq["cells"]["v2t R@1"]["mean"] == 43.0
    assert set(by[("SeqTransf", "lr=0.1", "DSL")]["cells"]) == {"R@1"}  # the post row: its own R@1 only
    assert by[("SeqTransf", "lr=0.1", "DSL")]["cells"]["R@1"]["lo"] == 40.0  # the mean of 38 and 42
    assert by[("XCLIP", "", "")]["cells"]["R@1"]["std"] is None  # one seed: no spread
    compare = by[("meanpool", "", "")]["cells"]
    assert (compare["R@1"]["mean"], compare["R@1"]["lo"], compare["pair acc"]["lo"]) == (32.0, 29.0, None)

    table = (out / "table.md").read_text()
    assert "| SeqTransf | lr=0.1 | synthetic |  | 0 1 | 42.0 ± 2.8 [38.0, 46.0] |" in table
    assert "mean of the per-seed bounds" in table
    with open(out / "table.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert float(written[0]["R@1_lo"]) == 38.0 and written[0]["R@1_n"] == "2"
    with open(out / "runs.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 5  # 2 sweep seeds, the test run, 2 compare seeds
    assert (out / "table.png").stat().st_size > 0

    with pytest.raises(SystemExit, match="--overwrite"):
        results.main(["results", str(tmp_path), "--out", str(out)])
    results.main(["results", str(tmp_path), "--out", str(out), "--overwrite"])


def test_a_run_selected_on_test_is_refused(tmp_path):
    on_test = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "test/t2v/R@1"}}]
    run = _run(tmp_path / "a" / "version_0", _metrics(50.0), callbacks=on_test)
    with pytest.raises(SystemExit, match=rf"{run}: its ModelCheckpoint monitored 'test/t2v/R@1' \(config.yaml\)"):
        results.main(["results", str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    run = _run(tmp_path / "b" / "version_0", _metrics(50.0), monitor="test/temporal/pair_acc")  # the checkpoint says so
    with pytest.raises(SystemExit, match=rf"{run}: its ModelCheckpoint monitored 'test/temporal/pair_acc'"):
        results.main(["results", str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    compare = _compare(tmp_path / "c")
    _checkpoint(compare / "xclip" / "checkpoints" / "best.ckpt", "test/t2v_R1")
    with pytest.raises(SystemExit, match="monitored 'test/t2v_R1'"):
        results.main(["results", str(compare), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_two_runs_claiming_one_seed_are_an_error(tmp_path):
    _run(tmp_path / "a", _metrics(10.0))
    _run(tmp_path / "b", _metrics(12.0))
    with pytest.raises(SystemExit, match="are both SeqTransf on synthetic with seed 0"):
        results.main(["results", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no finished runs"):
        results.main(["results", str(tmp_path / "a" / "checkpoints"), "--out", str(tmp_path / "out")])


def test_tool_tables_go_to_wandb_offline_and_from_rank_zero_only(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.utilities import rank_zero_only

    image = tmp_path / "plot.png"
    results.plot([{"method": "m", "variant": "", "dataset": "d", "post": "",
                   "cells": {"R@1": {"mean": 1.0, "lo": 0.0, "hi": 2.0, "values": [1.0]}}}], image)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("a rank other than 0 started a wandb run"))
    assert log_tables("results-x", {"results/table": [{"a": 1}]}, {"results/plot": image}) is None
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = log_tables("results-x", {"results/table": [{"method": "m", "R@1": 1.0}]}, {"results/plot": image},
                        directory=tmp_path / "w")
    run = Path(folder).parent
    assert run.name.startswith("offline-run-") and run.parent == tmp_path / "w" / "wandb"
    assert list(run.glob("files/media/table/results/table_*.table.json"))
    assert list(run.glob("files/media/images/results/plot_*.png"))
