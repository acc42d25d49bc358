"""The ``vtr`` command.

- ``vtr fit | validate | test | predict``: LightningCLI over any ``RetrievalModule`` subclass
  (swap methods with ``--model.class_path`` or a YAML under ``experiments/model/``) and the one
  ``VideoTextDataModule``. Checkpoints are selected on ``val/t2v_R1``, never on test.
- ``vtr compare | bench | index | search | sweep | prepare``: the framework's tools (``vtr TOOL --help``).
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from retrieval.data.datamodule import VideoTextDataModule
from retrieval.module import RetrievalModule
from retrieval.postprocess import Postprocess

TOOLS = {
    "compare": "retrieval.bench.compare",
    "bench": "retrieval.bench.latency",
    "index": "retrieval.bench.index",
    "search": "retrieval.bench.index",
    "sweep": "retrieval.bench.sweep",
    "prepare": "retrieval.tools.prepare",
}
SUBTOOLS = {("bench", "loader"): "retrieval.bench.loader"}  # `vtr bench loader`: its own module


class VTRCLI(LightningCLI):
    """LightningCLI with vtr's defaults: CSV logs under ``runs/``, selection on validation R@1."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Postprocess, "postprocess")  # --postprocess.dsl / .qb_norm: labelled test rows
        parser.set_defaults(
            {
                "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            }
        )


def lightning_main(args: list[str] | None = None) -> VTRCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    return VTRCLI(
        RetrievalModule,
        VideoTextDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [
                ModelCheckpoint(monitor="val/t2v_R1", mode="max", save_last=True, filename="best-{epoch}-{step}"),
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
