"""The timing primitives, floors, result files and ``vtr bench`` / ``vtr sweep`` commands."""

import csv
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

import retrieval
from baselines.clip4clip import MeanPool
from retrieval.recipes import build_retriever, read_recipe, tokenize
from retrieval.tools import sweep
from retrieval.bench import floors
from retrieval.bench.floors import scorer_floor
from retrieval.bench.gallery import gallery_from
from retrieval.bench.latency import CAPTIONS, BenchSettings, bench_method
from retrieval.bench.latency import main as bench_main
from retrieval.bench.meters import LiveTensorBytes, MatmulTime
from retrieval.bench.results import merge_rows, plot_latency, result_filename
from retrieval.bench.timing import encode_videos, time_offline, time_online
from retrieval.features import TextFeatures, VideoFeatures

ROOT = Path(__file__).resolve().parents[1]
MEANPOOL = ROOT / "experiments/model/meanpool.yaml"
MICRO = {"backbone": "vtr-micro", "pretrained": None}
T = 4


class FrameMaxScorer(MeanPool):
    """A text-conditioned test double: a query scores a video by its best frame (T*D MACs per pair)."""

    fusion_free = False

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        x = self.frame_features(frames, frame_mask)  # [B, T, D]
        return VideoFeatures(frames=x / x.norm(dim=-1, keepdim=True))

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        per_frame = torch.einsum("qd,ntd->qnt", text.embedding, video.frames)  # [Q, N, T]
        return self.logit_scale() * per_frame.amax(dim=-1)


@pytest.fixture(scope="module")
def model():
    return build_retriever(read_recipe(MEANPOOL)["model"]["retriever"], MICRO)


@pytest.fixture(scope="module")
def frames():
    frames = torch.randn(6, T, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return frames, torch.ones(6, T, dtype=torch.bool)


@pytest.fixture(scope="module")
def features(model, frames):
    return encode_videos(model, *frames, batch_size=4)


def test_time_online_reports_positive_ordered_times(model, features):
    tokens = tokenize(model, CAPTIONS)
    result = time_online(model, tokens, gallery_from(model, features, 50), batch_size=3, k=5, repeats=4, warmup=1,
                         chunk_size=16)
    assert result["repeats"] == 4
    assert 0 < result["ms_per_query_p10"] <= result["ms_per_query_median"] <= result["ms_per_query_p90"]
    assert result["text_ms"] > 0 and result["score_ms"] > 0
    assert result["mem_method"] == "cpu_live_tensor_peak" and result["peak_mem_mb"] > 0
    assert result["matmul_ms"] > 0  # the fusion-free scorer is one [q, D] x [D, N] product per chunk


def test_time_online_budget_cuts_repeats_to_three(model, features):
    result = time_online(model, tokenize(model, CAPTIONS), features, batch_size=1, repeats=50, warmup=1,
                         max_seconds=1e-9)
    assert result["repeats"] == 3


def test_time_offline(model, frames):
    result = time_offline(model, *frames, batch_size=4, repeats=2)
    assert result["ms_per_video"] > 0
    assert result["videos_per_s"] == pytest.approx(1e3 / result["ms_per_video"])


def test_live_tensor_bytes_counts_allocations_and_frees():
    with LiveTensorBytes() as counter:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        a.mul_(3)  # in place: nothing new
        del a, b
    assert counter.peak == 8000
    assert counter.live == 0


def test_matmul_time_times_only_the_ops_the_floor_prices():
    a = torch.randn(128, 128)
    with MatmulTime(torch.device("cpu")) as timer:
        (a * 2).exp().softmax(dim=-1).sum()
    assert timer.seconds == 0.0 and timer.calls == 0
    for context in (torch.enable_grad, torch.inference_mode):  # composite ops arrive whole in the latter
        start = time.perf_counter()
        with context(), MatmulTime(torch.device("cpu")) as timer:
            a @ a  # mm
            torch.nn.functional.linear(a, a, a[0])  # addmm
            torch.einsum("bij,bjk->bik", a[None], a[None])  # bmm
        elapsed = time.perf_counter() - start
        assert timer.calls == 3 and 0 < timer.seconds <= elapsed


def test_fusion_free_floor_counts_exactly_d_macs_per_pair(model, features):
    text = model.encode_text(tokenize(model, CAPTIONS[:2]))
    floor = scorer_floor(model, text, features[:5])
    d = model.clip.embed_dim
    assert floor.macs_per_pair == d
    assert floor.bytes_per_video == d * 4
    assert floor.matmul_gflops > 0 and floor.bandwidth_gbs > 0
    assert floor.compute_ms(2000) == pytest.approx(2 * floor.compute_ms(1000))
    assert floor.bandwidth_ms(1000, 64) == pytest.approx(floor.bandwidth_ms(1000) / 64)


def test_text_conditioned_floor_counts_einsum_macs():
    scorer = build_retriever({"class_path": f"{__name__}.FrameMaxScorer", "init_args": MICRO})
    video = scorer.encode_video(torch.randn(3, T, 3, 32, 32), torch.ones(3, T, dtype=torch.bool))
    floor = scorer_floor(scorer, scorer.encode_text(tokenize(scorer, CAPTIONS[:1])), video)
    assert floor.macs_per_pair == T * scorer.clip.embed_dim
    assert floor.bytes_per_video == video.nbytes() / 3  # its cached frames (and mask): read once per batch
    assert floor.bandwidth_ms(1000, 64) == pytest.approx(floor.bandwidth_ms(1000) / 64)


def test_read_floor_is_one_gallery_read_shared_by_the_query_batch(model, monkeypatch):
    monkeypatch.setattr(floors, "memory_bandwidth_gbs", lambda device, threads: 2.0)  # known rates
    monkeypatch.setattr(floors, "matmul_gflops", lambda device, dtype, threads: 100.0)
    settings = BenchSettings(galleries=(1000,), batches=(1, 64), real_videos=4, offline_batch=2, repeats=1, warmup=0)
    rows = {row["batch"]: row for row in bench_method("meanpool", read_recipe(MEANPOOL), model, settings)}
    # vtr-micro MeanPool caches one fp32 embedding of D = 64 per video: 256 B; 1,000 videos = 256,000 B,
    # read at 2 GB/s = 0.128 ms, once per query batch: 0.128 ms a query at batch 1, 0.128 / 64 = 0.002 at 64
    assert rows[1]["bytes_per_video"] == 256
    assert rows[1]["bw_floor_ms"] == pytest.approx(0.128)
    assert rows[64]["bw_floor_ms"] == pytest.approx(0.002)
    # compute: 64 MACs a pair x 1,000 videos x 2 FLOP at 100 GFLOP/s = 0.00128 ms a query, at any batch
    assert rows[1]["floor_ms"] == rows[64]["floor_ms"] == pytest.approx(0.00128)
    assert rows[64]["ratio_to_floor"] == pytest.approx(rows[64]["score_ms"] / 0.002)  # the larger floor: the read


def test_gallery_from_tiles_cyclically_and_refuses_absurd_sizes(model, features):
    gallery = gallery_from(model, features, 14)
    assert len(gallery) == 14
    assert torch.equal(gallery.embedding, features.embedding[torch.arange(14) % len(features)])
    with pytest.raises(MemoryError, match="GiB"):
        gallery_from(model, features, 10**13)


def test_result_filename_records_device_threads_dtype_and_versions():
    name = result_filename("latency", torch.device("cpu"), "fp32", 1)
    torch_version = torch.__version__.split("+")[0]
    assert name.startswith("latency_cpu-") and "-1t_fp32_" in name
    assert name.endswith(f"_torch{torch_version}_vtr{retrieval.__version__}.csv")


def test_merge_rows_replaces_rows_with_the_same_key(tmp_path):
    path = tmp_path / "r.csv"
    key = {"method": "m", "backbone": "b", "device": "cpu", "dtype": "fp32", "threads": 1, "batch": 1}
    merge_rows(path, [{**key, "gallery": 10, "ms_per_query_median": 1.0}, {**key, "gallery": 20}])
    rows = merge_rows(path, [{**key, "gallery": 10, "ms_per_query_median": 2.0}])
    assert len(rows) == 2
    assert [r["ms_per_query_median"] for r in rows if str(r["gallery"]) == "10"] == [2.0]
    rows = merge_rows(path, [{**key, "backbone": "other", "gallery": 10, "ms_per_query_median": 3.0}])
    assert len(rows) == 3  # another backbone is another row
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # written through a temporary file, renamed


def test_plot_draws_one_line_per_method_and_backbone(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [{"method": "xclip", "backbone": backbone, "gallery": n, "batch": 1, "ms_per_query_median": ms * n,
             "ms_per_query_p10": ms * n, "ms_per_query_p90": ms * n, "bw_floor_ms": 1e-4 * n, "bytes_per_video": 2048}
            for backbone, ms in (("vtr-tiny", 1e-3), ("ViT-B-32", 1e-2)) for n in (1000, 10000)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    path = plot_latency(rows, tmp_path / "latency.png")
    assert path.stat().st_size > 0
    ax = figures[0].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["xclip (vtr-tiny)"] == [1.0, 10.0] and lines["xclip (ViT-B-32)"] == [10.0, 100.0]


def test_bench_latency_command_writes_csv_and_plot_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        bench_main(["bench", "latency", "--config", str(MEANPOOL), "--backbone", "vtr-micro", "--gallery", "20", "40",
                    str(10**13), "--batch", "1", "2", "--repeats", "2", "--warmup", "1", "--real-videos", "4",
                    "--offline-batch", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "experiments").exists()  # the committed results are written only when asked
    (path,) = (tmp_path / "runs" / "bench").glob("latency_*.csv")
    assert path.with_suffix(".png").is_file()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    timed = [r for r in rows if r["gallery"] != str(10**13)]
    assert all(float(r["ms_per_query_median"]) > 0 and float(r["bw_floor_ms"]) > 0 for r in timed)
    assert all(r["macs_per_pair"] == "64" and r["fusion_free"] == "True" and r["threads"] == "1" for r in timed)
    skipped = [r for r in rows if r["gallery"] == str(10**13)]
    assert all(r["note"].startswith("skipped") and r["ms_per_query_median"] == "" for r in skipped)


def test_bench_metrics_command_appends(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench_main(["bench", "metrics", "--n", "200", "--repeats", "1"])
    bench_main(["bench", "metrics", "--n", "200", "--repeats", "1", "--out", "runs/bench"])
    assert not (tmp_path / "experiments").exists()
    (path,) = (tmp_path / "runs" / "bench").glob("metrics_*.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[0]["seconds_median"]) > 0
    assert "200x200" in capsys.readouterr().out


def _grid(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(body)
    return path


def test_sweep_dry_run_expands_a_2x2_grid(tmp_path, capsys):
    grid = _grid(tmp_path, f"""
configs: [{MEANPOOL}]
args: {{model.retriever.init_args.backbone: vtr-tiny}}
grid:
  model.optim.lr: [1.0e-4, 3.0e-4]
  trainer.max_epochs: [1, 2]
""")
    sweep.main(["sweep", "--grid", str(grid), "--dry-run", "--trainer.fast_dev_run=true"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all(f"retrieval.cli fit --config {MEANPOOL} --model.retriever.init_args.backbone=vtr-tiny" in line for line in lines)
    assert all("--trainer.fast_dev_run=true --trainer.logger.init_args.save_dir=" in line for line in lines)
    assert "--model.optim.lr=0.0003 --trainer.max_epochs=1" in lines[2]


def test_sweep_rejects_bad_grid_files(tmp_path):
    with pytest.raises(SystemExit, match="unknown keys"):
        sweep.main(["sweep", "--grid", str(_grid(tmp_path, "grids: {}\n")), "--dry-run"])
    with pytest.raises(SystemExit, match="non-empty list"):
        sweep.main(["sweep", "--grid", str(_grid(tmp_path, "grid: {trainer.max_epochs: 3}\n")), "--dry-run"])


def test_committed_sweep_files_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    local = sweep.read_grid(ROOT / "experiments/sweeps/grid_seqtransf.yaml")
    assert len(sweep.expand(local)) == 4
    wandb = read_yaml(ROOT / "experiments/sweeps/wandb_seqtransf.yaml")
    assert wandb["command"][:2] == ["vtr", "sweep"] and wandb["command"][-2:] == ["--point", "${args}"]


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_recipe_variant_merges_onto_its_recipe(tmp_path):
    """A variant holds only its change; the parser merges it onto the recipe (mappings key by
    key), and the data's frames are the model's."""
    (tmp_path / "m.yaml").write_text(
        "model:\n  retriever:\n    class_path: baselines.clip4clip.SeqTransf\n    init_args:\n"
        "      num_frames: 6\n      num_temporal_layers: 2\n  optim: {lr: 0.1, eps: 1.0e-6}\ndata:\n  batch_size: 4\n")
    (tmp_path / "variant.yaml").write_text("model:\n  retriever:\n    init_args:\n      num_temporal_layers: 3\n"
                                           "  optim: {lr: 0.5}\n")
    recipe = read_recipe(tmp_path / "m.yaml", tmp_path / "variant.yaml")
    retriever = recipe["model"]["retriever"]
    assert retriever["class_path"] == "baselines.clip4clip.SeqTransf"
    assert retriever["init_args"]["num_temporal_layers"] == 3 and retriever["init_args"]["num_frames"] == 6
    assert recipe["model"]["optim"]["lr"] == 0.5 and recipe["model"]["optim"]["eps"] == 1.0e-6
    assert recipe["data"]["num_frames"] == 6 and recipe["data"]["batch_size"] == 4
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        read_recipe(tmp_path / "m.yaml", tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match="variant.yaml"):  # a variant alone names no method
        read_recipe(tmp_path / "variant.yaml")
    (tmp_path / "contradicts.yaml").write_text("data:\n  num_frames: 8\n")
    with pytest.raises(ValueError, match="data.num_frames=8 contradicts"):
        read_recipe(tmp_path / "m.yaml", tmp_path / "contradicts.yaml")


def test_committed_variants_merge_onto_prompt_switch():
    base = ROOT / "experiments/model/prompt_switch.yaml"
    for variant, key, value in (("prompt_switch_no_captioner.yaml", "use_captioner", False),
                                ("prompt_switch_aggregation_new_lr.yaml", "aggregation_in_clip_group", False)):
        recipe = read_recipe(base, ROOT / "experiments/ablations" / variant)
        assert recipe["model"]["retriever"]["init_args"][key] is value
        assert recipe["data"]["eval_num_frames"] == 12 and recipe["data"]["drop_duplicate_videos"] is True
