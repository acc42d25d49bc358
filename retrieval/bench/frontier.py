"""``vtr bench frontier``: two-stage accuracy against ms/query, per k and gallery size.

For each recaller x re-ranker pair of a ``vtr compare`` output folder (``<dir>/<method>/
checkpoints/best.ckpt``, rebuilt from its recipe and the hyperparameters saved in it) and each
k: t2v R@1, R@5 and the synthetic temporal pair accuracy on the checkpoints' own test split
(each method encodes the videos with its own frame sampling, rebuilt from the checkpoint's
datamodule hyperparameters), then ms/query (batch 1) over the test gallery and over galleries
tiled from it. The pure recaller and the pure re-ranker are the frontier's two ends.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

import retrieval
from retrieval.bench.results import DEFAULT_OUT, atomic_path, device_name, merge_rows, result_filename
from retrieval.bench.timing import time_online
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.transforms import normalize_frames
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.metrics import pair_metrics, retrieval_metrics
from retrieval.recipes import checkpoint_recipe, retriever_from_checkpoint
from retrieval.two_stage import TwoStage, join

log = logging.getLogger(__name__)

KS = (10, 25, 50, 100, 200, 400)
COLUMNS = ("recaller", "reranker", "k", "gallery", "batch", "device", "dtype", "threads", "t2v_R@1", "t2v_R@5",
           "temporal_pair_acc", "ms_per_query_median", "ms_per_query_p50", "ms_per_query_p99", "text_ms", "score_ms",
           "repeats", "torch", "vtr")
ROW_KEY = ("recaller", "reranker", "k", "gallery", "batch", "device", "dtype", "threads")


def load_compared(compare_dir: Path, method: str) -> tuple[Any, dict[str, Any]]:
    """A method of a ``vtr compare`` run (from its checkpoint alone), and its checkpoint's
    datamodule hyperparameters."""
    ckpt = compare_dir / method / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"--compare-dir {compare_dir}: no checkpoint {ckpt} (did `vtr compare` run {method}?)")
    return retriever_from_checkpoint(ckpt), checkpoint_recipe(ckpt)["data"]


def test_features(model, data_args: dict[str, Any], device: str | torch.device = "cpu"
                  ) -> tuple[TextFeatures, VideoFeatures, torch.Tensor, dict]:
    """The test split encoded by ``model`` (moved to ``device``) with its own data settings:
    text, video, caption_video, annotations (with the captions' ``tokens``), all on ``device``."""
    data = VideoTextDataModule(**{**data_args, "num_workers": 0})
    data.prepare_data()
    data.setup("test")
    videos, captions = data.test_dataloader()
    model.to(device).eval()
    with torch.inference_mode():
        video = VideoFeatures.cat([model.prepare_gallery(model.encode_video(
            normalize_frames(b["frames"].to(device), b["frame_mask"]), b["frame_mask"].to(device))) for b in videos])
        text = TextFeatures.cat([model.encode_text(b["tokens"].to(device)) for b in captions])
        caption_video = torch.cat([b["video_index"] for b in captions])
        tokens = torch.cat([b["tokens"] for b in captions]).to(device)
    return text, video, caption_video, {**data.eval_annotations("test"), "tokens": tokens}


def accuracy(similarity: torch.Tensor, caption_video: torch.Tensor, annotations: dict) -> dict[str, float]:
    metrics = retrieval_metrics(similarity, caption_video)
    pairs = pair_metrics(similarity, caption_video, annotations["caption_kind"], annotations["video_partner"])
    return {"t2v_R@1": metrics["t2v/R@1"], "t2v_R@5": metrics["t2v/R@5"],
            "temporal_pair_acc": pairs.get("temporal/pair_acc")}


def frontier_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (recaller, reranker, k, gallery N): accuracy on the test split, ms/query at N.

    ``k = 0`` is the pure recaller (timed alone, its own text tower) and ``k = N`` the pure
    re-ranker (timed alone): the frontier's two ends at each N, accuracy measured with every test
    video re-ranked. In between, the two-stage retriever with each ``-k`` below the test size
    (a k that the test split cannot tell from the re-ranker is left out, logged).
    """
    methods = {m: load_compared(args.compare_dir, m) for m in {*args.recallers, *args.rerankers}}
    encoded = {m: test_features(model, data, args.device) for m, (model, data) in methods.items()}
    base = {"device": device_name(torch.device(args.device)), "dtype": "fp32", "threads": torch.get_num_threads(),
            "batch": 1, "torch": torch.__version__, "vtr": retrieval.__version__}
    rows = []

    def timed(model, tokens, video, n: int) -> dict[str, Any]:
        return time_online(model, tokens, video.repeat_to(n), 1, repeats=args.repeats, warmup=1,
                           max_seconds=args.max_seconds_per_point)

    for recaller in args.recallers:
        for reranker in args.rerankers:
            r_model, rr_model = methods[recaller][0], methods[reranker][0]
            rt, rv, caption_video, annotations = encoded[recaller]
            rrt, rrv, rr_captions, rr_annotations = encoded[reranker]
            if not torch.equal(caption_video, rr_captions):
                raise ValueError(f"{recaller} and {reranker} were trained on different test splits "
                                 f"(their checkpoints' datamodule settings differ): no common frontier")
            pair = TwoStage(r_model, rr_model, 1)
            text, video = join(rt, rrt), join(rv, rrv)
            n_test = len(video)
            ks = [k for k in args.k if k < n_test]
            if len(ks) < len(args.k):
                log.warning("k >= %d (the test split's size) is the re-ranker itself: left out: %s", n_test,
                            [k for k in args.k if k >= n_test])
            points = [(0, r_model, rt, rv, annotations["tokens"][:, :r_model.max_words]),
                      *[(k, pair, text, video, annotations["tokens"][:, :pair.max_words]) for k in ks],
                      (None, rr_model, rrt, rrv, rr_annotations["tokens"][:, :rr_model.max_words])]
            for k, model, t, v, tokens in points:
                if model is pair:
                    pair.k = k
                acc = accuracy(model.similarity(t, v).cpu(), caption_video, annotations)
                for n in [n_test, *args.gallery]:
                    timing = timed(model, tokens, v, n)
                    row_k = n if k is None else k  # k = N: every video re-ranked
                    rows.append({**base, **acc, **timing, "recaller": recaller, "reranker": reranker,
                                 "k": row_k, "gallery": n})
                    log.warning("%s -> %s k=%d N=%d: R@1 %.1f, %.3g ms/query", recaller, reranker, row_k, n,
                                acc["t2v_R@1"], timing["ms_per_query_median"])
    return rows


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> Path:
    """t2v R@1 against ms/query, one panel per gallery size, one line per pair along k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    galleries = sorted({int(r["gallery"]) for r in rows})
    fig, axes = plt.subplots(1, len(galleries), figsize=(5 * len(galleries), 4.5), squeeze=False)
    for ax, n in zip(axes[0], galleries):
        for pair in sorted({(r["recaller"], r["reranker"]) for r in rows}):
            points = sorted((int(r["k"]), float(r["ms_per_query_median"]), float(r["t2v_R@1"])) for r in rows
                            if (r["recaller"], r["reranker"]) == pair and int(r["gallery"]) == n)
            if not points:
                continue
            line, = ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=f"{pair[0]} -> {pair[1]}")
            ax.plot(points[0][1], points[0][2], "s", color=line.get_color(), markersize=9)  # the pure recaller
            ax.plot(points[-1][1], points[-1][2], "*", color=line.get_color(), markersize=12)  # the pure re-ranker
            for k, ms, r1 in points[1:-1]:
                ax.annotate(str(k), (ms, r1), fontsize=6)
        ax.set(xscale="log", xlabel="ms per query (batch 1)", ylabel="t2v R@1 (%)", title=f"gallery N = {n:,}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, title="square: recaller alone, star: re-ranker alone", title_fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``vtr bench frontier``'s options."""
    p = sub.add_parser("frontier", help="two-stage (fusion-free recall, re-rank) accuracy vs ms/query per k and N",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare-dir", type=Path, required=True, help="a `vtr compare --out` folder")
    p.add_argument("--recallers", nargs="+", default=["clip2video", "prompt_switch"])
    p.add_argument("--rerankers", nargs="+", default=["xclip", "glccl"])
    p.add_argument("-k", type=int, nargs="+", default=list(KS))
    p.add_argument("--gallery", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                   help="tiled galleries (the test gallery is always timed)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds-per-point", type=float, default=30.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (committed: experiments/results)")
    p.set_defaults(tool=__name__)


def run(args: argparse.Namespace) -> None:
    """``vtr bench frontier``: CSV and plot named by device and versions."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.compare_dir.is_dir():
        raise SystemExit(f"vtr bench frontier: --compare-dir {args.compare_dir} is not a folder")
    if min(args.k) < 1:
        raise SystemExit("vtr bench frontier: -k values must be >= 1")
    path = args.out / result_filename("frontier", torch.device(args.device), "fp32", torch.get_num_threads())
    all_rows = merge_rows(path, frontier_rows(args), COLUMNS, ROW_KEY)
    png = plot_frontier(all_rows, path.with_suffix(".png"))
    print(f"wrote {path} and {png}")


