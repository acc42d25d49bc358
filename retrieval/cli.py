"""The ``vtr`` command.

- ``vtr fit | validate | test``: LightningCLI over the one ``RetrievalModule`` with any
  ``Retriever`` (swap methods with ``--model.retriever.class_path`` or a recipe YAML under
  ``experiments/model/``; a variant is a second ``--config`` with only its change) and the one
  ``VideoTextDataModule``. Checkpoints are selected on ``val/t2v_R1``, never on test.
- ``vtr compare | bench | index | search | sweep | prepare | pretrain``: the framework's tools
  (``vtr TOOL --help``). Per-video features of a split are ``vtr index`` (there is no
  ``vtr predict``).

What the CLI adds to LightningCLI:

- the data's ``backbone``, ``num_frames`` and ``max_words`` are the retriever's (linked: set them
  once, under ``model.retriever.init_args``), and so is ``eval_num_frames`` for a method that fixes it;
- each run keeps its ``config.yaml`` in its own folder, beside its logs and checkpoints, and
  never writes over another run's;
- ``checkpoints/last.ckpt`` is rewritten at every validation, and ``--ckpt_path last`` is the
  newest one of a run with the same model, data, seed and logger name (an error if there is
  none), or, under SLURM, the ``hpc_ckpt_N.ckpt`` that Lightning's auto-requeue saved in
  ``default_root_dir`` at the requeue signal when it is newer and continues that run. ``fit``
  continues that run where it stopped, mid-epoch included (``PairBatchSampler`` restores its
  position, ``RetrievalModule`` the torch random states): with deterministic training frames
  (``train_sampling: uniform``) the weights end bit-identical to an uninterrupted run; with
  random frames the batches are the same but some of their frames are drawn anew (Lightning
  fetches the first resumed batch before the random states are back). Its checkpoints,
  selection state included, stay in the run's ``checkpoints/``; the resumed part logs to a new
  folder with its own config (CSVLogger would delete the old metrics).
- ``fit --test_after_fit true`` tests the checkpoint selected on validation (the first
  ``ModelCheckpoint`` monitoring a ``val/`` metric) in the same process, into the same logger;
  that and ``vtr test`` end by writing ``test_results.json`` in the run's folder (the tested
  checkpoint, the monitor that selected it, the test metrics): the mark of a finished run that
  ``vtr sweep`` skips and ``vtr results`` collects;
- with a wandb logger the whole config is logged to the wandb run too (rank 0; Lightning's
  loggers log only on rank 0 under DDP).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from retrieval.data.datamodule import MODEL_SETTINGS, VideoTextDataModule
from retrieval.training import RetrievalModule
from retrieval.postprocess import Postprocess

TOOLS = {
    "compare": "retrieval.tools.compare",
    "bench": "retrieval.bench.latency",
    "index": "retrieval.tools.index",
    "search": "retrieval.tools.search",
    "sweep": "retrieval.tools.sweep",
    "results": "retrieval.tools.results",
    "prepare": "retrieval.tools.prepare",
    "pretrain": "retrieval.pretrain",
}
SUBTOOLS = {("bench", "loader"): "retrieval.bench.loader"}  # `vtr bench loader`: its own module
DESCRIPTION = ("Train, evaluate and time CLIP-based text-video retrievers. Lightning subcommands: fit, validate, "
               "test (vtr SUBCOMMAND --help); vtr's tools below.")
TOOLS_HELP = """tools (vtr TOOL --help):
  compare   every method fine-tuned, tested and timed the same way (--preset smoke: a quick check)
  bench     latency (per-query time against gallery size, beside the compute and read floors) | metrics | loader
  index     encode the videos of a split once: the offline per-video features, written to a file
  search    rank an index's videos for typed queries
  sweep     a grid of `vtr fit` runs, each tested on its val-selected checkpoint, resumable (experiments/sweeps/)
  results   one table (mean ± std over seeds, 95 % CI) from finished runs, compare and sweep folders
  prepare   re-encode a video folder as the CLIP4Clip lineage does (3 fps, short side 224)
  pretrain  print the path of the vtr-tiny pretrained on synthetic frames (building it on first use)"""


class _Help(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """``vtr --help`` keeps the tools list as written."""


def run_folder(trainer) -> Path:
    """Where a run's checkpoints, logs and config go: ``save_dir/name/version`` of the first
    logger (Lightning's rule for checkpoints), ``default_root_dir`` without a logger."""
    if not trainer.loggers:
        folder = trainer.default_root_dir
    else:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return Path(trainer.strategy.broadcast(folder))


class RunConfig(SaveConfigCallback):
    """Saves the run's config in :func:`run_folder` (not the logger's ``save_dir``, where every
    wandb run would write the same file); an existing one is an error, never overwritten."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        path = run_folder(trainer) / self.config_filename
        exists = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
        if exists:
            raise RuntimeError(f"{path} holds the config of another run; give this run its own folder "
                               "(trainer.logger.init_args.save_dir or version)")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, multifile=self.multifile)
            wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
            if wandb_loggers:  # the whole config, beside the module's hyperparameters, in the wandb run's config
                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                for logger in wandb_loggers:
                    logger.log_hyperparams({"vtr": config})
        self.already_saved = True


class VTRCLI(LightningCLI):
    """LightningCLI with vtr's defaults: CSV logs under ``runs/``, selection on validation R@1,
    the model's shapes linked into the data, runs that keep their folder."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (per-video features of a split: ``vtr index``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Postprocess, "postprocess")  # --postprocess.dsl / .qb_norm: labelled test rows
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit: then test the checkpoint selected on validation (and write test_results.json)")
        parser.set_defaults(
            {
                "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            }
        )
        for key in MODEL_SETTINGS:
            parser.link_arguments(f"model.retriever.init_args.{key}", f"data.{key}")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._refuse_linked_data_settings(config)
        self._link_eval_frames(config)
        if config.get("ckpt_path") == "last":
            self._resolve_last(config)

    def after_instantiate_classes(self) -> None:
        self._check_eval_frames()

    # ------------------------------------------------------------------ test after fit, the finished mark
    def after_fit(self) -> None:
        """``--test_after_fit``: test the checkpoint selected on validation, never on test."""
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        selectors = [c for c in self.trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and str(c.monitor or "").startswith("val/")]
        if not selectors or not selectors[0].best_model_path:
            raise RuntimeError("--test_after_fit: no checkpoint was selected on a val/ metric (did validation run?)")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=selectors[0].best_model_path)
        self.after_test()

    def after_test(self) -> None:
        """``test_results.json`` in the run's folder: what was tested, selected by what, and the
        test metrics (rank 0)."""
        folder = run_folder(self.trainer)
        if not self.trainer.is_global_zero:
            return
        from retrieval.selection import TEST_RESULTS, selected_by

        ckpt = self.trainer.ckpt_path
        record = {
            "checkpoint": str(ckpt) if ckpt else None,
            "monitor": selected_by(ckpt) if ckpt else None,
            "seed": self.config[self.subcommand].get("seed_everything"),
            "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")},
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TEST_RESULTS).write_text(json.dumps(record, indent=1) + "\n")

    # ------------------------------------------------------------------ linked settings
    def _error(self, message: str) -> None:
        self._parser(self.subcommand).error(message)

    def _refuse_linked_data_settings(self, config) -> None:
        """A config file's ``data.num_frames`` (etc.) would be dropped silently by the link: refuse
        it unless it equals the model's value (configs saved by older runs hold both)."""
        for path in config.get("config") or []:
            loaded = yaml.safe_load(Path(path.absolute).read_text())
            data = loaded.get("data") if isinstance(loaded, dict) else None
            for key in MODEL_SETTINGS:
                model_value = config.model.retriever.init_args.get(key)
                if isinstance(data, dict) and key in data and data[key] != model_value:
                    self._error(f"{path}: data.{key}={data[key]!r} contradicts model.retriever.init_args.{key}="
                                f"{model_value!r}; data.{key} is the model's (linked): set "
                                f"model.retriever.init_args.{key} only")

    def _link_eval_frames(self, config) -> None:
        """A method with its own ``eval_num_frames`` (Prompt Switch) sets the data's; every
        frame count must split into ``data.frame_segments``."""
        retriever = config.model.retriever.init_args
        model_frames = retriever.get("eval_num_frames")
        eval_option = "data.eval_num_frames"
        if model_frames is not None:
            eval_option = "model.retriever.init_args.eval_num_frames"
            if config.data.eval_num_frames is None:
                config.data.eval_num_frames = model_frames
            elif config.data.eval_num_frames != model_frames:
                self._error(f"data.eval_num_frames={config.data.eval_num_frames} contradicts "
                            f"{eval_option}={model_frames}; set {eval_option} only")
        segments = config.data.frame_segments
        for option, frames in (("model.retriever.init_args.num_frames", retriever.num_frames),
                               (eval_option, config.data.eval_num_frames)):
            if segments and frames and frames % segments:
                self._error(f"{option}={frames} is not a multiple of data.frame_segments={segments}")

    def _check_eval_frames(self) -> None:
        """Run the method's own shape checks on ``data.eval_num_frames`` before any step, so a
        refusal names the data option (X-CLIP's mixing matrices fix the frame count)."""
        frames, model = self.datamodule.eval_num_frames, self.model.retriever
        if frames == model.num_frames:
            return
        size = model.clip.image_size
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model.encode_video(torch.zeros(1, frames, 3, size, size), torch.ones(1, frames, dtype=torch.bool))
        except ValueError as error:
            self._error(f"data.eval_num_frames={frames} does not fit {type(model).__name__} "
                        f"(model.retriever.init_args.num_frames={model.num_frames}): {error}")
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ --ckpt_path last
    def _resolve_last(self, config) -> None:
        """``last`` -> the newest ``last.ckpt`` of a run with this model, data, seed and logger name
        (or a newer SLURM requeue checkpoint of that run); ``fit`` keeps saving into that run's
        ``checkpoints/`` (so its selection state is restored too)."""
        logger = config.trainer.logger
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        root_dir = Path(config.trainer.default_root_dir or os.getcwd())
        if not logger:
            path = root_dir / "checkpoints" / "last.ckpt"
            if not path.is_file():
                self._error(f"--ckpt_path last: there is no {path}")
            config.ckpt_path = str(_newer_hpc_checkpoint(root_dir, path))
            return
        if not hasattr(logger, "class_path"):
            self._error("--ckpt_path last needs trainer.logger given as class_path + init_args (or no logger)")
        module, _, name = logger.class_path.rpartition(".")
        instance = getattr(importlib.import_module(module), name)(**logger.init_args.as_dict())
        root = Path(instance.save_dir or root_dir) / str(instance.name)
        current = self._run_sections(config)
        candidates = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            saved = path.parents[1] / "config.yaml"
            if saved.is_file() and _sections(yaml.safe_load(saved.read_text())) == current:
                break
        else:
            self._error(_no_last_message(root, candidates, current))
        path = _newer_hpc_checkpoint(root_dir, path)
        config.ckpt_path = str(path)
        if self.subcommand == "fit":
            self._continue_checkpoints(path)

    def _continue_checkpoints(self, path: Path) -> None:
        """Point vtr's checkpoint callbacks at the folder they saved ``path`` from (the path as
        Lightning recorded it: it restores a callback's state only into the same ``dirpath``)."""
        states = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("callbacks", {})
        dirpath = next((s["dirpath"] for k, s in states.items() if k.startswith("ModelCheckpoint")), str(path.parent))
        for callback in self.trainer_defaults["callbacks"]:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = dirpath

    def _run_sections(self, config) -> dict[str, Any]:
        return _sections(yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False)))


def _newer_hpc_checkpoint(root_dir: Path, last: Path) -> Path:
    """Lightning's SLURM auto-requeue checkpoint (``hpc_ckpt_N.ckpt`` in ``default_root_dir``,
    saved when the requeue signal came) instead of ``last`` when it is newer and continues the
    same run (its checkpoint callbacks save into the same folder); else ``last``."""
    from retrieval.selection import callback_states

    hpc = sorted(root_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not hpc or hpc[-1].stat().st_mtime <= last.stat().st_mtime:
        return last
    folders = [{s.get("dirpath") for k, s in callback_states(p).items() if k.startswith("ModelCheckpoint")}
               for p in (hpc[-1], last)]
    return hpc[-1] if folders[0] == folders[1] else last


def _sections(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the model and the data sections, the seed and the
    logger's name (a wandb run's name: wandb runs of every name share one folder), flattened."""
    logger = (config.get("trainer") or {}).get("logger")
    name = (logger.get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    sections = {key: config.get(key) for key in ("model", "data", "seed_everything")}
    return _flat({**sections, "logger_name": name})


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}


def _no_last_message(root: Path, candidates: list[Path], current: dict[str, Any]) -> str:
    if not candidates:
        return f"--ckpt_path last: no run under {root} has a last.ckpt to resume (nothing trained yet?)"
    newest = candidates[0]
    saved = newest.parents[1] / "config.yaml"
    if not saved.is_file():
        return f"--ckpt_path last: {saved} is missing, so {newest} cannot be matched; pass --ckpt_path {newest}"
    other = _sections(yaml.safe_load(saved.read_text()))
    differ = sorted(k for k in current.keys() | other.keys() if current.get(k) != other.get(k))
    shown = ", ".join(f"{k.rstrip('.')}: {other.get(k)!r} there, {current.get(k)!r} here" for k in differ[:4])
    return (f"--ckpt_path last: no run under {root} has this model, data, seed and logger name (the newest, "
            f"{newest}, differs in {shown}); pass its path as --ckpt_path to resume it anyway")


def lightning_main(args: list[str] | None = None) -> VTRCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``)."""
    return VTRCLI(
        RetrievalModule,
        VideoTextDataModule,
        seed_everything_default=0,
        save_config_callback=RunConfig,
        parser_kwargs={"prog": "vtr", "description": DESCRIPTION, "epilog": TOOLS_HELP, "formatter_class": _Help},
        trainer_defaults={
            "callbacks": [
                ModelCheckpoint(monitor="val/t2v_R1", mode="max", filename="best-{epoch}-{step}"),
                # the latest state, rewritten at every validation whatever its score (Lightning's
                # save_last follows the best checkpoint only): what --ckpt_path last resumes
                ModelCheckpoint(filename="last", enable_version_counter=False),
                LearningRateMonitor(logging_interval="step"),
            ],
        },
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vtr`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if tuple(args[:2]) in SUBTOOLS:
        importlib.import_module(SUBTOOLS[tuple(args[:2])]).main(args[1:])
        return
    if args and args[0] in TOOLS:
        importlib.import_module(TOOLS[args[0]]).main(args)
        return
    lightning_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
