"""``vtr results PATH...``: one table from finished runs, seeds averaged, intervals kept.

Collected below each PATH: ``vtr fit`` / ``vtr test`` run folders (``config.yaml`` beside the
``test_results.json`` that ``vtr test`` and ``vtr fit --test_after_fit true`` write, or a
``metrics.csv`` with ``test/`` metrics), so also ``vtr sweep`` folders; and ``vtr compare`` folders
(``results.csv``: a row per method, and per seed where it has a ``seed`` column, else seed 0).
A run's method is its retriever class (``model.retriever.class_path``'s last part), its dataset
``data.dataset``, its seed ``seed_everything``, its variant the logger's name unless Lightning's
default (``vtr sweep`` names a run by its grid point; the point's seed, class_path and dataset
parts are dropped, so the seeds of one point average together).

Rows: method x variant x dataset x post-processing (``t2v``; ``DSL`` = ``t2v+DSL/...``, ``QB`` =
``t2v+QB/...`` where reported). A cell is the mean ± the sample std (n - 1) over seeds and the 95 %
interval: the bootstrap interval over test queries the run logged (``_lo``/``_hi``); over several
seeds, the mean of the per-seed bounds (the interval of a typical single run; the spread over
seeds is the std). Only checkpoints selected on validation: a run whose ``ModelCheckpoint``
monitored a ``test/`` metric (its config's callbacks, or the callback states saved in the tested
checkpoint) is refused with an error naming the run and the monitor; a run that tested weights no
monitor selected (``last.ckpt``) is left out with a note. Writes ``table.md``, ``table.csv``,
``runs.csv`` (a row per run) and ``table.png`` to ``--out``, never over earlier ones without
``--overwrite``; ``--wandb`` logs the table (``wandb.Table``) and plot (``wandb.Image``) to a wandb
run, offline unless ``--wandb online``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from statistics import fmean, stdev

import yaml

from retrieval.selection import TEST_RESULTS, callback_states, refuse_test_monitors, selected_by
from retrieval.tools.wandb_log import MODES, log_tables

OUTPUTS = ("table.md", "table.csv", "runs.csv", "table.png")
DEFAULT_NAMES = {None, "", "lightning_logs"}
POSTS = {"": "t2v", "DSL": "t2v+DSL", "QB": "t2v+QB"}
COLUMNS = {  # header -> logged metric ({t}: the row's t2v prefix, {v}: its v2t one), plain rows only
    "R@1": ("{t}/R@1", False), "R@5": ("{t}/R@5", False), "R@10": ("{t}/R@10", False), "v2t R@1": ("{v}/R@1", False),
    "static R@1": ("static/R@1", True), "temporal R@1": ("temporal/R@1", True), "pair acc": ("temporal/pair_acc", True),
}


def _short_metrics(metrics: dict) -> dict[str, float]:
    return {k.removeprefix("test/"): float(v) for k, v in metrics.items()
            if k.startswith("test/") and v not in (None, "") and k != "test/t2v_R1"}


def _variant(name) -> str:
    if name in DEFAULT_NAMES:
        return ""
    parts = [p for p in str(name).split(",") if not any(w in p.split("=")[0] for w in ("seed", "class_path", "dataset"))]
    return ",".join(parts)


def read_run(run: Path, notes: list[str]) -> dict | None:
    """One ``vtr fit`` / ``vtr test`` folder as a record; None (with a note) when unfinished."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    refuse_test_monitors(run, [(c.get("init_args") or {}).get("monitor") for c in callbacks if isinstance(c, dict)
                                and str(c.get("class_path", "")).endswith("ModelCheckpoint")], "config.yaml")
    if (run / TEST_RESULTS).is_file():
        mark = json.loads((run / TEST_RESULTS).read_text())
        metrics, ckpt, monitor = _short_metrics(mark["metrics"]), mark.get("checkpoint"), mark.get("monitor")
    else:
        metrics, ckpt, monitor = {}, config.get("ckpt_path"), None
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv", newline="") as handle:
                for row in csv.DictReader(handle):
                    metrics.update(_short_metrics(row))
        if not metrics:
            notes.append(f"left out {run}: no test metrics (unfinished, or fit without --test_after_fit)")
            return None
    if ckpt and Path(ckpt).is_file():
        states = callback_states(ckpt)
        refuse_test_monitors(run, [s.get("monitor") for s in states.values()], f"checkpoint {ckpt}")
        monitor = selected_by(ckpt, states)
    elif ckpt and not monitor:
        notes.append(f"{run}: the tested checkpoint {ckpt} is gone; its selection was not verified")
        monitor = "unverified"
    for path in [] if ckpt else sorted((run / "checkpoints").glob("*.ckpt")):
        refuse_test_monitors(run, [s.get("monitor") for s in callback_states(path).values()], f"checkpoint {path}")
    refuse_test_monitors(run, [monitor], f"it selected the tested checkpoint {ckpt}")
    if not ckpt or not monitor:
        notes.append(f"left out {run}: it tested {ckpt or 'weights of unknown origin'}, which no val/ monitor selected")
        return None
    logger = trainer.get("logger")
    name = (logger.get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    return {"source": str(run), "method": config["model"]["retriever"]["class_path"].rsplit(".", 1)[-1],
            "variant": _variant(name), "dataset": (config.get("data") or {}).get("dataset", "?"),
            "seed": int(config.get("seed_everything") or 0), "checkpoint": str(ckpt), "monitor": monitor,
            "metrics": metrics}


def _compare_metric(column: str) -> str:
    base, _, bound = column.rpartition("_") if column.endswith(("_lo", "_hi")) else (column, "", "")
    key = "temporal/pair_acc" if base == "temporal_pair_acc" else base.replace("_R@", "/R@", 1)
    return f"{key}_{bound}" if bound else key


def read_compare(folder: Path) -> list[dict]:
    """A ``vtr compare`` folder's ``results.csv`` rows as records (its checkpoints checked)."""
    for path in sorted(folder.glob("**/checkpoints/*.ckpt")):
        refuse_test_monitors(folder, [s.get("monitor") for s in callback_states(path).values()], f"checkpoint {path}")
    with open(folder / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{"source": str(folder / "results.csv"), "method": row["method"], "variant": "",
             "dataset": row.get("dataset") or "synthetic", "seed": int(row.get("seed") or 0),
             "checkpoint": "", "monitor": "val/t2v_R1",
             "metrics": {_compare_metric(k): float(v) for k, v in row.items() if "R@" in k or "pair_acc" in k if v}}
            for row in rows]


def _is_compare(folder: Path) -> bool:
    with open(folder / "results.csv", newline="") as handle:
        return {"method", "t2v_R@1"} <= set(next(csv.reader(handle), []))


def collect(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """Every finished run below ``paths`` (records) and the notes on what was left out."""
    records, notes, seen = [], [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        for root, dirs, files in os.walk(path.parent if path.is_file() else path):
            folder = Path(root)
            if folder.resolve() in seen:
                dirs[:] = []
                continue
            seen.add(folder.resolve())
            if "results.csv" in files and _is_compare(folder):
                records += read_compare(folder)
                dirs[:] = []  # its method folders are part of it
            elif "config.yaml" in files and "model" in (yaml.safe_load((folder / "config.yaml").read_text()) or {}):
                record = read_run(folder, notes)
                records += [record] if record else []
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "wandb"))
    return _deduplicate(records), notes


def _deduplicate(records: list[dict]) -> list[dict]:
    kept: dict[tuple, dict] = {}
    for record in records:
        key = (record["method"], record["variant"], record["dataset"], record["seed"])
        other = kept.get(key)
        if other and (other["checkpoint"] != record["checkpoint"] or not record["checkpoint"]):
            what = " ".join(str(k) for k in key[:2] if k)
            raise ValueError(f"{other['source']} and {record['source']} are both {what} on {key[2]} with "
                             f"seed {key[3]}: name them apart (trainer.logger.init_args.name) or pass only one")
        kept[key] = record  # the same checkpoint tested twice: one row
    return list(kept.values())


def table(records: list[dict]) -> list[dict]:
    """The rows: per group and post-processing, each column's mean, std, mean lo/hi and seed values."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["method"], record["variant"], record["dataset"])].append(record)
    rows = []
    for (method, variant, dataset), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        for post, t in POSTS.items():
            if post and not any(f"{t}/R@1" in r["metrics"] for r in runs):
                continue
            row = {"method": method, "variant": variant, "dataset": dataset, "post": post,
                   "seeds": " ".join(str(r["seed"]) for r in runs), "cells": {}}
            for header, (template, plain_only) in COLUMNS.items():
                key = template.format(t=t, v=t.replace("t2v", "v2t"))
                have = [r["metrics"] for r in runs if key in r["metrics"]]
                if not have or (plain_only and post):
                    continue
                values = [m[key] for m in have]
                bounds = [(m[f"{key}_lo"], m[f"{key}_hi"]) for m in have if f"{key}_lo" in m and f"{key}_hi" in m]
                row["cells"][header] = {
                    "mean": fmean(values), "std": stdev(values) if len(values) > 1 else None, "n": len(values),
                    "lo": fmean(b[0] for b in bounds) if bounds else None, "values": values,
                    "hi": fmean(b[1] for b in bounds) if bounds else None}
            rows.append(row)
    return rows


def _cell(cell: dict | None) -> str:
    if not cell:
        return ""
    text = f"{cell['mean']:.1f}" + (f" ± {cell['std']:.1f}" if cell["std"] is not None else "")
    return text + (f" [{cell['lo']:.1f}, {cell['hi']:.1f}]" if cell["lo"] is not None else "")


def markdown(rows: list[dict]) -> str:
    headers = [h for h in COLUMNS if any(h in r["cells"] for r in rows)]
    lines = ["| method | variant | dataset | post | seeds | " + " | ".join(headers) + " |",
             "|" + "---|" * (5 + len(headers))]
    lines += [f"| {r['method']} | {r['variant']} | {r['dataset']} | {r['post']} | {r['seeds']} | "
              + " | ".join(_cell(r["cells"].get(h)) for h in headers) + " |" for r in rows]
    return "\n".join(lines) + ("\n\nmean ± std over seeds (n - 1); [95 % bootstrap CI over test queries; over "
                               "seeds the mean of the per-seed bounds]\n")


def csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        flat = {k: r[k] for k in ("method", "variant", "dataset", "post", "seeds")}
        for header, cell in r["cells"].items():
            name = header.replace(" ", "_")
            flat.update({name: cell["mean"], f"{name}_std": cell["std"], f"{name}_lo": cell["lo"],
                         f"{name}_hi": cell["hi"], f"{name}_n": cell["n"]})
        out.append(flat)
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    """Per dataset (rows of panels) and metric (R@1, pair acc): the mean over seeds, the CI as
    whiskers, each seed as a dot; one line per method / variant / post-processing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    metrics = [m for m in ("R@1", "pair acc") if any(m in r["cells"] for r in rows)]
    most = max(sum(r["dataset"] == d for r in rows) for d in datasets)
    fig, axes = plt.subplots(len(datasets), len(metrics), squeeze=False,
                             figsize=(5 * len(metrics), (0.4 * most + 1.2) * len(datasets)))
    for i, dataset in enumerate(datasets):
        shown = [r for r in rows if r["dataset"] == dataset]
        labels = [" ".join(x for x in (r["method"], r["variant"], r["post"] and f"+{r['post']}") if x) for r in shown]
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for y, row in enumerate(shown):
                cell = row["cells"].get(metric)
                if not cell:
                    continue
                if cell["lo"] is not None:
                    ax.errorbar(cell["mean"], y, xerr=[[cell["mean"] - cell["lo"]], [cell["hi"] - cell["mean"]]],
                                fmt="o", color="tab:blue", capsize=3)
                ax.scatter(cell["values"], [y] * len(cell["values"]), s=10, color="black", alpha=0.6, zorder=3)
            ax.set_yticks(range(len(shown)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set(xlabel=f"{metric} (%)", title=f"{dataset}: {metric}")
    fig.text(0.01, 0.005, "dot: a seed; marker and whiskers: mean and mean 95 % CI", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], records: list[dict], out: Path, overwrite: bool = False) -> dict[str, Path]:
    """``table.md``, ``table.csv``, ``runs.csv`` and ``table.png`` in ``out`` (never over earlier ones
    without ``overwrite``)."""
    paths = {name: out / name for name in OUTPUTS}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist: pass --overwrite to replace them, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    paths["table.md"].write_text(markdown(rows))
    _write_csv(paths["table.csv"], csv_rows(rows))
    _write_csv(paths["runs.csv"], [{k: v for k, v in r.items() if k != "metrics"} | r["metrics"] for r in records])
    plot(rows, paths["table.png"])
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    """``vtr results PATH... [--out DIR] [--overwrite] [--wandb [offline|online]]``."""
    parser = argparse.ArgumentParser(prog="vtr results", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run, compare or sweep folders (searched below)")
    parser.add_argument("--out", type=Path, default=Path("runs/results"), help="where the table and plot go")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier table in --out")
    parser.add_argument("--wandb", nargs="?", const="offline", choices=MODES,
                        help="also log the table and plot to wandb (offline unless 'online')")
    args = parser.parse_args(argv[1:] if argv and argv[0] == "results" else argv)
    try:
        records, notes = collect(args.paths)
        if not records:
            raise ValueError(f"no finished runs below {', '.join(map(str, args.paths))}" + "".join(f"\n  {n}" for n in notes))
        rows = table(records)
        paths = write(rows, records, args.out, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"vtr results: {error}") from None
    print("".join(f"note: {note}\n" for note in notes) + paths["table.md"].read_text() + f"-> {args.out}")
    if args.wandb:
        log_tables(f"results-{args.out.name}", {"results/table": csv_rows(rows)}, {"results/plot": paths["table.png"]},
                   args.wandb, directory=args.out, config={"paths": [str(p) for p in args.paths]})
    return rows
