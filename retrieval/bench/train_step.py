"""``vtr bench train``: training throughput (clips/s) and model FLOP utilisation per method.

One training step is the method's own ``training_step`` (its encoders, contrastive loss and
auxiliary losses; ``self.log`` is a no-op outside a Trainer) under autocast at ``--precision``
with fp32 weights (Lightning's ``bf16-mixed``), ``backward``, the logit-scale clamp of
``on_train_batch_end``, and a fused AdamW step over the trainable parameters with the recipe's
optimiser settings (its parameter groups' learning rates and decay do not change the cost; the
scheduler is left out). Inputs are random frames at the backbone's image size and tokenized
captions, ``--batch`` clip-caption pairs of ``--frames`` frames (default: the recipe's).

FLOPs are counted once, on an untimed step, by ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention, forward and backward; elementwise ops and the optimiser
are not counted, so MFU is the usual "model FLOPs" utilisation). ``MFU = FLOPs per step /
median step time / --peak-tflops``. The default peak, 989 TFLOP/s, is NVIDIA's dense BF16
Tensor Core figure for the H100 SXM and H200 (datasheets: 1,979 TFLOP/s "with sparsity", half
of it dense); give the right one for another device or precision.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import retrieval
from retrieval.recipes import build_retriever, read_recipe, tokenize
from retrieval.bench.floors import time_steps
from retrieval.bench.results import DEFAULT_OUT, device_name, merge_rows, result_filename
from retrieval.training import RetrievalModule

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
H200_BF16_DENSE_TFLOPS = 989.0
COLUMNS = ("method", "backbone", "batch", "num_frames", "device", "precision", "threads", "step_ms_median",
           "step_ms_p10", "step_ms_p90", "steps", "clips_per_s", "tflop_per_step", "achieved_tflops", "peak_tflops",
           "mfu", "peak_mem_mb", "torch", "vtr")
ROW_KEY = ("method", "backbone", "batch", "num_frames", "device", "precision", "threads")


def random_batch(model: RetrievalModule, batch: int, frames: int, device: torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` pairs in the datamodule's contract: random frames, real captions' tokens, distinct videos."""
    from retrieval.bench.latency import CAPTIONS  # latency imports this package's siblings

    g = torch.Generator().manual_seed(seed)
    size = model.retriever.clip.image_size
    tokens = tokenize(model.retriever, CAPTIONS)[torch.arange(batch) % len(CAPTIONS)]
    return {"frames": torch.randn(batch, frames, 3, size, size, generator=g).to(device),
            "frame_mask": torch.ones(batch, frames, dtype=torch.bool, device=device),
            "tokens": tokens.to(device), "video_index": torch.arange(batch, device=device),
            "caption_index": torch.arange(batch, device=device)}


def make_step(model: RetrievalModule, batch: dict[str, torch.Tensor], precision: str) -> Callable[[], float]:
    """One training step of ``model`` on ``batch`` (module docstring); returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=model.optim.lr, betas=model.optim.betas, eps=model.optim.eps,
                                  weight_decay=model.optim.weight_decay,
                                  fused=device.type in ("cpu", "cuda") or None)
    dtype = PRECISIONS[precision]
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        model.on_train_batch_end(loss, batch, 0)
        return loss.detach()

    return step


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs ``FlopCounterMode`` counts in one call of ``step`` (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bench_train(name: str, model: RetrievalModule, args: argparse.Namespace, frames: int) -> dict[str, Any]:
    """One row: ``model``'s training step timed and its FLOPs counted."""
    device = torch.device(args.device)
    model.to(device)
    batch = random_batch(model, args.batch, frames, device)
    step = make_step(model, batch, args.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, args.warmup, args.steps)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    flops = count_flops(step)
    median = statistics.median(times)
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
    achieved = flops / median / 1e12
    return {"method": name, "backbone": model.retriever.clip.name, "batch": args.batch, "num_frames": frames,
            "device": device_name(device), "precision": args.precision, "threads": torch.get_num_threads(),
            "step_ms_median": 1e3 * median, "step_ms_p10": 1e3 * quantiles[0], "step_ms_p90": 1e3 * quantiles[-1],
            "steps": len(times), "clips_per_s": args.batch / median, "tflop_per_step": flops / 1e12,
            "achieved_tflops": achieved, "peak_tflops": args.peak_tflops, "mfu": achieved / args.peak_tflops,
            "peak_mem_mb": peak_mem, "torch": torch.__version__, "vtr": retrieval.__version__}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``vtr bench train``'s options."""
    p = sub.add_parser("train", help="training clips/s and MFU of one step per method (forward, backward, AdamW)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=[], help="recipe YAML (repeatable)")
    p.add_argument("--all", action="store_true", help="every recipe in --recipes-dir")
    p.add_argument("--recipes-dir", type=Path, default=Path("experiments/model"))
    p.add_argument("--backbone", default=None, help="replace the recipe's backbone (e.g. vtr-micro)")
    p.add_argument("--batch", type=int, default=32, help="clip-caption pairs per step")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the recipe's num_frames)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16", help="autocast dtype (fp32 weights)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="the device's peak TFLOP/s at --precision for MFU (default: H100/H200 SXM dense BF16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (committed: experiments/results)")
    p.set_defaults(tool=__name__)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``vtr bench train``: one CSV row per recipe, named by device, precision and versions."""
    configs = list(args.config) + (sorted(args.recipes_dir.glob("*.yaml")) if args.all else [])
    if not configs:
        raise SystemExit("vtr bench train: give --config RECIPE.yaml (repeatable) or --all")
    for option in ("batch", "steps", "frames"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise SystemExit(f"vtr bench train: --{option} must be >= 1, got {getattr(args, option)}")
    if args.warmup < 0 or args.peak_tflops <= 0:
        raise SystemExit("vtr bench train: --warmup must be >= 0 and --peak-tflops > 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vtr bench train: --device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"pretrained": None, **({"backbone": args.backbone} if args.backbone else {})}
    path = args.out / result_filename("train", device, args.precision, torch.get_num_threads())
    rows = []
    for config in configs:
        recipe = read_recipe(config)
        frames = args.frames or (recipe["model"]["retriever"].get("init_args") or {}).get("num_frames", 12)
        retriever = build_retriever(recipe["model"]["retriever"], {**overrides, **({"num_frames": frames} if args.frames else {})})
        model = RetrievalModule(retriever, recipe["model"]["optim"])  # the recipe's optimiser (a dict is read as OptimConfig)
        with warnings.catch_warnings():  # training_step's self.log outside a Trainer
            warnings.filterwarnings("ignore", message=".*self.log.*")
            rows.append(bench_train(config.stem, model, args, frames))
        r = rows[-1]
        print(f"{config.stem}: {r['step_ms_median']:.1f} ms/step, {r['clips_per_s']:.1f} clips/s, "
              f"{r['tflop_per_step']:.3g} TFLOP/step, MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s")
        merge_rows(path, rows, COLUMNS, ROW_KEY)  # keep what is measured if a later method fails
        del model
    print(f"wrote {path}")
    return rows
