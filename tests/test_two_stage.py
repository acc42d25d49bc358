"""Two-stage retrieval (fusion-free recall, text-conditioned re-rank): its order against a
restatement, its two ends (k >= N is the re-ranker, k = 1 the recaller's top-1), and the tools
(index, search, latency) taking it like any method."""

from pathlib import Path

import pytest
import torch
import yaml
from fakes import random_tokens, random_videos

from retrieval.recipes import build_retriever, model_fingerprint, read_recipe
from retrieval.tools.index import build_index, load_index
from retrieval.tools.search import load_indexed_method, search
from retrieval.metrics import retrieval_metrics
from retrieval.two_stage import TwoStage, combine, join, split

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"backbone": "vtr-micro", "pretrained": None, "num_frames": 4}
N, Q, T = 13, 26, 4


def spec(k: int) -> dict:
    return {"class_path": "retrieval.two_stage.TwoStage",
            "init_args": {"k": k, "recaller": {"config": str(ROOT / "experiments/model/meanpool.yaml")},
                          "reranker": {"config": str(ROOT / "experiments/model/xclip.yaml")}}}


@pytest.fixture(scope="module")
def pair():
    model = build_retriever(spec(5), MICRO)
    frames, mask = random_videos(N, T, model.clip.image_size, torch.Generator().manual_seed(0))
    tokens = random_tokens(Q, model.max_words, torch.Generator().manual_seed(1))
    with torch.no_grad():
        video, text = model.encode_video(frames, mask), model.encode_text(tokens)
    caption_video = torch.arange(Q) % N
    return model, text, video, caption_video


def part_scores(model, text, video):
    (rt, rrt), (rv, rrv) = split(text), split(video)
    with torch.no_grad():
        return model.recaller.similarity(rt, rv), model.reranker.similarity(rrt, rrv)


def test_order_is_the_rerankers_inside_the_top_k_then_the_recallers(pair):
    model, text, video, _ = pair
    recall, rerank = part_scores(model, text, video)
    for k in (1, 3, 5, 12):
        model.k = k
        got = model.similarity(text, video).argsort(dim=1, descending=True)
        for q in range(Q):  # the rule, restated with Python sorts
            by_recall = sorted(range(N), key=lambda v: -recall[q, v].item())
            head = sorted(by_recall[:k], key=lambda v: -rerank[q, v].item())
            assert got[q].tolist() == head + by_recall[k:], (k, q)


def test_k_at_least_n_is_exactly_the_reranker(pair):
    model, text, video, caption_video = pair
    _, rerank = part_scores(model, text, video)
    for k in (N, N + 5):
        model.k = k
        two = model.similarity(text, video)
        assert torch.equal(two, rerank)
        assert model.evaluate(text, video, caption_video) == retrieval_metrics(rerank, caption_video)


def test_k_one_keeps_the_recallers_top_1_and_r_at_1(pair):
    model, text, video, caption_video = pair
    recall, _ = part_scores(model, text, video)
    model.k = 1
    two = model.similarity(text, video)
    assert torch.equal(two.argmax(dim=1), recall.argmax(dim=1))
    assert model.evaluate(text, video, caption_video)["t2v/R@1"] == retrieval_metrics(recall, caption_video)["t2v/R@1"]


def test_combine_puts_the_tail_below_every_reranked_score():
    recall = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0]])
    top = torch.tensor([[0, 3]])
    out = combine(recall.clone(), top, torch.tensor([[4.0]]), torch.tensor([[-7.0, -6.5]]))
    # re-ranked: video 3 (-6.5) above video 0 (-7); the tail (3, 2, 1) shifted by -7 - 1 - 4 = -12
    assert out.tolist() == [[-7.0, -11.0, -9.0, -6.5, -10.0]]


def test_refuses_a_text_conditioned_recaller_and_a_bad_k():
    xclip = build_retriever(read_recipe(ROOT / "experiments/model/xclip.yaml")["model"]["retriever"], MICRO)
    with pytest.raises(ValueError, match="recaller must be fusion-free"):
        TwoStage(xclip, xclip, 5)
    with pytest.raises(ValueError, match="k"):
        build_retriever({**spec(5), "init_args": {**spec(5)["init_args"], "k": 0}}, MICRO)
    with pytest.raises(ValueError, match="reranker"):
        build_retriever({"class_path": "retrieval.two_stage.TwoStage", "init_args": {"k": 3, "recaller": spec(3)}}, MICRO)


def test_join_and_split_round_trip(pair):
    video = pair[2]
    recall, rerank = split(video)
    assert list(join(recall, rerank)) == list(video)
    with pytest.raises(ValueError, match="not two-stage"):
        split(recall)


def test_rebuilt_from_its_config_with_checkpoints(pair, tmp_path):
    model = pair[0]
    for part in ("recaller", "reranker"):
        torch.save({"state_dict": {f"retriever.{k}": v for k, v in getattr(model, part).state_dict().items()}},
                   tmp_path / f"{part}.ckpt")
    config = spec(7)
    for part in ("recaller", "reranker"):
        config["init_args"][part]["ckpt"] = str(tmp_path / f"{part}.ckpt")
    built = build_retriever(config, MICRO, seed=3)  # another seed: the weights come from the checkpoints
    rebuilt = build_retriever(built.config)
    assert rebuilt.k == 7 and model_fingerprint(rebuilt) == model_fingerprint(built)
    assert model_fingerprint(built.recaller) == model_fingerprint(model.recaller)


def test_index_and_search_a_two_stage_retriever(tmp_path):
    recipe = tmp_path / "two_stage.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"retriever": spec(4)}}))
    data = [f"root={tmp_path / 'synthetic'}", "synthetic_num_train=2", "synthetic_num_val=2", "synthetic_num_test=10",
            "eval_batch_size=5", "num_frames=4"]
    out = build_index(recipe, tmp_path / "two.safetensors", data=data, overrides=MICRO)
    index = load_index(out)
    assert "recall.embedding" in index["features"] and any(k.startswith("rerank.") for k in index["features"])
    model = load_indexed_method(index)
    hits = search(index, ["a red square"], k=10, model=model)[0]
    assert len(hits) == 10 and len({v for v, _ in hits}) == 10
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)


def test_latency_times_a_two_stage_retriever(pair):
    from retrieval.bench.latency import BenchSettings, bench_method

    model = pair[0]
    model.k = 5
    rows = bench_method("two", {"model": {"retriever": spec(5)}}, model,
                        BenchSettings(galleries=(8, 40), batches=(1, 3), real_videos=4, offline_batch=4, repeats=2,
                                      warmup=1))
    assert [(r["gallery"], r["batch"]) for r in rows] == [(8, 1), (8, 3), (40, 1), (40, 3)]
    assert all(r["ms_per_query_median"] > 0 for r in rows)


@pytest.mark.parametrize("recipe", sorted((ROOT / "experiments/two_stage").glob("*.yaml")), ids=lambda p: p.stem)
def test_two_stage_recipes_build_their_pair(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # their parts name the model recipes from the repository root
    model = build_retriever(read_recipe(recipe)["model"]["retriever"], {"backbone": "vtr-micro", "pretrained": None})
    classes = {"clip2video": "CLIP2Video", "prompt_switch": "PromptSwitch", "xclip": "XCLIP", "glccl": "GLCCL"}
    recaller, reranker = recipe.stem.rsplit("_", 1)  # <recaller>_<reranker>.yaml
    assert isinstance(model, TwoStage) and model.k == 50
    assert type(model.recaller).__name__ == classes[recaller] and model.recaller.fusion_free
    assert type(model.reranker).__name__ == classes[reranker] and not model.reranker.fusion_free


def test_latency_rerank_k_times_a_two_stage_recipe_per_k_and_the_others_once(tmp_path, monkeypatch):
    import csv

    from retrieval.bench.latency import main as bench_main

    monkeypatch.chdir(ROOT)
    common = ["--backbone", "vtr-micro", "--gallery", "30", "--batch", "1", "--repeats", "2", "--warmup", "1",
              "--real-videos", "4", "--out", str(tmp_path)]
    bench_main(["bench", "latency", "--config", "experiments/two_stage/clip2video_xclip.yaml", "--rerank-k", "5", "20",
                "--config", "experiments/model/xclip.yaml", *common])  # the re-ranker alone: timed once
    (path,) = tmp_path.glob("*.csv")
    assert path.name.startswith("latency-two-stage_") and path.with_suffix(".png").is_file()  # ms/query against k
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["clip2video_xclip@k5", "clip2video_xclip@k20", "xclip"]
    assert all(float(r["ms_per_query_median"]) > 0 for r in rows)
    with pytest.raises(SystemExit, match="none of .'xclip.yaml'. is one"):
        bench_main(["bench", "latency", "--config", "experiments/model/xclip.yaml", "--rerank-k", "5", *common])


def test_int8_round_trip_error_is_at_most_half_a_step_per_vector():
    from retrieval.topk import dequantize, exact_topk, quantize, recall_at

    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(500, 1) * 10
    codes, scale = quantize(x, "int8")
    assert codes.dtype == torch.int8 and scale.shape == (500, 1)
    assert ((dequantize(codes, scale) - x).abs() <= scale / 2 + 1e-6).all()  # half of max|x_i| / 127
    assert torch.equal(codes.abs().amax(dim=1), torch.full((500,), 127, dtype=torch.int8))
    q = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    truth = (q @ x.T).topk(10, dim=1).indices  # the unchunked fp32 ranking
    assert torch.equal(exact_topk(q, x, None, 10, chunk=64)[1], truth)
    assert recall_at(exact_topk(q, codes, scale, 10, chunk=64)[1], truth) >= 80.0


def test_gallery_and_frontier_commands_run_on_tiny_sizes(tmp_path, monkeypatch):
    import csv as csv_module

    from retrieval.bench.latency import main as bench_main

    monkeypatch.chdir(tmp_path)
    bench_main(["bench", "gallery", "--gallery", "3000", "--dim", "16", "--batch", "1", "8", "--repeats", "2",
                "--kernel", "torch", "inductor"])
    (path,) = (tmp_path / "runs/bench").glob("gallery_*.csv")
    rows = list(csv_module.DictReader(open(path)))
    assert {(r["kernel"], r["store"], r["batch"]) for r in rows} == {
        (kernel, s, b) for kernel in ("torch", "inductor") for s in ("fp32", "bf16", "fp16", "int8") for b in "18"}
    assert all(float(r["ratio_to_floor"]) > 0 and float(r["compute_floor_ms"]) > 0 for r in rows)
    for r in rows:  # the roofline is the larger of the two floors; the paired ratios' spread is a range
        assert 0 < float(r["ratio_to_floor_p10"]) <= float(r["ratio_to_floor_p90"])
        larger = max(float(r["read_floor_ms"]), float(r["compute_floor_ms"]))
        assert float(r["ratio_to_roofline"]) == pytest.approx(float(r["ms_per_query_median"]) / larger, rel=1e-4)
    assert [float(r["recall_at_k"]) for r in rows if r["store"] == "fp32"] == [100.0] * 4


def test_gallery_rows_timed_on_a_busy_cpu_say_so(monkeypatch):
    from retrieval.bench import gallery

    monkeypatch.setattr(gallery.psutil, "cpu_count", lambda: 2)
    monkeypatch.setattr(gallery.psutil, "cpu_percent", lambda interval: 65.0)  # 1.3 of 2 cores busy elsewhere
    note = gallery.contention_note(torch.device("cpu"), 2)
    assert "load 1.3 on 2 cores with 2 threads" in note and "--threads 1" in note
    assert gallery.contention_note(torch.device("cpu"), 1) == ""  # one thread fits the idle core
    assert gallery.contention_note(torch.device("cuda"), 2) == ""
    monkeypatch.setattr(gallery.psutil, "cpu_percent", lambda interval: 10.0)
    assert gallery.contention_note(torch.device("cpu"), 2) == ""


def test_int8_search_with_a_last_chunk_of_few_rows_is_exact_on_its_codes():
    from retrieval.topk import dequantize, exact_topk, quantize

    x = torch.randn(70, 16, generator=torch.Generator().manual_seed(2))
    codes, scale = quantize(x, "int8")
    q = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    q_codes, q_scale = quantize(q, "int8")
    truth = (dequantize(q_codes, q_scale) @ dequantize(codes, scale).T).topk(5, dim=1)  # the same products, unchunked
    got = exact_topk(q, codes, scale, 5, chunk=64)  # chunks of 64 and 6 rows
    assert torch.equal(got[1], truth.indices) and torch.allclose(got[0], truth.values, rtol=1e-5)


def test_gallery_faiss_rows_flat_is_exact_and_approximate_ones_report_their_recall():
    pytest.importorskip("faiss")
    from retrieval.bench.gallery import bench_stores

    assert {r["index"] for r in bench_stores(500, 16, [1], ["fp32"], repeats=1, faiss_indexes=["ivf"])} == {
        "exact", "faiss-ivf"}  # only the indexes asked for are built (HNSW's build is slow at 1M)
    rows = bench_stores(2000, 16, [1, 4], ["fp32"], k=10, repeats=1, faiss_indexes=("flat", "ivf", "hnsw"))
    faiss_rows = {(r["index"], r["batch"]): r for r in rows if r["index"].startswith("faiss")}
    assert set(faiss_rows) == {(name, b) for name in ("faiss-flat", "faiss-ivf", "faiss-hnsw") for b in (1, 4)}
    assert all(faiss_rows["faiss-flat", b]["recall_at_k"] == 100.0 for b in (1, 4))  # exact inner product
    assert all(0 < r["recall_at_k"] <= 100 and r["ms_per_query_median"] > 0 for r in faiss_rows.values())
    assert "nlist=" in faiss_rows["faiss-ivf", 1]["params"] and faiss_rows["faiss-hnsw", 1]["kernel"] == "faiss"
