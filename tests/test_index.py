"""``vtr index`` / ``vtr search`` round trip on a tiny generated synthetic test split."""

from pathlib import Path

import pytest
import torch
import yaml

from retrieval.bench import build_method, tokenize
from retrieval.bench.index import build_index, load_index, load_indexed_method, main, search
from retrieval.features import VideoFeatures

ROOT = Path(__file__).resolve().parents[1]
MEANPOOL = ROOT / "experiments/model/meanpool.yaml"
MICRO = {"backbone": "vtr-micro", "pretrained": None}
NUM_TEST = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("index") / "synthetic"
    return [f"root={root}", "synthetic_num_train=2", "synthetic_num_val=2", f"synthetic_num_test={NUM_TEST}",
            "eval_batch_size=5", "eval_num_frames=4"]


@pytest.fixture(scope="module")
def meanpool_index(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("index") / "meanpool.pt"
    return build_index(MEANPOOL, out, data=data, overrides=MICRO)


def test_index_holds_every_test_video_once(meanpool_index):
    index = load_index(meanpool_index)
    assert len(index["video_ids"]) == len(set(index["video_ids"])) == NUM_TEST
    assert index["features"]["embedding"].shape == (NUM_TEST, 64)
    assert index["class_path"] == "baselines.clip4clip.MeanPool" and index["offline"]
    assert index["init_args"]["backbone"] == "vtr-micro" and index["ckpt"] is None


def test_search_ranks_the_whole_gallery_with_the_methods_score(meanpool_index):
    index = load_index(meanpool_index)
    model = load_indexed_method(index)
    (hits,) = search(index, ["a cyan triangle moves left"], k=100, model=model)
    ids, scores = [h[0] for h in hits], [h[1] for h in hits]
    assert sorted(ids) == sorted(index["video_ids"])  # k clamped at N: a permutation
    assert scores == sorted(scores, reverse=True)
    with torch.inference_mode():
        text = model.encode_text(tokenize(model, ["a cyan triangle moves left"]))
        expected = model.score(text, VideoFeatures(**index["features"]))[0]
    assert scores[0] == pytest.approx(expected.max().item(), rel=1e-5)
    assert ids[0] == index["video_ids"][int(expected.argmax())]


def test_search_refuses_other_weights(meanpool_index, tmp_path):
    other = build_method({"class_path": "baselines.clip4clip.MeanPool", "init_args": MICRO}, seed=1)
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, ckpt)
    with pytest.raises(ValueError, match="does not hold the weights"):
        load_indexed_method(load_index(meanpool_index), ckpt=str(ckpt))
    torch.save({"state_dict": load_indexed_method(load_index(meanpool_index)).state_dict()}, ckpt)
    assert load_indexed_method(load_index(meanpool_index), ckpt=str(ckpt)) is not None


def test_index_refuses_to_overwrite(meanpool_index, data):
    stamp = meanpool_index.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(MEANPOOL, meanpool_index, data=data, overrides=MICRO)
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["index", "--config", str(MEANPOOL), "--backbone", "vtr-micro", "--out", str(meanpool_index),
              "--data", *data])
    assert meanpool_index.stat().st_mtime_ns == stamp


def test_text_conditioned_index_and_search_commands(tmp_path, data, capsys):
    recipe = tmp_path / "framemax.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"class_path": "test_bench.FrameMaxScorer", "init_args": MICRO}}))
    out = tmp_path / "framemax.pt"
    main(["index", "--config", str(recipe), "--ckpt", "none", "--out", str(out), "--data", *data])
    index = load_index(out)
    assert index["features"]["frames"].shape == (NUM_TEST, 4, 64) and not index["offline"]
    main(["search", "--index", str(out), "-k", "3", "a big red square", "a small red square"])
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split()[1] for line in lines if line.startswith("  ")]
    assert len(ranked) == 6 and set(ranked) <= set(index["video_ids"])
    with pytest.raises(SystemExit, match="fusion-free"):
        main(["search", "--index", str(out), "--faiss", "a big red square"])


def test_faiss_matches_torch(meanpool_index):
    pytest.importorskip("faiss")
    index = load_index(meanpool_index)
    model = load_indexed_method(index)
    query = ["a yellow square is replaced by a red square"]
    (exact,), (flat,) = search(index, query, 5, model), search(index, query, 5, model, use_faiss=True)
    assert [h[0] for h in flat] == [h[0] for h in exact]
    assert [h[1] for h in flat] == pytest.approx([h[1] for h in exact], rel=1e-4)
