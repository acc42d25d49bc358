"""``vtr bench frontier`` end to end on a two-method ``vtr compare --preset smoke`` folder: its
two ends are the methods' own accuracy (from compare's table and from a by-hand ranking), the
two-stage rows obey what recall-then-re-rank implies, and the CSV/plot are keyed and written."""

import csv
from pathlib import Path

import pytest
import torch

from retrieval.recipes import build_retriever, read_checkpoint, read_recipe
from retrieval.tools import compare
from retrieval.bench.frontier import COLUMNS, ROW_KEY
from retrieval.bench.frontier import test_features as encode_test_split  # (not a test)
from retrieval.bench.latency import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
METHODS_DIR = ROOT / "experiments" / "model"
RECALLER, RERANKER = "meanpool", "xclip"
TILED = 60


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    mp = pytest.MonkeyPatch()
    mp.setenv("VTR_CACHE", str(out / "cache"))
    compare.main(["compare", "--preset", "smoke", "--out", str(out / "compare"), "--methods-dir", str(METHODS_DIR),
                  "--methods", RECALLER, RERANKER])
    bench_main(["bench", "frontier", "--compare-dir", str(out / "compare"), "--recallers", RECALLER,
                "--rerankers", RERANKER, "-k", "1", "5", "1000", "--gallery", str(TILED), "--repeats", "2",
                "--max-seconds-per-point", "1", "--out", str(out / "bench")])
    mp.undo()
    (path,) = (out / "bench").glob("frontier_*.csv")
    with open(path) as handle:
        reader = csv.DictReader(handle)
        fields, rows = tuple(reader.fieldnames), list(reader)
    with open(out / "compare" / "results.csv") as handle:
        table = {r["method"]: r for r in csv.DictReader(handle)}
    return out, path, fields, rows, table


def by_hand(out: Path, method: str) -> dict[str, float]:
    """R@1, R@5 (%) of the checkpoint's similarity on its test split, ranks counted by hand."""
    payload = read_checkpoint(out / "compare" / method / "checkpoints" / "best.ckpt")
    recipe = read_recipe(METHODS_DIR / f"{method}.yaml")["model"]["retriever"]
    saved = payload["hyper_parameters"]["retriever"]["init_args"]
    model = build_retriever({**recipe, "init_args": {**recipe["init_args"], **saved}},
                            {"pretrained": None}, out / "compare" / method / "checkpoints" / "best.ckpt")
    text, video, caption_video, _ = encode_test_split(model, payload["datamodule_hyper_parameters"])
    with torch.no_grad():
        sim = model.similarity(text, video)
    ranks = [(sim[q] > sim[q, caption_video[q]]).sum().item() for q in range(len(sim))]  # videos above the truth
    return {f"t2v_R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5)}


def column(rows, name, **key):
    return {float(r[name]) for r in rows if all(r[k] == str(v) for k, v in key.items())}


def test_rows_are_keyed_by_pair_k_and_gallery(frontier):
    _, path, fields, rows, _ = frontier
    assert fields == COLUMNS
    assert len({tuple(r[k] for k in ROW_KEY) for r in rows}) == len(rows)
    n_test = compare.PRESETS["smoke"].num_test
    # k = 0: the recaller alone; k = N: the re-ranker alone; k = 1000 >= the test size: left out
    expected = {(RECALLER, RERANKER, str(k), str(n)) for n in (n_test, TILED) for k in (0, 1, 5, n)}
    assert {(r["recaller"], r["reranker"], r["k"], r["gallery"]) for r in rows} == expected
    assert all(float(r["ms_per_query_median"]) > 0 and r["batch"] == "1" for r in rows)
    assert path.with_suffix(".png").stat().st_size > 0


def one(values: set[float]) -> float:
    assert len(values) == 1, values  # the same accuracy at every gallery size
    return values.pop()


def test_the_ends_are_the_methods_own_accuracy(frontier):
    out, _, _, rows, table = frontier
    ends = {RECALLER: [r for r in rows if r["k"] == "0"], RERANKER: [r for r in rows if r["k"] == r["gallery"]]}
    for method, end in ends.items():
        hand = by_hand(out, method)
        for metric in ("t2v_R@1", "t2v_R@5"):
            got = one({float(r[metric]) for r in end})
            assert got == pytest.approx(hand[metric], abs=1e-3), (method, metric)
            assert got == pytest.approx(float(table[method][metric]), abs=1e-3), (method, metric)
        pair = one({float(r["temporal_pair_acc"]) for r in end})
        assert pair == pytest.approx(float(table[method]["temporal_pair_acc"]), abs=1e-3)
    # the re-ranker's R@5 differs from the recaller's here, so the two ends cannot be swapped unseen
    assert by_hand(out, RECALLER)["t2v_R@5"] != by_hand(out, RERANKER)["t2v_R@5"]


def test_two_stage_keeps_the_recallers_top_k_set(frontier):
    # re-ranking reorders the recaller's top k without changing that set: R@k is the recaller's
    _, _, _, rows, _ = frontier
    assert column(rows, "t2v_R@1", k=1) == column(rows, "t2v_R@1", k=0)
    assert column(rows, "t2v_R@5", k=5) == column(rows, "t2v_R@5", k=0)


def test_a_method_missing_from_the_compare_folder_is_named(frontier, tmp_path):
    out = frontier[0]
    with pytest.raises(FileNotFoundError, match="--compare-dir .*glccl"):
        bench_main(["bench", "frontier", "--compare-dir", str(out / "compare"), "--recallers", RECALLER,
                    "--rerankers", "glccl", "--gallery", "--out", str(tmp_path)])
