"""``vtr compare --preset smoke``: every registered method trained, scored and timed end to end."""

import csv
from pathlib import Path

import pytest

from retrieval.tools import compare
from retrieval.data.datamodule import VideoTextDataModule

METHODS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "model"
ACCURACY = ("t2v_R@1", "t2v_R@5", "static_R@1", "temporal_R@1", "temporal_pair_acc")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    mp.setenv("VTR_CACHE", str(out / "cache"))
    rows = compare.main(["compare", "--preset", "smoke", "--out", str(out / "run"), "--methods-dir", str(METHODS_DIR)])
    mp.undo()
    return out, rows


def test_smoke_runs_every_method_and_writes_the_table(smoke_run):
    out, rows = smoke_run
    recipes = sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))
    assert [r["method"] for r in rows] == recipes
    with open(out / "run" / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == compare.COLUMNS
        table = list(reader)
    assert len(table) == len(recipes)
    assert (out / "run" / "results.png").stat().st_size > 0
    flags = {r["method"]: r["fusion_free"] for r in rows}
    assert flags["meanpool"] is True and flags.get("xpool", False) is False
    for row in rows:
        assert row["ms_per_query_test"] > 0 and row["ms_per_query_tiled"] > 0 and row["offline_ms_per_video"] > 0


def test_accuracies_are_the_logged_test_metrics_in_whole_queries(smoke_run, monkeypatch):
    out, rows = smoke_run
    monkeypatch.setenv("VTR_CACHE", str(out / "cache"))
    preset = compare.PRESETS["smoke"]
    data = VideoTextDataModule(dataset="synthetic", synthetic_num_train=preset.num_train,
                               synthetic_num_val=preset.num_val, synthetic_num_test=preset.num_test)
    data.setup("test")
    test = data.eval_annotations("test")
    kind, paired = test["caption_kind"], test["video_partner"][test["caption_video"]] >= 0
    queries = {"t2v_R@1": len(kind), "t2v_R@5": len(kind), "static_R@1": int((kind == 0).sum()),
               "temporal_R@1": int((kind == 1).sum()), "temporal_pair_acc": int(((kind == 1) & paired).sum())}
    assert min(queries.values()) > 0
    for row in rows:
        with open(out / "run" / row["method"] / "metrics.csv") as handle:
            logged = [r for r in csv.DictReader(handle) if r["test/t2v/R@1"]][-1]
        for column in ACCURACY:
            assert row[column] == pytest.approx(float(logged[f"test/{compare.LOGGED[column]}"]), abs=1e-9)
            hits = row[column] * queries[column] / 100  # a percentage of whole queries
            assert hits == pytest.approx(round(hits), abs=1e-6), (row["method"], column, row[column])


def test_same_seed_same_accuracy_table(smoke_run, tmp_path, monkeypatch):
    out, rows = smoke_run
    monkeypatch.setenv("VTR_CACHE", str(out / "cache"))
    again = compare.main(["compare", "--preset", "smoke", "--out", str(tmp_path), "--methods-dir", str(METHODS_DIR),
                          "--methods", "meanpool", "seqtransf", "--dsl", "--qb-norm", "--querybank-size", "50"])
    first = {r["method"]: r for r in rows}
    for row in again:  # DSL and QB-Norm add their own columns and leave the plain ones as they were
        assert {k: row[k] for k in ACCURACY} == {k: first[row["method"]][k] for k in ACCURACY}
        assert all(0.0 <= row[k] <= 100.0 for k in ("t2v+DSL_R@1", "v2t+DSL_R@1", "t2v+QB_R@1"))
    with open(tmp_path / "results.csv") as handle:
        assert csv.DictReader(handle).fieldnames[-3:] == ["t2v+DSL_R@1", "v2t+DSL_R@1", "t2v+QB_R@1"]


def test_an_earlier_run_is_not_overwritten_unless_asked(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "run" / "results.csv").read_bytes()
    with pytest.raises(SystemExit):
        compare.main(["compare", "--preset", "smoke", "--out", str(out / "run"), "--methods-dir", str(METHODS_DIR)])
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "run" / "results.csv").read_bytes() == before
