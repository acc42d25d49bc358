"""``vtr sweep``: a local grid of ``vtr fit`` runs, one subprocess each.

A grid file (``experiments/sweeps/*.yaml``)::

    configs:                      # passed as --config, in order (later ones override)
      - experiments/model/seqtransf.yaml
      - experiments/data/synthetic.yaml
    args:                         # fixed options of every run
      model.retriever.init_args.backbone: vtr-tiny
    grid:                         # every combination of these values is one run
      model.retriever.init_args.num_temporal_layers: [2, 4]
      model.optim.lr: [1.0e-4, 3.0e-4]

expands into ``python -m retrieval.cli fit --config ... --key=value ...``, one per point of the
product of the ``grid`` values (the last key varies fastest). Options after the grid file are
appended to every run (``vtr sweep --grid g.yaml --trainer.max_epochs=1``). The runs are
sequential; the first failure stops the sweep unless ``--keep-going``. For sweeps on many
machines use a wandb sweep (``experiments/sweeps/wandb_*.yaml``): its agent calls ``vtr fit``
with the same ``--key=value`` options, so every DDP rank sees them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

GRID_KEYS = {"configs", "args", "grid"}


def _option(key: str, value: Any) -> str:
    """``--key=value`` as LightningCLI parses it (YAML scalars; lists and dicts as JSON)."""
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    return f"--{key}={text}"


def read_grid(path: str | Path) -> dict[str, Any]:
    """A grid file, checked.

    Raises:
        FileNotFoundError: the grid file or one of its configs does not exist.
        ValueError: unknown top-level keys, or a grid value that is not a non-empty list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a grid file has {sorted(GRID_KEYS)}")
    for config in spec.get("configs") or []:
        if not Path(config).is_file():
            raise FileNotFoundError(f"{path}: config {config} does not exist (paths are relative to the working directory)")
    for key, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    return spec


def expand(spec: dict[str, Any], extra: Sequence[str] = (), python: str = sys.executable) -> list[list[str]]:
    """The ``vtr fit`` command of every grid point."""
    base = [python, "-m", "retrieval.cli", "fit"]
    for config in spec.get("configs") or []:
        base += ["--config", str(config)]
    base += [_option(k, v) for k, v in (spec.get("args") or {}).items()]
    grid = spec.get("grid") or {}
    points = itertools.product(*grid.values()) if grid else [()]
    return [base + [_option(k, v) for k, v in zip(grid, point)] + list(extra) for point in points]


def run(commands: Sequence[list[str]], keep_going: bool = False) -> list[int]:
    """Run the commands in turn; returns their exit codes (stops at the first failure unless
    ``keep_going``)."""
    codes = []
    for i, command in enumerate(commands, 1):
        print(f"[vtr sweep {i}/{len(commands)}] {shlex.join(command)}", flush=True)
        codes.append(subprocess.run(command).returncode)
        if codes[-1] and not keep_going:
            break
    return codes


def main(argv: Sequence[str]) -> None:
    """``vtr sweep --grid GRID.yaml [--dry-run] [--keep-going] [extra fit options]``."""
    parser = argparse.ArgumentParser(prog="vtr sweep", description="Run a local grid of `vtr fit` runs.")
    parser.add_argument("--grid", required=True, type=Path, help="grid file (experiments/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--keep-going", action="store_true", help="continue after a failed run")
    args, extra = parser.parse_known_args(list(argv[1:]))
    try:
        commands = expand(read_grid(args.grid), extra)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"vtr sweep: {error}") from None
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return
    codes = run(commands, args.keep_going)
    failed = [i + 1 for i, code in enumerate(codes) if code]
    print(f"vtr sweep: {len(codes) - len(failed)} of {len(commands)} runs succeeded"
          + (f"; failed: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)
