"""Latency of the three stages, the one way vtr times a method (``vtr bench``, ``vtr compare``).

What is measured (DESIGN.md, "Efficiency measurement"):

- offline: ``encode_video`` throughput (videos/s, ms/video) on real-shaped frames;
- online: per-query latency of ``encode_text + score_gallery + topk`` over a gallery of N
  videos tiled from real features (:func:`gallery_from`), for query batches of 1 and 64:
  median, p10 and p90 over repeated timed runs after warm-up, device synchronised, under
  ``torch.inference_mode()``; split into text-encode and score+top-k time;
- peak memory of one query batch above what is already resident (model + gallery): on CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU, where torch keeps no allocator statistics,
  the peak of live tensor bytes counted by a dispatch mode on one extra run
  (``mem_method`` names which; kernel-internal scratch buffers are not seen by the latter);
- floors (:func:`scorer_floor`): the scorer's compute floor, its matmul MACs per (query, video)
  pair (counted by ``FlopCounterMode``) times N at this machine's measured fp matmul rate,
  and the bandwidth floor ``N * bytes_per_video / BW`` with BW the measured read bandwidth,
  divided by the batch (one gallery read serves the whole batch; text-conditioned scorers read
  each chunk once for the whole query batch too). ``ratio_to_floor`` = measured score+top-k
  time / the larger of the two floors;
- ``matmul_ms``: the part of one more scoring run spent inside the ops the compute floor prices
  (:class:`MatmulTime`), so a ratio above the floor splits into the matmuls' own rate at the
  scorer's shapes and everything else (softmaxes, reductions, dispatch).

Both rates are measured with the benchmark's own thread count, so the floors are what this
process could reach, not the machine's peak.

``vtr bench latency`` writes one CSV per device/dtype/version (timm convention: the file name
says where it was measured; rows of a re-measured method replace its old rows) and a log-log
plot beside it, under ``runs/bench/`` unless ``--out`` names another folder
(:mod:`retrieval.bench.results`). ``vtr bench metrics`` times
:func:`retrieval.metrics.retrieval_metrics`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import logging
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

import retrieval
from retrieval.bench import build_method, read_recipe, tokenize
from retrieval.bench.floors import scorer_floor, synchronize
from retrieval.bench.gallery import gallery_from
from retrieval.bench.results import DEFAULT_OUT, csv_value, device_name, merge_rows, plot_latency, result_filename
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.metrics import retrieval_metrics
from retrieval.module import RetrievalModule

log = logging.getLogger(__name__)

TEXT_RUNS = 5
"""Query batches whose text encoding is timed (the scorer's repeats cycle over them)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Real captions of the synthetic benchmark's kinds: the text tower sees real token lengths.
CAPTIONS = (
    "a cyan triangle moves left",
    "a cyan triangle moves right",
    "a yellow square is replaced by a red square",
    "a red square is replaced by a yellow square",
    "a triangle turns from cyan to blue",
    "a triangle turns from blue to cyan",
    "a blue triangle and a green circle",
    "a big red square",
    "a small red square",
    "an orange square on the left",
    "an orange square on the right",
    "a man is playing a guitar on a stage while people watch",
    "a woman slices vegetables in a kitchen and puts them in a pot",
    "two dogs run across a snowy field",
    "a cartoon character explains how to cook pasta",
    "a car drives through a city street at night",
)


# ---------------------------------------------------------------------- timing primitives
def _device_of(features: VideoFeatures) -> torch.device:
    return next(iter(features.values())).device


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensors that ops allocate while active, and their peak.

    Outputs that alias an input (in-place ops, views) are not new memory; a tensor's bytes are
    released when the Python tensor dies. Used on the CPU, where the allocator keeps no stats.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t._base is not None:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs:
                continue
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, storage.nbytes())
        return out


class MatmulTime(TorchDispatchMode):
    """Wall time spent inside the matmul-like ops that ``FlopCounterMode`` prices (mm, addmm,
    bmm, baddbmm, fused attention), each timed on its own with the device synchronised.

    With the compute floor it splits a scorer's time: the matmuls' own rate at the scorer's
    shapes (narrow GEMMs run far below a square matmul's rate) against everything else.
    """

    OPS = frozenset(
        getattr(torch.ops.aten, name).default
        for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention")
        if hasattr(torch.ops.aten, name)
    )

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            # composite ops (matmul, linear, einsum) reach a mode whole under inference_mode:
            # decompose them, as FlopCounterMode does, so their mm/bmm are seen
            with self:
                out = func.decompose(*args, **kwargs)
            return func(*args, **kwargs) if out is NotImplemented else out
        synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def peak_memory_mb(run: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak memory one call of ``run`` adds above what is allocated before it, and the method."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_memory_allocated"
    with LiveTensorBytes() as counter:
        run()
    return counter.peak / 2**20, "cpu_live_tensor_peak"


def time_online(
    model: RetrievalModule,
    tokens: Tensor,
    gallery: VideoFeatures,
    batch_size: int,
    k: int = 10,
    repeats: int = 20,
    warmup: int = 3,
    chunk_size: int | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Per-query latency of ``encode_text + score_gallery + topk`` over ``gallery``.

    The text tower's time does not depend on N: it is timed on its own over ``TEXT_RUNS``
    batches (each the next ``batch_size`` queries of ``tokens``, cycling), and the scorer's
    warm-up and repeats (``score_gallery + topk``) cycle over those encoded batches. The
    ms/query quantiles are the text median plus the scorer's quantiles. Times are wall-clock
    with the device synchronised around each timed call.

    Args:
        model: the method (put in eval mode here); on the gallery's device and dtype.
        tokens: ``[Q, L]`` token ids of real captions.
        gallery: the precomputed ``VideoFeatures`` of N videos.
        batch_size: queries per run.
        k: top-k (clamped at N).
        repeats: timed runs.
        warmup: untimed runs first.
        chunk_size: gallery videos per ``score`` call (default: the model's ``eval_chunk_size``).
        max_seconds: a time budget: when the requested runs would exceed it, warm-up stops
            after one run and fewer repeats (at least 3) are timed.

    Returns:
        ``ms_per_query_median`` (= ``_p50``), ``_p10``, ``_p90``, ``_p99``, ``text_ms`` and
        ``score_ms`` (medians per query), ``repeats`` (runs timed), ``peak_mem_mb``, ``mem_method``,
        ``matmul_ms`` (per query: the part of one more ``score_gallery`` spent in matmuls,
        :class:`MatmulTime`).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    device = _device_of(gallery)
    model.eval()
    tokens = tokens.to(device)
    k = min(k, len(gallery))
    runs = itertools.count()

    def next_batch() -> Tensor:
        start = next(runs) * batch_size
        return tokens[torch.arange(start, start + batch_size) % len(tokens)]

    def encode() -> tuple[TextFeatures, float]:
        batch = next_batch()
        synchronize(device)
        start = time.perf_counter()
        text = model.encode_text(batch)
        synchronize(device)
        return text, time.perf_counter() - start

    def run(text: TextFeatures) -> float:
        synchronize(device)
        start = time.perf_counter()
        model.score_gallery(text, gallery, chunk_size).topk(k, dim=1)
        synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        # the text tower does not depend on N: timed on its own (a new batch each run, after one
        # untimed run), outside the scorer's repeats, which cycle over the batches it encoded
        encode()
        encoded = [encode() for _ in range(min(repeats, TEXT_RUNS))]
        texts = [text for text, _ in encoded]
        text_s = statistics.median(seconds for _, seconds in encoded)
        spent: list[float] = []
        for i in range(warmup):
            spent.append(run(texts[i % len(texts)]))
            if max_seconds is not None and spent[-1] * (warmup + repeats) > max_seconds:
                break  # one warm-up run is enough for a point this slow
        if max_seconds is not None:
            per_run = max(spent[-1] if spent else run(texts[0]), 1e-9)
            remaining = max_seconds - sum(spent) - per_run  # the memory run comes last
            repeats = max(3, min(repeats, int(remaining / per_run)))
        times = [run(texts[i % len(texts)]) for i in range(repeats)]
        peak, method = peak_memory_mb(lambda: (model.encode_text(next_batch()), run(texts[0])), device)
        with MatmulTime(device) as matmul:
            model.score_gallery(texts[0], gallery, chunk_size)
    text_ms = 1e3 * text_s / batch_size
    score = [1e3 * t / batch_size for t in times]
    quantiles = torch.quantile(torch.tensor(score, dtype=torch.float64),
                               torch.tensor([0.5, 0.1, 0.9, 0.99], dtype=torch.float64)).tolist()
    median, p10, p90, p99 = (text_ms + q for q in quantiles)
    return {
        "ms_per_query_median": median,
        "ms_per_query_p50": median,
        "ms_per_query_p10": p10,
        "ms_per_query_p90": p90,
        "ms_per_query_p99": p99,
        "text_ms": text_ms,
        "score_ms": quantiles[0],
        "repeats": repeats,
        "peak_mem_mb": peak,
        "mem_method": method,
        "matmul_ms": 1e3 * matmul.seconds / batch_size,
    }


def time_offline(
    model: RetrievalModule, frames: Tensor, frame_mask: Tensor, batch_size: int, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Throughput of ``encode_video`` (the offline stage) on batches of ``batch_size`` videos.

    Args:
        frames: ``[B, T, 3, H, W]`` on the model's device (cycled when B < ``batch_size``).
        frame_mask: ``[B, T]``.

    Returns:
        ``ms_per_video`` (median), ``videos_per_s`` and ``repeats``.
    """
    device = frames.device
    index = torch.arange(batch_size) % len(frames)
    batch, mask = frames[index], frame_mask[index]
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            model.encode_video(batch, mask)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    per_video = statistics.median(times) / batch_size
    return {"ms_per_video": 1e3 * per_video, "videos_per_s": 1.0 / per_video, "repeats": repeats}


def encode_videos(model: RetrievalModule, frames: Tensor, frame_mask: Tensor, batch_size: int) -> VideoFeatures:
    """``encode_video`` over ``frames`` in batches, concatenated (real gallery features)."""
    with torch.inference_mode():
        parts = [model.encode_video(frames[i : i + batch_size], frame_mask[i : i + batch_size])
                 for i in range(0, len(frames), batch_size)]
    return VideoFeatures.cat(parts)


# ---------------------------------------------------------------------- the benchmark driver
@dataclass
class BenchSettings:
    """What ``vtr bench latency`` measures (see ``--help``)."""

    galleries: Sequence[int] = (1000, 10000, 100000)
    batches: Sequence[int] = (1, 64)
    device: str = "cpu"
    dtype: str = "fp32"
    real_videos: int = 32
    offline_batch: int = 8
    repeats: int = 20
    warmup: int = 3
    k: int = 10
    chunk_size: int | None = None
    max_seconds_per_point: float = 120.0


def eval_num_frames(recipe: dict[str, Any], model: RetrievalModule) -> int:
    """Frames per evaluation video: the recipe's ``data.eval_num_frames``, else its training count."""
    data = recipe.get("data") or {}
    return int(data.get("eval_num_frames") or getattr(model, "eval_num_frames", None) or data.get("num_frames")
               or model.num_frames)


def bench_method(name: str, recipe: dict[str, Any], model: RetrievalModule, settings: BenchSettings,
                 progress: tqdm | None = None) -> list[dict[str, Any]]:
    """Offline throughput, then online latency at every (gallery, batch) of ``settings``.

    A (gallery, batch) point whose extrapolated time (linear in N from the previous gallery)
    exceeds ``max_seconds_per_point`` is skipped with the larger galleries of that batch; a
    row with a ``note`` records each skip.
    """
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    model = model.to(device=device, dtype=dtype).eval()
    size, frames_per_video = model.clip.image_size, eval_num_frames(recipe, model)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(settings.real_videos, frames_per_video, 3, size, size, generator=generator)
    frames = frames.to(device=device, dtype=dtype)
    frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=device)
    offline = time_offline(model, frames, frame_mask, settings.offline_batch, repeats=3)
    features = encode_videos(model, frames, frame_mask, settings.offline_batch)
    tokens = tokenize(model, CAPTIONS).to(device)
    with torch.inference_mode():
        floor = scorer_floor(model, model.encode_text(tokens[:1]), features[: min(8, len(features))])
    base = {
        "method": name, "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "fusion_free": bool(model.offline), "backbone": model.clip.name, "device": device_name(device),
        "dtype": settings.dtype, "threads": torch.get_num_threads(), "macs_per_pair": floor.macs_per_pair,
        "bytes_per_video": floor.bytes_per_video, "matmul_gflops": floor.matmul_gflops,
        "bandwidth_gbs": floor.bandwidth_gbs, "torch": torch.__version__, "vtr": retrieval.__version__,
        "offline_ms_per_video": offline["ms_per_video"],
        "offline_videos_per_s": offline["videos_per_s"],
    }
    rows, last_run = [], {}  # batch -> (gallery, seconds per run)
    for n in sorted(settings.galleries):
        gallery = None
        for batch in settings.batches:
            row = {**base, "gallery": n, "batch": batch, "gallery_mb": floor.bytes_per_video * n / 2**20,
                   "floor_ms": floor.compute_ms(n), "bw_floor_ms": floor.bandwidth_ms(n, batch)}
            note = _skip_note(last_run.get(batch), n, settings)
            if note is None and gallery is None:
                try:
                    gallery = gallery_from(model, features, n)
                except MemoryError as error:
                    note = f"skipped: {error}"
            if note is not None:
                _note(f"{name} N={n:,} batch={batch}: {note}", progress)
                rows.append({**row, "note": note})
                last_run[batch] = (n, math.inf)
            else:
                result = time_online(model, tokens, gallery, batch, settings.k, settings.repeats, settings.warmup,
                                     settings.chunk_size, max_seconds=settings.max_seconds_per_point)
                last_run[batch] = (n, result["score_ms"] * batch / 1e3)  # the scorer's time, not the text tower's
                bound = max(row["floor_ms"], row["bw_floor_ms"])
                rows.append({**row, **result, "ratio_to_floor": result["score_ms"] / bound if bound else None})
            if progress is not None:
                progress.update()
        del gallery
    return rows


def _skip_note(previous: tuple[int, float] | None, n: int, settings: BenchSettings) -> str | None:
    """Why the point (n) is skipped, from the previous gallery's time per run; None to run it."""
    if previous is None:
        return None
    previous_n, seconds = previous
    if math.isinf(seconds):
        return f"skipped: a smaller gallery (N={previous_n:,}) was already skipped"
    # the scorer's time per run, linear in N: warm-up, 3 timed, memory run (the text tower's is fixed)
    estimate = seconds * n / previous_n * (1 + min(settings.warmup, 1) + 3)
    if estimate > settings.max_seconds_per_point:
        return (f"skipped: estimated {estimate:.0f} s of scoring (linear in N from N={previous_n:,}) > "
                f"--max-seconds-per-point {settings.max_seconds_per_point:g}")
    return None


def _note(message: str, progress: tqdm | None) -> None:
    log.warning(message)
    if progress is not None:
        progress.write(message)


def run_latency(configs: Sequence[Path], settings: BenchSettings, out_dir: Path, threads: int | None,
                overrides: dict[str, Any], ckpt: str | None = None) -> tuple[Path, Path]:
    """``vtr bench latency``: every recipe, every point; returns the CSV and PNG paths."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if settings.dtype != "fp32" and device.type == "cpu":
        log.warning("--dtype %s on the CPU: many CPU kernels are slower in reduced precision", settings.dtype)
    csv_path = out_dir / result_filename("latency", device, settings.dtype, torch.get_num_threads())
    points = len(configs) * len(settings.galleries) * len(settings.batches)
    rows: list[dict[str, Any]] = []
    with tqdm(total=points, desc="vtr bench latency", unit="point") as progress:
        for config in configs:
            recipe = read_recipe(config)
            progress.set_postfix_str(config.stem)
            model = build_method(recipe["model"], overrides, ckpt)
            rows += bench_method(config.stem, recipe, model, settings, progress)
            merge_rows(csv_path, rows)  # keep what is measured if a later method fails
            del model
    all_rows = merge_rows(csv_path, rows)
    png = plot_latency(all_rows, csv_path.with_suffix(".png"))
    _print_rows(rows)
    return csv_path, png


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    header = (f"{'method':<16}{'N':>9}{'batch':>6}{'ms/query':>11}{'text':>9}{'score':>10}{'matmuls':>10}{'floor':>10}"
              f"{'bw floor':>10}{'peak MB':>9}  note")
    print(header)
    for r in rows:
        def f(column: str) -> str:
            value = r.get(column)
            return "-" if value in (None, "") else f"{float(value):.3g}"
        print(f"{r['method']:<16}{r['gallery']:>9}{r['batch']:>6}{f('ms_per_query_median'):>11}{f('text_ms'):>9}"
              f"{f('score_ms'):>10}{f('matmul_ms'):>10}{f('floor_ms'):>10}{f('bw_floor_ms'):>10}{f('peak_mem_mb'):>9}"
              f"  {r.get('note') or ''}")


def time_metrics(n: int, repeats: int = 3, chunk_size: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Seconds of :func:`retrieval.metrics.retrieval_metrics` on a random ``n x n`` similarity."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randn(n, n, generator=generator)
    query_video = torch.arange(n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        retrieval_metrics(similarity, query_video, chunk_size)
        times.append(time.perf_counter() - start)
    return {"n": n, "chunk_size": chunk_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "seconds_median": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times),
            "torch": torch.__version__, "vtr": retrieval.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


METRIC_COLUMNS = ("n", "chunk_size", "threads", "repeats", "seconds_median", "seconds_min", "seconds_max",
                  "torch", "vtr", "date")


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtr bench", description="Latency benchmarks (DESIGN.md, efficiency).")
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency", help="offline encode throughput and online per-query latency vs gallery size",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lat.add_argument("--config", type=Path, action="append", default=[], help="recipe YAML (repeatable)")
    lat.add_argument("--all", action="store_true", help="every recipe in --recipes-dir")
    lat.add_argument("--recipes-dir", type=Path, default=Path("experiments/model"))
    lat.add_argument("--gallery", type=int, nargs="+", default=[1000, 10000, 100000])
    lat.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and gallery precision")
    lat.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    lat.add_argument("--out", type=Path, default=DEFAULT_OUT,
                     help="output folder (the committed results: experiments/results)")
    lat.add_argument("--backbone", default=None, help="replace the recipe's backbone (e.g. vtr-tiny)")
    lat.add_argument("--pretrained", default="none",
                     help="pretrained tag/path, 'none' for random init, 'recipe' for the recipe's")
    lat.add_argument("--ckpt", default=None, help="Lightning checkpoint (with a single --config)")
    lat.add_argument("--real-videos", type=int, default=32, help="real videos encoded, then tiled")
    lat.add_argument("--offline-batch", type=int, default=8, help="videos per encode_video call")
    lat.add_argument("--repeats", type=int, default=20)
    lat.add_argument("--warmup", type=int, default=3)
    lat.add_argument("-k", type=int, default=10, help="top-k")
    lat.add_argument("--chunk-size", type=int, default=None, help="gallery chunk per score call")
    lat.add_argument("--max-seconds-per-point", type=float, default=120.0,
                     help="time budget per (method, N, batch); larger galleries are skipped with a note")
    met = sub.add_parser("metrics", help="time retrieval_metrics on an n x n similarity",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    met.add_argument("--n", type=int, default=10000)
    met.add_argument("--repeats", type=int, default=3)
    met.add_argument("--chunk-size", type=int, default=4096)
    met.add_argument("--threads", type=int, default=None)
    met.add_argument("--out", type=Path, default=DEFAULT_OUT,
                     help="output folder (the committed results: experiments/results)")
    from retrieval.bench import frontier, gallery, train_step  # they import this module

    for tool in (gallery, frontier, train_step):
        tool.add_parser(sub)
    return parser


def main(argv: Sequence[str]) -> None:
    """``vtr bench latency ...`` / ``vtr bench metrics ...`` (``argv[0]`` is the tool name)."""
    args = build_parser().parse_args(list(argv[1:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "tool", None):  # a tool of its own module (gallery, frontier, train)
        importlib.import_module(args.tool).run(args)
        return
    if args.command == "metrics":
        if args.threads:
            torch.set_num_threads(args.threads)
        result = time_metrics(args.n, args.repeats, args.chunk_size)
        path = args.out / result_filename("metrics", torch.device("cpu"), "fp32", torch.get_num_threads())
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({c: csv_value(result[c]) for c in METRIC_COLUMNS})
        print(f"retrieval_metrics {args.n}x{args.n}: median {result['seconds_median']:.3f} s "
              f"(min {result['seconds_min']:.3f}, max {result['seconds_max']:.3f}; {result['threads']} threads) -> {path}")
        return
    configs = list(args.config) + (sorted(args.recipes_dir.glob("*.yaml")) if args.all else [])
    if not configs:
        raise SystemExit("vtr bench latency: give --config RECIPE.yaml (repeatable) or --all")
    if args.ckpt and len(configs) != 1:
        raise SystemExit("vtr bench latency: --ckpt needs exactly one --config")
    overrides: dict[str, Any] = {}
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.pretrained != "recipe":
        overrides["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    settings = BenchSettings(args.gallery, args.batch, args.device, args.dtype, args.real_videos, args.offline_batch,
                             args.repeats, args.warmup, args.k, args.chunk_size, args.max_seconds_per_point)
    csv_path, png = run_latency(configs, settings, args.out, args.threads, overrides, args.ckpt)
    print(f"wrote {csv_path} and {png}")
