"""``vtr compare --preset smoke``: every registered method trained, scored and timed end to end; several
seeds with their summary, the paired comparison with the reference, provenance and the plot."""

import csv
import itertools
import json
import statistics
from pathlib import Path

import pytest
import torch

from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.synthetic import dataset_checksum
from retrieval.metrics import bootstrap_ci, summarize
from retrieval.pretrain import backbone_checksum
from retrieval.tools import compare
from retrieval.tools.compare_plot import draw, spread
from retrieval.tools.compare_stats import (
    PAIRED,
    PER_QUERY_FILE,
    load_per_query,
    pooled_interval,
)

METHODS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "model"
ACCURACY = ("t2v_R@1", "t2v_R@5", "static_R@1", "temporal_R@1", "temporal_pair_acc")
FIRST_COLUMNS = ("method", "fusion_free", *ACCURACY, "ms_per_query_test", "ms_per_query_tiled", "offline_ms_per_video",
                 "train_minutes")


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
        assert reader.fieldnames[: len(FIRST_COLUMNS)] == list(FIRST_COLUMNS)  # the columns before seeds, in place
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
            for end in ("", "_lo", "_hi"):
                assert row[column + end] == pytest.approx(float(logged[f"test/{compare.LOGGED[column]}{end}"]), abs=1e-9)
            assert row[f"{column}_lo"] <= row[column] <= row[f"{column}_hi"]
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
        assert csv.DictReader(handle).fieldnames[len(compare.COLUMNS):] == [
            c + end for c in ("t2v+DSL_R@1", "v2t+DSL_R@1", "t2v+QB_R@1") for end in ("", "_lo", "_hi")]


def test_an_earlier_run_is_not_overwritten_unless_asked(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "run" / "results.csv").read_bytes()
    with pytest.raises(SystemExit):
        compare.main(["compare", "--preset", "smoke", "--out", str(out / "run"), "--methods-dir", str(METHODS_DIR)])
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "run" / "results.csv").read_bytes() == before


# ---------------------------------------------------------------- several seeds, summary, paired, provenance
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    mp = pytest.MonkeyPatch()
    mp.setenv("VTR_CACHE", str(out / "cache"))
    rows = compare.main(["compare", "--preset", "smoke", "--out", str(out / "run"), "--methods-dir", str(METHODS_DIR),
                         "--methods", "meanpool", "seqtransf", "--seeds", *map(str, SEEDS)])
    mp.undo()
    return out / "run", rows


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_seeds_give_one_row_per_method_and_seed_each_in_its_own_folder(seeds_run):
    run, _ = seeds_run
    table = read_csv(run / "results.csv")
    assert [(r["seed"], r["method"]) for r in table] == [(str(s), m) for s in SEEDS for m in ("meanpool", "seqtransf")]
    for row in table:
        folder = run / f"seed{row['seed']}" / row["method"]
        assert (folder / "checkpoints" / "best.ckpt").is_file() and (folder / "metrics.csv").is_file()
        per_query = load_per_query(folder / "checkpoints" / PER_QUERY_FILE)
        metrics = summarize(per_query)  # the saved per-query results are what the row reports
        for column in ACCURACY:
            for end in ("", "_lo", "_hi"):
                # the row holds what Lightning logged: float32
                assert float(row[column + end]) == pytest.approx(metrics[compare.LOGGED[column] + end], rel=1e-6, abs=1e-6)
    assert (run / "results.png").stat().st_size > 0


def test_each_seed_trains_as_a_one_seed_run_would(smoke_run, seeds_run):
    (_, single), (_, several) = smoke_run, seeds_run
    first = {r["method"]: r for r in single}
    for row in several:
        if row["seed"] == 0:
            assert {k: row[k] for k in ACCURACY} == {k: first[row["method"]][k] for k in ACCURACY}


def test_summary_is_the_mean_and_std_across_seeds_with_a_pooled_interval(seeds_run):
    run, rows = seeds_run
    summary = {r["method"]: r for r in read_csv(run / "summary.csv")}
    assert list(summary) == ["meanpool", "seqtransf"]
    for method, row in summary.items():
        assert row["seeds"] == " ".join(map(str, SEEDS))
        for column in ACCURACY:
            values = [r[column] for r in rows if r["method"] == method]
            assert float(row[column]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{column}_std"]) == pytest.approx(statistics.stdev(values))
            assert float(row[f"{column}_lo"]) <= float(row[column]) <= float(row[f"{column}_hi"])


def test_one_seed_summary_interval_is_the_logged_one(smoke_run):
    out, rows = smoke_run
    summary = {r["method"]: r for r in read_csv(out / "run" / "summary.csv")}
    for row in rows:
        for column in ACCURACY:
            assert float(summary[row["method"]][column]) == pytest.approx(row[column])
            assert summary[row["method"]][f"{column}_std"] == ""
            for end in ("_lo", "_hi"):
                assert float(summary[row["method"]][column + end]) == pytest.approx(row[column + end], rel=1e-6, abs=1e-6)


def test_paired_rows_compare_each_method_with_the_reference_per_seed_and_pooled(seeds_run):
    run, rows = seeds_run
    paired = read_csv(run / "paired.csv")
    by_seed = {(r["seed"], r["method"]): r for r in rows}
    assert {(r["method"], r["reference"], r["metric"], r["seed"]) for r in paired} == {
        ("seqtransf", "meanpool", metric, str(seed)) for metric in PAIRED for seed in (*SEEDS, "all")}
    for row in paired:
        low, difference, high = float(row["lo"]), float(row["difference"]), float(row["hi"])
        assert low <= difference <= high
        assert row["excludes_zero"] == ("yes" if low > 0 or high < 0 else "no")
        seeds = SEEDS if row["seed"] == "all" else (int(row["seed"]),)
        gaps = [by_seed[s, "seqtransf"][row["metric"]] - by_seed[s, "meanpool"][row["metric"]] for s in seeds]
        assert difference == pytest.approx(statistics.fmean(gaps))


def test_paired_only_reads_a_finished_run_against_another_reference(seeds_run):
    """``--paired-only``: no training, the saved per-query results against another reference;
    swapping method and reference negates every difference."""
    run, _ = seeds_run
    compare.main(["compare", "--out", str(run), "--paired-only", "--reference", "seqtransf"])
    swapped = {(r["metric"], r["seed"]): r for r in read_csv(run / "paired_seqtransf.csv")}
    for row in read_csv(run / "paired.csv"):
        other = swapped[row["metric"], row["seed"]]
        assert (other["method"], other["reference"]) == ("meanpool", "seqtransf")
        assert float(other["difference"]) == pytest.approx(-float(row["difference"]))
        assert float(other["lo"]) <= float(other["difference"]) <= float(other["hi"])
    with pytest.raises(ValueError, match="not among"):
        compare.main(["compare", "--out", str(run), "--paired-only", "--reference", "xclip"])


def test_provenance_records_versions_cpu_threads_and_checksums(seeds_run):
    run, _ = seeds_run
    record = json.loads((run / "provenance.json").read_text())
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert record["device"].startswith("cpu-") and record["seeds"] == list(SEEDS)
    assert record["backbone"]["checksum"] == backbone_checksum(record["backbone"]["path"])
    assert set(record["data"]) == {str(s) for s in SEEDS}
    assert record["data"]["0"]["checksum"] != record["data"]["1"]["checksum"]  # each seed its own data
    assert record["data"]["0"]["checksum"] == dataset_checksum(record["data"]["0"]["root"])


def test_a_seeds_run_is_not_overwritten_unless_asked_and_bad_seeds_are_refused(seeds_run, capsys):
    run, _ = seeds_run
    before = {name: (run / name).read_bytes() for name in ("results.csv", "summary.csv", "paired.csv")}
    common = ["compare", "--preset", "smoke", "--methods-dir", str(METHODS_DIR), "--methods", "meanpool", "seqtransf",
              "--out", str(run)]
    for extra, message in ((["--seeds", "0", "1"], "--overwrite"), (["--seed", "0", "--seeds", "0", "1"], "not both"),
                           (["--seeds", "1", "1"], "repeats"), (["--seeds", "0", "--reference", "xclip"], "--reference")):
        with pytest.raises(SystemExit):
            compare.main([*common, *extra])
        assert message in capsys.readouterr().err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_pooled_interval_of_one_seed_is_the_metric_interval():
    hits = 100.0 * (torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    mean, low, high = pooled_interval([hits])
    assert (low, high) == bootstrap_ci(hits) and mean == pytest.approx(hits.mean().item())
    other = 100.0 * (torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.6).double()
    mean, low, high = pooled_interval([hits, other])
    assert mean == pytest.approx((hits.mean() + other.mean()).item() / 2) and low < mean < high


def test_plot_labels_never_overlap():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    summary = [{"method": f"method_{i}", "fusion_free": i % 2 == 0, "ms_per_query_tiled": 1.0 + 0.01 * i,
                "temporal_pair_acc": 50.0 + 0.1 * i, "temporal_pair_acc_lo": 45.0, "temporal_pair_acc_hi": 56.0,
                "temporal_pair_acc_std": 1.0} for i in range(9)]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    fig.subplots_adjust(right=0.7)
    labels = draw(ax, summary)
    fig.canvas.draw()
    boxes = [Text.get_window_extent(label) for label in labels]  # the text alone, without its leader line
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


@pytest.mark.parametrize("wanted", [[5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 100.0], [99.0, 99.5, 100.0], [30.0, 10.0, 20.0]])
def test_spread_keeps_order_gap_and_bounds(wanted):
    placed = spread(wanted, gap=4.0, low=0.0, high=100.0)
    ordered = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    assert all(placed[b] - placed[a] >= 4.0 - 1e-9 for a, b in itertools.pairwise(ordered))
    assert all(0.0 <= p <= 100.0 for p in placed)
    if wanted == [30.0, 10.0, 20.0]:
        assert placed == wanted  # far enough apart already: left where they are
