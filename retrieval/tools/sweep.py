"""``vtr sweep``: a grid of ``vtr fit`` runs, each named by its point, tested on its checkpoint
selected on validation, resumable, ending with the ``vtr results`` table.

A grid file (``experiments/sweeps/*.yaml``)::

    configs:                      # passed as --config, in order (later ones override)
      - experiments/model/seqtransf.yaml
      - experiments/data/synthetic.yaml
    args:                         # fixed options of every run
      model.retriever.init_args.backbone: vtr-tiny
    grid:                         # every combination of these values is one run
      model.retriever.init_args.num_temporal_layers: [2, 4]
      model.optim.lr: [1.0e-4, 3.0e-4]

expands into one ``python -m retrieval.cli fit --config ... --key=value ...`` per point of the
product of the ``grid`` values (the last key varies fastest), run one after the other, each in
its own process. Options after the grid file are appended to every run (``vtr sweep --grid g.yaml
--trainer.max_epochs=1``); ``--config`` adds configs after the grid's (a sweep needs no grid file).

Every run gets, last on its command line:

- ``--trainer.logger.init_args.save_dir=OUT --trainer.logger.init_args.name=POINT``, where OUT is
  the sweep's folder (``--out``, default ``runs/sweeps/<grid file stem>``) and POINT the grid
  point, ``key=value,...`` (each key's last dotted part unless two share it; characters other
  than letters, digits and ``._=,+-`` become ``-``): a CSV run's folder is
  ``OUT/POINT/version_N/``; a wandb run is named POINT (its folder, ``OUT/<project>/<id>/``, holds
  the name in its ``config.yaml``);
- ``--test_after_fit=true``: after fitting, the run tests the checkpoint selected on validation
  in the same process and writes ``test_results.json``, the mark of a finished run;
- ``--ckpt_path=last`` when the point has an unfinished run with a ``last.ckpt``: it resumes
  there (the resumed part logs to the next ``version_N``; the checkpoints stay in the first).

A point with a finished run (``test_results.json``, or ``test/`` metrics in its ``metrics.csv``)
is skipped, so an interrupted sweep is resumed by running the same command again. The first
failure stops the sweep unless ``--keep-going``; at the end the ``vtr results`` table of OUT is
printed and written to ``OUT/table.{md,csv,png}`` (and ``runs.csv``).

``--point --key=value ...`` (last on the line) runs that one point instead of the grid: what a
wandb sweep agent calls with ``${args}`` (``experiments/sweeps/wandb_*.yaml``): the agent's runs
are named, tested, skipped and tabled the same way, and since ``vtr fit`` is started with the
options on its command line, every DDP rank sees them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from retrieval.selection import TEST_RESULTS
from retrieval.tools import results

GRID_KEYS = {"configs", "args", "grid"}
Point = list[tuple[str, str]]


def _text(value: Any) -> str:
    """A value as LightningCLI parses it from ``--key=value`` (YAML scalars; lists and dicts as JSON)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _option(key: str, value: Any) -> str:
    return f"--{key}={_text(value)}"


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


def grid_points(spec: dict[str, Any]) -> list[Point]:
    """Every point of the grid, as ``(key, value text)`` pairs."""
    grid = spec.get("grid") or {}
    return [[(k, _text(v)) for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]


def parse_point(options: Sequence[str]) -> Point:
    """``--key=value`` / ``--key value`` options (a wandb agent's ``${args}``) as a point."""
    point, options = [], list(options)
    while options:
        option = options.pop(0)
        if not option.startswith("--"):
            raise ValueError(f"--point takes --key=value options, got {option!r}")
        key, sep, value = option[2:].partition("=")
        point.append((key, value if sep else options.pop(0) if options else "true"))
    return point


def point_name(point: Point) -> str:
    """``key=value,...`` with each key's last dotted part (the full key where two share it), sanitized."""
    lasts = [k.rsplit(".", 1)[-1] for k, _ in point]
    text = ",".join(f"{last if lasts.count(last) == 1 else k}={v}" for last, (k, v) in zip(lasts, point))
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text) or "default"


def command(spec: dict[str, Any], point: Point, extra: Sequence[str], out: Path, resume: bool = False,
            python: str = sys.executable) -> list[str]:
    """The ``vtr fit`` command of one point."""
    line = [python, "-m", "retrieval.cli", "fit"]
    for config in spec.get("configs") or []:
        line += ["--config", str(config)]
    line += [_option(k, v) for k, v in (spec.get("args") or {}).items()]
    line += [f"--{k}={v}" for k, v in point] + list(extra)
    line += [f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={point_name(point)}",
             "--test_after_fit=true"]
    return line + (["--ckpt_path=last"] if resume else [])


def expand(spec: dict[str, Any], extra: Sequence[str] = (), python: str = sys.executable,
           out: Path = Path("runs/sweeps/sweep")) -> list[list[str]]:
    """The fresh ``vtr fit`` command of every grid point."""
    return [command(spec, point, extra, out, python=python) for point in grid_points(spec)]


def point_state(out: Path, name: str) -> tuple[str, Path | None]:
    """``finished`` / ``resume`` / ``new``, and the run folder that says so, for the point ``name``."""
    state: tuple[str, Path | None] = ("new", None)
    for config in sorted(out.rglob("config.yaml")) if out.is_dir() else []:
        folder = config.parent
        logger = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("logger")
        if not isinstance(logger, dict) or str((logger.get("init_args") or {}).get("name")) != name:
            continue
        if (folder / TEST_RESULTS).is_file() or _tested(folder / "metrics.csv"):
            return "finished", folder
        if (folder / "checkpoints" / "last.ckpt").is_file():
            state = ("resume", folder)
    return state


def _tested(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    with open(metrics, newline="") as handle:
        return any(key.startswith("test/") and value for row in csv.DictReader(handle) for key, value in row.items())


def run(spec: dict[str, Any], points: list[Point], extra: Sequence[str], out: Path, keep_going: bool = False,
        dry_run: bool = False) -> dict[int, int]:
    """Run the unfinished points in turn; returns the exit code of each point run (by its 1-based
    number; stops at the first failure unless ``keep_going``)."""
    codes: dict[int, int] = {}
    for i, point in enumerate(points, 1):
        name = point_name(point)
        state, folder = point_state(out, name)
        if state == "finished":
            print(f"[vtr sweep {i}/{len(points)}] {name}: finished in {folder}, skipped", file=sys.stderr, flush=True)
            continue
        line = command(spec, point, extra, out, resume=state == "resume")
        if dry_run:
            print(shlex.join(line))
            continue
        print(f"[vtr sweep {i}/{len(points)}] {name}" + (f" (resumes {folder})" if folder else "") + f": {shlex.join(line)}",
              flush=True)
        codes[i] = subprocess.run(line, check=False).returncode
        if codes[i] and not keep_going:
            break
    return codes


def summarize(out: Path) -> None:
    """The ``vtr results`` table of the sweep's folder, printed and written to ``out/table.*``."""
    try:
        records, notes = results.collect([out])
        if not records:
            print(f"vtr sweep: no finished runs in {out} yet")
            return
        rows = results.table(records)
        results.write(rows, records, out, overwrite=True)
    except ValueError as error:
        raise SystemExit(f"vtr sweep: {error}") from None
    print("".join(f"note: {note}\n" for note in notes) + results.markdown(rows) + f"-> {out}/table.md")


def main(argv: Sequence[str]) -> None:
    """``vtr sweep [--grid GRID.yaml] [--config C] [--out DIR] [--dry-run] [--keep-going] [--no-results]
    [fit options] [--point --key=value ...]``."""
    argv = list(argv[1:])
    point_args = argv[argv.index("--point") + 1:] if "--point" in argv else None
    argv = argv[:argv.index("--point")] if "--point" in argv else argv
    parser = argparse.ArgumentParser(prog="vtr sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--grid", type=Path, help="grid file (experiments/sweeps/)")
    parser.add_argument("--config", action="append", default=[], help="a config for every run, after the grid's")
    parser.add_argument("--out", type=Path, help="the sweep's folder (default runs/sweeps/<grid stem>)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished points, run nothing")
    parser.add_argument("--keep-going", action="store_true", help="continue after a failed run")
    parser.add_argument("--no-results", action="store_true", help="do not end with the results table")
    args, extra = parser.parse_known_args(argv)
    try:
        spec = read_grid(args.grid) if args.grid else {}
        spec["configs"] = [*(spec.get("configs") or []), *args.config]
        for config in args.config:
            if not Path(config).is_file():
                raise FileNotFoundError(f"config {config} does not exist (paths are relative to the working directory)")
        points = [parse_point(point_args)] if point_args is not None else grid_points(spec)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"vtr sweep: {error}") from None
    out = args.out or Path("runs/sweeps") / (args.grid.stem if args.grid else "sweep")
    codes = run(spec, points, extra, out, args.keep_going, args.dry_run)
    if args.dry_run:
        return
    failed = [i for i, code in codes.items() if code]
    print(f"vtr sweep: {len(codes) - len(failed)} of {len(codes)} runs started here succeeded "
          f"({len(points)} points)" + (f"; failed points: {failed}" if failed else ""))
    if not args.no_results:
        summarize(out)
    if failed:
        raise SystemExit(1)
