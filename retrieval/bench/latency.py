"""``vtr bench latency``: the three stages of every method timed the one way vtr times a method.

What is measured (DESIGN.md, "Efficiency measurement"):

- offline: ``encode_video`` throughput (videos/s, ms/video) on real-shaped frames
  (:func:`retrieval.bench.timing.time_offline`);
- online: per-query latency of ``encode_text + score_gallery + topk`` over a gallery of N
  videos tiled from real features (:func:`gallery_from`), for query batches of 1 and 64:
  median, p10 and p90 over repeated timed runs after warm-up, device synchronised, under
  ``torch.inference_mode()``; split into text-encode and score+top-k time
  (:func:`retrieval.bench.timing.time_online`);
- peak memory of one query batch above what is already resident (model + gallery), and
  ``matmul_ms``, the part of one more scoring run spent inside the ops the compute floor prices
  (the meters of :mod:`retrieval.bench.meters`);
- floors (:func:`scorer_floor`): the scorer's compute floor, its matmul MACs per (query, video)
  pair (counted by ``FlopCounterMode``) times N at this machine's measured fp matmul rate,
  and the bandwidth floor ``N * bytes_per_video / BW`` with BW the measured read bandwidth,
  divided by the batch (one gallery read serves the whole batch; text-conditioned scorers read
  each chunk once for the whole query batch too). ``ratio_to_floor`` = measured score+top-k
  time / the larger of the two floors.

Both rates are measured with the benchmark's own thread count, so the floors are what this
process could reach, not the machine's peak.

``vtr bench latency`` writes one CSV per device/dtype/version (timm convention: the file name
says where it was measured; rows of a re-measured method replace its old rows) and a log-log
plot beside it, under ``runs/bench/`` unless ``--out`` names another folder
(:mod:`retrieval.bench.results`). This module is also ``vtr bench``'s command line: its other
jobs are tools of their own modules (``vtr bench metrics``: :mod:`retrieval.bench.metrics_time`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import retrieval
from retrieval.recipes import (TWO_STAGE, build_retriever, checkpoint_recipe, read_recipe, retriever_from_checkpoint,
                               tokenize)
from retrieval.bench.floors import scorer_floor
from retrieval.bench.gallery import gallery_from
from retrieval.bench.results import DEFAULT_OUT, device_name, merge_rows, plot_latency, plot_two_stage, result_filename
from retrieval.bench.timing import encode_videos, time_offline, time_online
from retrieval.features import VideoFeatures
from retrieval.retriever import Retriever
from retrieval.two_stage import TwoStage

log = logging.getLogger(__name__)

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


def eval_num_frames(recipe: dict[str, Any], model: Retriever) -> int:
    """Frames per evaluation video: the recipe's ``data.eval_num_frames``, else its training count."""
    data = recipe.get("data") or {}
    return int(data.get("eval_num_frames") or getattr(model, "eval_num_frames", None) or data.get("num_frames")
               or model.num_frames)


def bench_method(name: str, recipe: dict[str, Any], model: Retriever, settings: BenchSettings,
                 progress: tqdm | None = None, rerank_ks: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Offline throughput, then online latency at every (gallery, batch) of ``settings``.

    A (gallery, batch) point whose extrapolated time (linear in N from the previous gallery)
    exceeds ``max_seconds_per_point`` is skipped with the larger galleries of that batch; a
    row with a ``note`` records each skip. ``rerank_ks`` (a two-stage ``model``): the online
    points once per re-ranked k, rows named ``<name>@k<K>``, on the same encoded videos.
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
    rows = []
    for k in rerank_ks or [None]:
        if k is not None:
            model.k = k
        rows += _online_rows(name if k is None else f"{name}@k{k}", model, features, tokens, offline, settings,
                             progress)
    return rows


def _online_rows(name: str, model: Retriever, features: VideoFeatures, tokens: torch.Tensor, offline: dict[str, float],
                 settings: BenchSettings, progress: tqdm | None) -> list[dict[str, Any]]:
    """:func:`bench_method`'s online points for one method (one k of a two-stage one)."""
    device = torch.device(settings.device)
    with torch.inference_mode():
        floor = scorer_floor(model, model.encode_text(tokens[:1]), features[: min(8, len(features))])
    base = {
        "method": name, "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "fusion_free": bool(model.fusion_free), "backbone": model.clip.name, "device": device_name(device),
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
                overrides: dict[str, Any], ckpt: str | None = None,
                rerank_ks: Sequence[int] = ()) -> tuple[Path, Path]:
    """``vtr bench latency``: every recipe, every point; returns the CSV and PNG paths.

    ``rerank_ks``: each two-stage recipe is timed once per re-ranked k (its rows named
    ``<recipe>@k<K>``), at its own ``k`` otherwise; other recipes are timed once (a frontier's
    ends, in the same run), all into ``latency-two-stage_*.csv``. Refused when no recipe is a
    two-stage one.
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if settings.dtype != "fp32" and device.type == "cpu":
        log.warning("--dtype %s on the CPU: many CPU kernels are slower in reduced precision", settings.dtype)
    kind = "latency-two-stage" if rerank_ks else "latency"  # a k sweep gets its own file and plot
    csv_path = out_dir / result_filename(kind, device, settings.dtype, torch.get_num_threads())
    two_stage = [read_recipe(c)["model"]["retriever"].get("class_path") == TWO_STAGE for c in configs]
    if rerank_ks and not any(two_stage):
        raise SystemExit("vtr bench latency: --rerank-k times two-stage recipes (experiments/two_stage), "
                         f"and none of {[c.name for c in configs] or [ckpt]} is one")
    runs = sum(len(rerank_ks) if is_pair and rerank_ks else 1 for is_pair in two_stage) or 1  # [] with --ckpt: one
    points = runs * len(settings.galleries) * len(settings.batches)
    rows: list[dict[str, Any]] = []
    with tqdm(total=points, desc="vtr bench latency", unit="point") as progress:
        for config in configs or [None]:  # None: the checkpoint alone
            name = config.stem if config else Path(ckpt).stem
            progress.set_postfix_str(name)
            if config is None:
                recipe, model = checkpoint_recipe(ckpt), retriever_from_checkpoint(ckpt, overrides)
            else:
                recipe = read_recipe(config)
                model = build_retriever(recipe["model"]["retriever"], overrides, ckpt)
            rows += bench_method(name, recipe, model, settings, progress,
                                 rerank_ks if isinstance(model, TwoStage) else ())
            merge_rows(csv_path, rows)  # keep what is measured if a later method fails
            del model
    all_rows = merge_rows(csv_path, rows)
    png = (plot_two_stage if rerank_ks else plot_latency)(all_rows, csv_path.with_suffix(".png"))
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
    lat.add_argument("--ckpt", default=None, help="Lightning checkpoint (its saved retriever, or a single --config's)")
    lat.add_argument("--real-videos", type=int, default=32, help="real videos encoded, then tiled")
    lat.add_argument("--offline-batch", type=int, default=8, help="videos per encode_video call")
    lat.add_argument("--repeats", type=int, default=20)
    lat.add_argument("--warmup", type=int, default=3)
    lat.add_argument("-k", type=int, default=10, help="top-k")
    lat.add_argument("--chunk-size", type=int, default=None, help="gallery chunk per score call")
    lat.add_argument("--rerank-k", type=int, nargs="+", default=[],
                     help="time each two-stage recipe (experiments/two_stage) at each re-ranked k, other "
                     "recipes once, into latency-two-stage_*.csv")
    lat.add_argument("--max-seconds-per-point", type=float, default=120.0,
                     help="time budget per (method, N, batch); larger galleries are skipped with a note")
    from retrieval.bench import frontier, gallery, metrics_time, train_step  # train_step imports this module

    for tool in (metrics_time, gallery, frontier, train_step):
        tool.add_parser(sub)
    return parser


def main(argv: Sequence[str]) -> None:
    """``vtr bench latency ...`` / ``vtr bench metrics ...`` (``argv[0]`` is the tool name)."""
    args = build_parser().parse_args(list(argv[1:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "tool", None):  # a tool of its own module (metrics, gallery, frontier, train)
        importlib.import_module(args.tool).run(args)
        return
    configs = list(args.config) + (sorted(args.recipes_dir.glob("*.yaml")) if args.all else [])
    if not configs and not args.ckpt:
        raise SystemExit("vtr bench latency: give --config RECIPE.yaml (repeatable), --all, or --ckpt")
    if args.ckpt and len(configs) > 1:
        raise SystemExit("vtr bench latency: --ckpt takes one --config at most (none: the checkpoint's own)")
    overrides: dict[str, Any] = {}
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.pretrained != "recipe":
        overrides["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    settings = BenchSettings(args.gallery, args.batch, args.device, args.dtype, args.real_videos, args.offline_batch,
                             args.repeats, args.warmup, args.k, args.chunk_size, args.max_seconds_per_point)
    if args.rerank_k and min(args.rerank_k) < 1:
        raise SystemExit("vtr bench latency: --rerank-k values must be >= 1")
    csv_path, png = run_latency(configs, settings, args.out, args.threads, overrides, args.ckpt, args.rerank_k)
    print(f"wrote {csv_path} and {png}")
