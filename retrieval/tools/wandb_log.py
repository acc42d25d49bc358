"""The tables and plots of vtr's tools in a wandb run of their own (``vtr results --wandb``,
``vtr compare --wandb``); ``vtr fit`` logs through Lightning's ``WandbLogger``
(``experiments/trainer/wandb.yaml``).

Offline unless asked: ``mode="offline"`` writes the run under ``directory/wandb/offline-run-*``
(``wandb sync`` uploads it later); ``mode="online"`` is the one option that sends it. Under DDP
only rank 0 logs, as Lightning's loggers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = ("offline", "online")


def log_tables(name: str, tables: dict[str, list[dict]], images: dict[str, Path], mode: str = "offline",
               directory: Path | None = None, config: dict[str, Any] | None = None, project: str = "vtr") -> str | None:
    """``tables`` (rows of dicts) as ``wandb.Table`` and ``images`` (files) as ``wandb.Image``;
    returns the run's local folder (None on ranks other than 0)."""
    from lightning.pytorch.utilities import rank_zero_only

    if mode not in MODES:
        raise ValueError(f"wandb mode must be one of {MODES}, got {mode!r}")
    if rank_zero_only.rank != 0:
        return None
    import wandb

    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, job_type=name.split("-")[0], mode=mode, config=config,
                     dir=str(directory) if directory is not None else None, reinit="create_new")
    logged: dict[str, Any] = {key: wandb.Image(str(path)) for key, path in images.items()}
    for key, rows in tables.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        logged[key] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    run.log(logged)
    folder = run.dir
    run.finish()
    return folder
