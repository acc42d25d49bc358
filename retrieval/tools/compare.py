"""``vtr compare``: every method trained, scored and timed the same way, in one run on a CPU.

For each recipe under ``experiments/model/`` (methods are data: a new YAML joins without
editing this file) the method keeps its class and paper hyperparameters, and the preset
supplies what must be equal for a fair comparison: the backbone (``vtr-tiny`` pretrained once
on synthetic frames, :mod:`retrieval.pretrain`), the learning rates, the step budget, the
batch (both clips of a pair in it), the data and the seed. Each method is

1. fine-tuned for ``steps`` steps on the synthetic train split, validated every
   ``val_every`` steps, and the checkpoint with the best validation t2v R@1 is kept (never
   selected on test);

   the default preset freezes the CLIP vision tower (CLIP4Clip's ``freeze_layer_num`` at its
   maximum): every method's own modules, the text tower and everything a method places inside
   the ViT (Prompt Switch's cube and aggregation, STAN's branch) still train, and training
   frames are sampled uniformly (X-Pool's choice). Why, measured on this CPU with SeqTransf,
   300 steps, temporal pair accuracy on validation: frozen tower, uniform frames, batch 64:
   76 %; the tower fine-tuned at clip_lr 1e-4: 61 % (and 25 % more time per step); fine-tuned
   at 1e-5 with random frames: 73 %, but static R@1 fell from 52 to 35 (the text tower then
   learns too slowly); frozen with random frames at batch 32: 64 %. Reproduce with the flags
   below (``--no-freeze-vision --clip-lr --train-sampling --batch-size --steps``);
2. evaluated on the test split: t2v R@1/R@5, R@1 of static and of temporal captions, and
   temporal **pair accuracy** (the caption scores its own clip strictly above its partner; an
   order-blind model sits at 50 %); with ``--dsl`` / ``--qb-norm`` also the post-processed
   rows ``t2v+DSL_R@1``, ``v2t+DSL_R@1`` (DSL uses all test queries at once) and ``t2v+QB_R@1``
   (QB-Norm's querybank: ``--querybank-size`` training captions against the test gallery),
   as extra columns beside the plain ones (:mod:`retrieval.postprocess`);
3. timed online (``encode_text + score + top-k``) over the test gallery and over a gallery of
   ``tiled_gallery`` videos tiled from its real test features, and offline (``encode_video``).

The default preset's budget (≤ 15 minutes for all nine methods on a 2-core CPU, pretraining
cached) is spent on steps, because accuracy is still climbing at 300: ``vtr compare --steps 200``
(with the earlier 8 frames and 32 tokens) lost 6-24 points of pair accuracy against 300 steps
(SeqTransf 77 -> 53, GLCCL 82 -> 61, CLIP2Video 99 -> 93). So the cost
per step is cut instead, without changing what a method learns: 6 frames per video (8 before:
a third less vision and temporal work; the synthetic events span the clip), 16 caption tokens
(the longest synthetic caption has 13, so no caption is cut; X-CLIP's and GLCCL's L x L and
L x T terms shrink 2-4x), validation on 200 videos at steps 150 and 300. The cost is
dominated by tightTransf (B^2 pair sequences through 4 cross layers) and Prompt Switch (its
captioner's 49,408-way vocabulary head): see the train minutes in the README's table.

Outputs in ``--out``: ``results.csv``, ``results.png`` (pair accuracy against ms/query) and
each method's Lightning logs and checkpoints; ``--wandb`` also logs the table and the plot to a
wandb run (offline unless ``--wandb online``); ``vtr results`` collects the folder with others.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table

from retrieval.recipes import build_retriever, read_recipe
from retrieval.bench.timing import time_offline, time_online
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.retriever import Retriever
from retrieval.tools.index import encode_split
from retrieval.tools.wandb_log import MODES, log_tables
from retrieval.training import FreezeVisionTower, OptimConfig, RetrievalModule
from retrieval.postprocess import Postprocess
from retrieval.pretrain import PretrainConfig, pretrained_backbone

log = logging.getLogger(__name__)
console = Console()

COLUMNS = (
    "method", "fusion_free", "t2v_R@1", "t2v_R@5", "static_R@1", "temporal_R@1", "temporal_pair_acc",
    "ms_per_query_test", "ms_per_query_tiled", "offline_ms_per_video", "train_minutes",
)


LOGGED = {  # results.csv column -> the metric RetrievalModule logs under test/
    "t2v_R@1": "t2v/R@1", "t2v_R@5": "t2v/R@5", "static_R@1": "static/R@1", "temporal_R@1": "temporal/R@1",
    "temporal_pair_acc": "temporal/pair_acc",
}
POSTPROCESSED = {  # the labelled post-processing columns, present when asked for
    "t2v+DSL_R@1": "t2v+DSL/R@1", "v2t+DSL_R@1": "v2t+DSL/R@1", "t2v+QB_R@1": "t2v+QB/R@1",
}
HEADERS = {
    **{column: column.replace("_", " ") for column in POSTPROCESSED},
    "method": "method", "fusion_free": "fusion-free", "t2v_R@1": "R@1", "t2v_R@5": "R@5", "static_R@1": "static R@1",
    "temporal_R@1": "temporal R@1", "temporal_pair_acc": "pair acc", "ms_per_query_test": "ms/q test",
    "ms_per_query_tiled": "ms/q tiled", "offline_ms_per_video": "enc ms/video", "train_minutes": "train min",
}


@dataclass(frozen=True)
class Preset:
    """Everything ``vtr compare`` holds equal across methods."""

    num_train: int = 4000
    num_val: int = 200
    num_test: int = 400
    pretrain: PretrainConfig = PretrainConfig()
    steps: int = 300
    val_every: int = 150
    batch_size: int = 64
    num_frames: int = 6
    max_words: int = 16
    train_sampling: str = "uniform"
    freeze_vision_tower: bool = True
    optim: OptimConfig = OptimConfig(lr=3e-3, clip_lr=1e-4, weight_decay=0.05, warmup_ratio=0.05)
    tiled_gallery: int = 10_000
    timing_repeats: int = 5


PRESETS = {
    "default": Preset(),
    "smoke": Preset(num_train=48, num_val=24, num_test=24, pretrain=PretrainConfig(steps=4, batch_size=32, num_frames=256),
                    steps=4, val_every=2, batch_size=8, tiled_gallery=1000, timing_repeats=2),
}


def recipes(methods_dir: Path, names: list[str] | None) -> list[tuple[Path, ...]]:
    """The recipes to compare: all of ``methods_dir``, or the named ones. A name is a recipe's
    stem or path, or ``RECIPE+VARIANT.yaml[+...]`` (a recipe and its variants, merged in order)."""
    if names:
        return [tuple(Path(p) if p.endswith(".yaml") else methods_dir / f"{p}.yaml" for p in n.split("+"))
                for n in names]
    found = sorted(methods_dir.glob("*.yaml"))
    if not found:
        raise FileNotFoundError(f"no method recipes (*.yaml) in {methods_dir}")
    return [(path,) for path in found]


def method_name(paths: tuple[Path, ...]) -> str:
    """A recipe's stem, with its variants' stems: ``prompt_switch+prompt_switch_no_captioner``."""
    return "+".join(path.stem for path in paths)


def run_method(recipe_paths: tuple[Path, ...], preset: Preset, backbone_ckpt: Path, data_root: Path, out: Path, seed: int,
               postprocess: Postprocess | None = None) -> dict:
    """Fine-tune, select on validation, test and time one method; returns its results row
    (with the DSL / QB-Norm rows that ``postprocess`` asks for)."""
    recipe = read_recipe(*recipe_paths)
    name = method_name(recipe_paths)
    fixed = recipe["data"]
    # methods whose paper fixes its own frame sampling (Prompt Switch: 6 train / 12 test frames
    # in chunks of 6) keep it; every other method samples the preset's frame count
    if fixed.get("frame_segments"):
        frames = {k: fixed[k] for k in ("num_frames", "eval_num_frames", "frame_segments") if k in fixed}
    else:
        frames = {"num_frames": preset.num_frames}
    frames["frame_sampler"] = fixed["frame_sampler"]  # the official sampler a recipe restates (Prompt Switch, STAN)
    frames["drop_duplicate_videos"] = fixed["drop_duplicate_videos"]  # Prompt Switch's official collate
    data = VideoTextDataModule(
        dataset="synthetic", root=str(data_root), backbone="vtr-tiny", max_words=preset.max_words, batch_size=preset.batch_size,
        eval_batch_size=128, num_workers=0, cache_frames=True, pair_batches=True, train_sampling=preset.train_sampling,
        seed=seed, synthetic_seed=seed,
        synthetic_num_train=preset.num_train, synthetic_num_val=preset.num_val, synthetic_num_test=preset.num_test,
        **frames,
    )
    overrides = {"backbone": "vtr-tiny", "pretrained": str(backbone_ckpt), "num_frames": frames["num_frames"],
                 "max_words": preset.max_words}
    retriever = build_retriever(recipe["model"]["retriever"], overrides, seed=seed)
    model = RetrievalModule(retriever, optim=preset.optim).train()
    checkpoint = ModelCheckpoint(dirpath=out / name / "checkpoints", monitor="val/t2v_R1", mode="max",
                                 filename="best", save_top_k=1, enable_version_counter=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=preset.steps, val_check_interval=preset.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, gradient_clip_val=None, deterministic=True,
        logger=CSVLogger(out, name=name, version=""), enable_model_summary=False,
        callbacks=[checkpoint, *([FreezeVisionTower()] if preset.freeze_vision_tower else []),
                   *([postprocess] if postprocess else [])],
    )
    console.rule(f"[bold]{name}[/] ({recipe['model']['retriever']['class_path']})")
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer.fit(model, data)
    train_minutes = (time.perf_counter() - start) / 60
    trainer.test(model, data, ckpt_path=checkpoint.best_model_path or None, verbose=False)
    logged = trainer.callback_metrics
    row = {"method": name, "fusion_free": retriever.fusion_free, "train_minutes": train_minutes}
    row.update({column: float(logged[f"test/{key}"]) for column, key in LOGGED.items()})
    row.update({column: float(logged[f"test/{key}"]) for column, key in POSTPROCESSED.items() if f"test/{key}" in logged})
    row.update(_timings(retriever.eval(), data, preset))
    return row


def _timings(model: Retriever, data: VideoTextDataModule, preset: Preset) -> dict[str, float]:
    _, video = encode_split(model, data, "test")  # the gallery the test scored, with the selected weights
    videos, captions = data.test_dataloader()
    tokens, batch = next(iter(captions))["tokens"], next(iter(videos))
    online = {
        "ms_per_query_test": time_online(model, tokens, video, batch_size=1, repeats=preset.timing_repeats),
        "ms_per_query_tiled": time_online(model, tokens, video.repeat_to(preset.tiled_gallery), batch_size=1,
                                          repeats=preset.timing_repeats),
    }
    offline = time_offline(model, batch["frames"][:32], batch["frame_mask"][:32], batch_size=32,
                           repeats=max(1, preset.timing_repeats // 5))
    return {**{k: v["ms_per_query_median"] for k, v in online.items()}, "offline_ms_per_video": offline["ms_per_video"]}


def write_outputs(rows: list[dict], out: Path, tiled: int) -> None:
    """``results.csv`` and ``results.png`` in ``out``; the table on the console."""
    columns = [*COLUMNS, *(c for c in POSTPROCESSED if any(c in row for row in rows))]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title=f"vtr compare ({out})")
    for column in columns:
        table.add_column(HEADERS[column], justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*[f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    Console(width=max(console.width, 132)).print(table)
    _plot(rows, out / "results.png", tiled)


def _plot(rows: list[dict], path: Path, tiled: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        colour = "tab:blue" if row["fusion_free"] else "tab:red"
        ax.scatter(row["ms_per_query_tiled"], row["temporal_pair_acc"], color=colour, s=50)
        ax.annotate(row["method"], (row["ms_per_query_tiled"], row["temporal_pair_acc"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per query over {tiled:,} videos (encode_text + score + top-k, CPU)")
    ax.set_ylabel("temporal pair accuracy (%)")
    ax.set_title("fusion-free (blue) vs text-conditioned (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """``vtr compare [--preset default|smoke] [--methods NAME ...] [--out DIR] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="vtr compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--methods", nargs="*", help="recipe names or paths (default: every experiments/model/*.yaml)")
    parser.add_argument("--methods-dir", type=Path, default=Path("experiments/model"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the preset's fine-tuning steps per method")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--lr", type=float, help="override the preset's new-module learning rate")
    parser.add_argument("--clip-lr", type=float, help="override the preset's CLIP learning rate")
    parser.add_argument("--train-sampling", choices=("uniform", "random"), help="override the preset's frame sampling")
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                        help="freeze CLIP's vision tower (default: the preset's choice)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--dsl", action="store_true", help="also report t2v+DSL / v2t+DSL (uses all test queries at once)")
    parser.add_argument("--qb-norm", action="store_true", help="also report t2v+QB (QB-Norm, querybank of training captions)")
    parser.add_argument("--querybank-size", type=int, default=5000, help="training captions in QB-Norm's querybank")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument("--wandb", nargs="?", const="offline", choices=MODES,
                        help="also log the table and plot to wandb (offline unless 'online')")
    args = parser.parse_args(argv[1:] if argv and argv[0] == "compare" else argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, steps=args.steps, val_every=min(preset.val_every, args.steps))
    optim = {k: v for k, v in (("lr", args.lr), ("clip_lr", args.clip_lr)) if v is not None}
    changes = {"batch_size": args.batch_size, "train_sampling": args.train_sampling,
               "freeze_vision_tower": args.freeze_vision, "optim": replace(preset.optim, **optim)}
    preset = replace(preset, **{k: v for k, v in changes.items() if v is not None})
    paths = recipes(args.methods_dir, args.methods)
    if (args.out / "results.csv").exists() and not args.overwrite:
        parser.error(f"{args.out / 'results.csv'} holds an earlier run: pass --overwrite to replace it, or another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]vtr compare[/]: preset {args.preset}, {len(paths)} methods, seed {args.seed} -> {args.out}")
    backbone = pretrained_backbone(preset.pretrain)  # cached under $VTR_CACHE (default ~/.cache/vtr)
    data = VideoTextDataModule(dataset="synthetic", synthetic_num_train=preset.num_train,
                               synthetic_num_val=preset.num_val, synthetic_num_test=preset.num_test, synthetic_seed=args.seed)
    data.prepare_data()
    data_root = data.root
    postprocess = (Postprocess(dsl=args.dsl, qb_norm=args.qb_norm, querybank_size=args.querybank_size, seed=args.seed)
                   if args.dsl or args.qb_norm else None)
    rows = [run_method(path, preset, backbone, data_root, args.out, args.seed, postprocess) for path in paths]
    write_outputs(rows, args.out, preset.tiled_gallery)
    if args.wandb:
        log_tables(f"compare-{args.out.name}", {"compare/results": rows}, {"compare/plot": args.out / "results.png"},
                   args.wandb, directory=args.out, config={"preset": asdict(preset), "seed": args.seed})
    return rows
