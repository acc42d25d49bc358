"""``vtr index`` / ``vtr search`` round trip on a tiny generated synthetic test split; the
fingerprint that ties an index to its weights; opening a shared index or checkpoint runs no code."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from retrieval.recipes import build_retriever, load_weights, model_fingerprint, tokenize
from retrieval.tools.index import build_index, load_index, main
from retrieval.tools.search import load_indexed_method, search
from retrieval.tools.search import main as search_main
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
    out = tmp_path_factory.mktemp("index") / "meanpool.safetensors"
    return build_index(MEANPOOL, out, data=data, overrides=MICRO)


def test_index_holds_every_test_video_once(meanpool_index):
    index = load_index(meanpool_index)
    assert len(index["video_ids"]) == len(set(index["video_ids"])) == NUM_TEST
    assert index["features"]["embedding"].shape == (NUM_TEST, 64)
    assert index["class_path"] == "baselines.clip4clip.MeanPool" and index["fusion_free"]
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
    # fusion-free: retrieval.topk's exact search, the same order and logits as score + sort
    order = expected.argsort(descending=True).tolist()
    assert ids == [index["video_ids"][i] for i in order]
    torch.testing.assert_close(torch.tensor(scores), expected[order], rtol=1e-5, atol=1e-5)


def test_search_refuses_other_weights(meanpool_index, tmp_path):
    other = build_retriever({"class_path": "baselines.clip4clip.MeanPool", "init_args": MICRO}, seed=1)
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, ckpt)
    with pytest.raises(ValueError, match="does not hold the weights"):
        load_indexed_method(load_index(meanpool_index), ckpt=str(ckpt))
    torch.save({"state_dict": load_indexed_method(load_index(meanpool_index)).state_dict()}, ckpt)
    assert load_indexed_method(load_index(meanpool_index), ckpt=str(ckpt)) is not None


def test_index_from_a_checkpoint_alone(meanpool_index, data, tmp_path):
    """``vtr index --ckpt`` needs no recipe: the retriever and the data settings saved in a
    RetrievalModule checkpoint rebuild the same index."""
    model = load_indexed_method(load_index(meanpool_index))
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in data)}
    ckpt = tmp_path / "module.ckpt"
    torch.save({"state_dict": {f"retriever.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"retriever": model.config, "optim": {}, "eval_chunk_size": None},
                "datamodule_hyper_parameters": {"dataset": "synthetic", **settings}}, ckpt)
    out = build_index(None, tmp_path / "from-ckpt.safetensors", ckpt=str(ckpt))
    index, expected = load_index(out), load_index(meanpool_index)
    assert index["video_ids"] == expected["video_ids"] and index["fingerprint"] == expected["fingerprint"]
    torch.testing.assert_close(index["features"]["embedding"], expected["features"]["embedding"])
    with pytest.raises(ValueError, match="--ckpt"):
        build_index(None, tmp_path / "nothing.safetensors")


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
    recipe.write_text(yaml.safe_dump({"model": {"retriever": {"class_path": "test_bench.FrameMaxScorer", "init_args": MICRO}}}))
    out = tmp_path / "framemax.safetensors"
    main(["index", "--config", str(recipe), "--ckpt", "none", "--out", str(out), "--data", *data])
    index = load_index(out)
    assert index["features"]["frames"].shape == (NUM_TEST, 4, 64) and not index["fusion_free"]
    search_main(["search", "--index", str(out), "-k", "3", "a big red square", "a small red square"])
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split()[1] for line in lines if line.startswith("  ")]
    assert len(ranked) == 6 and set(ranked) <= set(index["video_ids"])
    with pytest.raises(SystemExit, match="fusion-free"):
        search_main(["search", "--index", str(out), "--faiss", "a big red square"])


def test_faiss_matches_torch(meanpool_index):
    pytest.importorskip("faiss")
    index = load_index(meanpool_index)
    model = load_indexed_method(index)
    query = ["a yellow square is replaced by a red square"]
    (exact,), (flat,) = search(index, query, 5, model), search(index, query, 5, model, use_faiss=True)
    assert [h[0] for h in flat] == [h[0] for h in exact]
    assert [h[1] for h in flat] == pytest.approx([h[1] for h in exact], rel=1e-4)


# ---------------------------------------------------------------------- the fingerprint
def _micro_meanpool(seed: int = 0):
    return build_retriever({"class_path": "baselines.clip4clip.MeanPool", "init_args": MICRO}, seed=seed)


def test_fingerprint_changes_with_every_single_state_dict_tensor():
    model = _micro_meanpool()
    base = model_fingerprint(model)
    assert base.startswith("sha256:") and base == model_fingerprint(_micro_meanpool())  # same build, same hash
    state = model.state_dict()
    assert len(state) > 50
    unchanged = []
    with torch.no_grad():
        for name, tensor in state.items():  # views of the model's own tensors
            flat = tensor.view(-1)
            old = flat[0].clone()
            flat[0] = old + 1 if old.isfinite() else 0
            if model_fingerprint(model) == base:
                unchanged.append(name)
            flat[0] = old
    assert unchanged == []
    assert model_fingerprint(model) == base


def test_fingerprint_sees_weights_whose_sum_is_unchanged():
    """The old fingerprint, a sum of parameters, took two checkpoints with moved weights for one."""
    model = _micro_meanpool()
    base = model_fingerprint(model)
    with torch.no_grad():
        weight = model.clip.token_embedding.weight
        total = weight.double().sum()
        weight.copy_(weight.flip(0))  # the same numbers in other rows: scores change, the sum does not
        assert weight.double().sum() == total
        assert model_fingerprint(model) != base


def test_fingerprint_covers_the_recipe():
    same_weights = build_retriever({"class_path": "baselines.clip4clip.MeanPool",
                                    "init_args": {**MICRO, "num_frames": 7}}, seed=0)
    assert same_weights.state_dict().keys() == _micro_meanpool().state_dict().keys()
    assert model_fingerprint(same_weights) != model_fingerprint(_micro_meanpool())


@pytest.mark.parametrize("name", ["clip.logit_scale", "last"])
def test_search_refuses_a_checkpoint_that_differs_in_one_tensor(meanpool_index, tmp_path, name):
    index = load_index(meanpool_index)
    state = load_indexed_method(index).state_dict()
    name = list(state)[-1] if name == "last" else name
    state[name] = state[name] + 1e-3
    ckpt = tmp_path / "one_tensor_changed.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ValueError, match="does not hold the weights"):
        load_indexed_method(index, ckpt=str(ckpt))


# ---------------------------------------------------------------------- the index's checkpoint path
def test_search_from_another_folder_finds_the_indexs_checkpoint(tmp_path, data, monkeypatch, capsys):
    (tmp_path / "lab").mkdir()
    torch.save({"state_dict": _micro_meanpool(seed=3).state_dict()}, tmp_path / "lab" / "model.ckpt")
    monkeypatch.chdir(tmp_path / "lab")
    main(["index", "--config", str(MEANPOOL), "--backbone", "vtr-micro", "--ckpt", "model.ckpt",
          "--out", "out/index.safetensors", "--data", *data])
    index = load_index("out/index.safetensors")
    assert index["ckpt"] == os.path.join("..", "model.ckpt")
    assert index["ckpt_absolute"] == str(tmp_path / "lab" / "model.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    search_main(["search", "--index", str(tmp_path / "lab" / "out" / "index.safetensors"), "-k", "2", "a big red square"])
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]) == 2
    (tmp_path / "lab").rename(tmp_path / "moved")  # index and checkpoint moved together: found beside the index
    assert load_indexed_method(load_index(tmp_path / "moved" / "out" / "index.safetensors")) is not None
    (tmp_path / "moved" / "model.ckpt").unlink()
    with pytest.raises(SystemExit, match="neither at .*model.ckpt.* nor at .*model.ckpt.*pass it with --ckpt"):
        search_main(["search", "--index", str(tmp_path / "moved" / "out" / "index.safetensors"), "a big red square"])


# ---------------------------------------------------------------------- no code runs on load
class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: a file that would run code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickled_index_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "shared.safetensors"
    torch.save({"video_ids": ["v"], "features": {"embedding": torch.zeros(1, 4)}, "class_path": "x", "init_args": {},
                "payload": _WritesMarker(marker)}, evil)
    with pytest.raises(ValueError, match="is not a vtr index: not a safetensors file.*never unpickled"):
        load_index(evil)
    with pytest.raises(SystemExit, match="is not a vtr index"):
        search_main(["search", "--index", str(evil), "a big red square"])
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump(_WritesMarker(marker), handle)
    with pytest.raises(ValueError, match="not a vtr index"):
        load_index(tmp_path / "plain.pkl")
    assert not marker.exists()
    save_file({"weight": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="weights.safetensors is not a vtr index .*format None"):
        load_index(tmp_path / "weights.safetensors")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, meanpool_index):
    marker = tmp_path / "ran"
    state = _micro_meanpool().state_dict()
    evil = tmp_path / "shared.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"x": _WritesMarker(marker)}}, evil)
    with pytest.raises(ValueError, match=r"shared.ckpt refused: .*could run code \(Unsupported global: .*open"):
        load_weights(_micro_meanpool(), evil)
    with pytest.raises(SystemExit, match="refused"):
        search_main(["search", "--index", str(meanpool_index), "--ckpt", str(evil), "a big red square"])
    assert not marker.exists()
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.ckpt refused: .*\(Unsupported operand"):
        load_weights(_micro_meanpool(), tmp_path / "text.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.ckpt is not a torch.save file"):
        load_weights(_micro_meanpool(), tmp_path / "empty.ckpt")


def test_an_interrupted_index_leaves_the_old_one_whole(meanpool_index, data, monkeypatch):
    before = meanpool_index.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an ind")
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval.tools.index.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(MEANPOOL, meanpool_index, data=data, overrides=MICRO, overwrite=True)
    assert meanpool_index.read_bytes() == before
    assert [p.name for p in meanpool_index.parent.iterdir()] == [meanpool_index.name]  # no temporary file left
