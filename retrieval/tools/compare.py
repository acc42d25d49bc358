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

Seeds (``--seeds 0 1 2``; default ``--seed``'s one value): each seed generates its own data
(``synthetic_seed=seed``) and initialises and trains every method anew, exactly as a one-seed
run with that ``--seed``. Outputs in ``--out``:

- ``results.csv``: one row per method and seed (``seed`` column), each accuracy with its 95 %
  bootstrap interval over test queries (``_lo`` / ``_hi``: pairs for pair accuracy);
- ``summary.csv``: per method, the mean, ``_std`` (across seeds) and ``_lo`` / ``_hi`` (the
  per-query interval, pooled over seeds, stratified: :mod:`retrieval.tools.compare_stats`);
- ``paired.csv``: each method minus ``--reference`` (default ``meanpool``) on the same test
  queries, t2v R@1 and pair accuracy, per seed and pooled: difference, interval, excludes 0;
- ``results.png``: pair accuracy against ms/query with the intervals (:mod:`.compare_plot`);
- ``provenance.json``: versions, CPU, threads, and the sha256 of the backbone and of each
  seed's generated data: runs are comparable across machines only where these agree;
- with ``--wandb``, the table and the plot also logged to a wandb run (offline unless
  ``--wandb online``); ``vtr results`` collects the folder with others;
- each method's Lightning logs, checkpoint and ``checkpoints/per_query.safetensors`` (the test's
  per-query results) in ``<method>/`` for one seed, ``seed<k>/<method>/`` for several (each
  ``seed<k>`` folder is then a ``vtr bench frontier --compare-dir``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console

from retrieval.bench.timing import time_offline, time_online
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.datasets import FRAME_CACHE
from retrieval.data.transforms import normalize_frames
from retrieval.postprocess import Postprocess
from retrieval.pretrain import PretrainConfig, pretrained_backbone
from retrieval.recipes import build_retriever, read_recipe
from retrieval.retriever import Retriever
from retrieval.tools.compare_report import paired_report, write_outputs
from retrieval.tools.compare_stats import ACCURACY, PER_QUERY_FILE, provenance, query_scores, save_per_query
from retrieval.tools.index import encode_split
from retrieval.tools.wandb_log import MODES, log_tables
from retrieval.training import FreezeVisionTower, OptimConfig, RetrievalModule

log = logging.getLogger(__name__)
console = Console()

COLUMNS = (
    "method", "fusion_free", "t2v_R@1", "t2v_R@5", "static_R@1", "temporal_R@1", "temporal_pair_acc",
    "ms_per_query_test", "ms_per_query_tiled", "offline_ms_per_video", "train_minutes",
    "seed", *(f"{column}_{end}" for column in ACCURACY for end in ("lo", "hi")),
)


LOGGED = {  # results.csv column -> the metric RetrievalModule logs under test/
    "t2v_R@1": "t2v/R@1", "t2v_R@5": "t2v/R@5", "static_R@1": "static/R@1", "temporal_R@1": "temporal/R@1",
    "temporal_pair_acc": "temporal/pair_acc",
}
POSTPROCESSED = {  # the labelled post-processing columns, present when asked for
    "t2v+DSL_R@1": "t2v+DSL/R@1", "v2t+DSL_R@1": "v2t+DSL/R@1", "t2v+QB_R@1": "t2v+QB/R@1",
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
               postprocess: Postprocess | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fine-tune, select on validation, test and time one method; returns its results row
    (with the DSL / QB-Norm rows that ``postprocess`` asks for) and the test's per-query
    results, which are also saved as ``out/<method>/checkpoints/per_query.safetensors``."""
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
    row = {"method": name, "fusion_free": retriever.fusion_free, "train_minutes": train_minutes, "seed": seed}
    for column, key in {**LOGGED, **POSTPROCESSED}.items():
        if column in LOGGED or f"test/{key}" in logged:  # each with its bootstrap interval
            row.update({column + end: float(logged[f"test/{key}{end}"]) for end in ("", "_lo", "_hi")})
    per_query = model.per_query["test"]
    save_per_query(per_query, out / name / "checkpoints" / PER_QUERY_FILE, method=name, seed=str(seed))
    row.update(_timings(retriever.eval(), data, preset))
    return row, per_query


def _timings(model: Retriever, data: VideoTextDataModule, preset: Preset) -> dict[str, float]:
    _, video = encode_split(model, data, "test")  # the gallery the test scored, with the selected weights
    videos, captions = data.test_dataloader()
    tokens, batch = next(iter(captions))["tokens"], next(iter(videos))
    online = {
        "ms_per_query_test": time_online(model, tokens, video, batch_size=1, repeats=preset.timing_repeats),
        "ms_per_query_tiled": time_online(model, tokens, video.repeat_to(preset.tiled_gallery), batch_size=1,
                                          repeats=preset.timing_repeats),
    }
    offline = time_offline(model, normalize_frames(batch["frames"][:32], batch["frame_mask"][:32]),
                           batch["frame_mask"][:32], batch_size=32,
                           repeats=max(1, preset.timing_repeats // 5))
    return {**{k: v["ms_per_query_median"] for k, v in online.items()}, "offline_ms_per_video": offline["ms_per_video"]}


def synthetic_root(preset: Preset, seed: int) -> Path:
    """The seed's generated benchmark (generated on first use, cached under ``$VTR_CACHE``)."""
    data = VideoTextDataModule(dataset="synthetic", synthetic_num_train=preset.num_train,
                               synthetic_num_val=preset.num_val, synthetic_num_test=preset.num_test, synthetic_seed=seed)
    data.prepare_data()
    return data.root


def forget_frames(root: Path) -> None:
    """Drop ``root``'s decoded clips from the process's frame cache (a seed's data is done)."""
    for key in [key for key in FRAME_CACHE if Path(key[0]).is_relative_to(root)]:
        del FRAME_CACHE[key]


def main(argv: list[str] | None = None) -> list[dict]:
    """``vtr compare [--preset default|smoke] [--methods NAME ...] [--out DIR] [--seeds N ...]``;
    returns the results rows (one per method and seed)."""
    parser = argparse.ArgumentParser(prog="vtr compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--methods", nargs="*", help="recipe names or paths (default: every experiments/model/*.yaml)")
    parser.add_argument("--methods-dir", type=Path, default=Path("experiments/model"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--seed", type=int, help="one seed (default 0); the same as --seeds N")
    parser.add_argument("--seeds", type=int, nargs="+", help="train every method once per seed (own data, own init)")
    parser.add_argument("--reference", help="the method every other is paired with on the same queries "
                                            "(default: meanpool, when it is compared)")
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
    parser.add_argument("--paired-only", action="store_true",
                        help="no training: the finished run in --out against --reference, from its per-query results")
    parser.add_argument("--wandb", nargs="?", const="offline", choices=MODES,
                        help="also log the table and plot to wandb (offline unless 'online')")
    options = list(sys.argv[1:] if argv is None else argv)
    options = options[1:] if options[:1] == ["compare"] else options
    args = parser.parse_args(options)
    if args.seed is not None and args.seeds:
        parser.error("pass --seed or --seeds, not both")
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    if len(set(seeds)) < len(seeds):
        parser.error(f"--seeds repeats a seed: {seeds}")
    if args.paired_only:  # a finished run against another reference, from its saved per-query results
        if args.reference is None:
            parser.error("--paired-only needs --reference")
        print(f"wrote {paired_report(args.out, args.reference)}")
        return []

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
    names = [method_name(path) for path in paths]
    if args.reference is not None and args.reference not in names:
        parser.error(f"--reference {args.reference} is not among the compared methods {names}")
    reference = args.reference or ("meanpool" if "meanpool" in names else None)
    if any((args.out / name).exists() for name in ("results.csv", "summary.csv")) and not args.overwrite:
        parser.error(f"{args.out / 'results.csv'} holds an earlier run: pass --overwrite to replace it, or another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]vtr compare[/]: preset {args.preset}, {len(paths)} methods, seeds {seeds} -> {args.out}")
    backbone = pretrained_backbone(preset.pretrain)  # cached under $VTR_CACHE (default ~/.cache/vtr)
    roots = {seed: synthetic_root(preset, seed) for seed in seeds}
    record = provenance(backbone, roots, preset=args.preset, preset_values=asdict(preset), seeds=seeds, methods=names,
                        reference=reference, command=shlex.join(["vtr", "compare", *options]))
    (args.out / "provenance.json").write_text(json.dumps(record, indent=1) + "\n")
    rows, scores = [], {}
    for seed in seeds:
        postprocess = (Postprocess(dsl=args.dsl, qb_norm=args.qb_norm, querybank_size=args.querybank_size, seed=seed)
                       if args.dsl or args.qb_norm else None)
        seed_out = args.out if len(seeds) == 1 else args.out / f"seed{seed}"
        for path in paths:
            row, per_query = run_method(path, preset, backbone, roots[seed], seed_out, seed, postprocess)
            rows.append(row)
            scores[seed, row["method"]] = query_scores(per_query)
        if seed != seeds[-1]:
            forget_frames(roots[seed])
    if reference is None:
        console.print("no paired comparison: meanpool is not compared (name one with --reference)")
    write_outputs(rows, scores, reference, args.out, preset.tiled_gallery, list(COLUMNS), list(POSTPROCESSED))
    if args.wandb:
        log_tables(f"compare-{args.out.name}", {"compare/results": rows}, {"compare/plot": args.out / "results.png"},
                   args.wandb, directory=args.out, config={"preset": asdict(preset), "seeds": seeds})
    return rows
