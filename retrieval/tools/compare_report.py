"""``vtr compare``'s outputs: the CSV files, the console tables and the plot of one run."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retrieval.tools.compare_plot import plot
from retrieval.tools.compare_stats import PER_QUERY_FILE, load_per_query, paired_rows, query_scores, summary_rows

console = Console()

HEADERS = {
    **{column: column.replace("_", " ") for column in ("t2v+DSL_R@1", "v2t+DSL_R@1", "t2v+QB_R@1")},
    "method": "method", "fusion_free": "fusion-free", "t2v_R@1": "R@1", "t2v_R@5": "R@5", "static_R@1": "static R@1",
    "temporal_R@1": "temporal R@1", "temporal_pair_acc": "pair acc", "ms_per_query_test": "ms/q test",
    "ms_per_query_tiled": "ms/q tiled", "offline_ms_per_video": "enc ms/video", "train_minutes": "train min",
}


TIMINGS = ("ms_per_query_test", "ms_per_query_tiled", "offline_ms_per_video", "train_minutes")


def write_outputs(rows: list[dict], scores: dict, reference: str | None, out: Path, tiled: int,
                  columns: list[str], optional: list[str]) -> list[dict]:
    """``results.csv`` (``columns``, then the ``optional`` ones some row has, each with its
    interval), ``summary.csv``, ``paired.csv`` (with a ``reference``) and ``results.png`` in
    ``out``, and the tables on the console; returns the summary rows. ``scores``: the per-query
    scores of each (seed, method) (``compare_stats.query_scores``)."""
    columns = [*columns, *(c + end for c in optional if any(c in row for row in rows) for end in ("", "_lo", "_hi"))]
    _write_csv(out / "results.csv", rows, columns)
    shown = [c for c in columns if c in HEADERS]
    several = len({row["seed"] for row in rows}) > 1
    _print_table(f"vtr compare ({out})", rows, [shown[0], "seed", *shown[1:]] if several else shown)
    summary = summary_rows(rows, scores, shown)
    plain = [c for c in summary[0] if not c.endswith(("_std", "_lo", "_hi"))]
    _write_csv(out / "summary.csv", summary, [c + end for c in plain for end in ("", "_std", "_lo", "_hi")
                                              if c + end in summary[0]])
    accuracy = [c for c in plain if f"{c}_std" in summary[0] and c not in TIMINGS]
    _print_table("summary: mean ± std across seeds, [95 % CI over test queries]", summary,
                 ["method", "seeds", *accuracy])
    if reference is not None:
        seeds = list(dict.fromkeys(row["seed"] for row in rows))
        paired = paired_rows([row["method"] for row in summary], seeds, reference, scores)
        for row in paired:
            row["excludes_zero"] = "yes" if row["excludes_zero"] else "no"
        _write_csv(out / "paired.csv", paired, list(paired[0]) if paired else ["method", "reference", "metric"])
        _print_table(f"minus {reference} on the same queries: difference [95 % CI]", paired,
                     ["method", "metric", "seed", "queries", "difference", "excludes_zero"])
    plot(summary, out / "results.png", tiled)
    return summary


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell(row: dict, column: str) -> str:
    """A value, with its ``± std`` and ``[lo, hi]`` when the row has them."""
    value = row[column]
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.1f}"
    if isinstance(row.get(f"{column}_std"), float):
        text += f" ± {row[f'{column}_std']:.1f}"
    low, high = ("lo", "hi") if column == "difference" else (f"{column}_lo", f"{column}_hi")
    if low in row:
        text += f"\n[{row[low]:.1f}, {row[high]:.1f}]"
    return text


def _print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(HEADERS.get(column, column.replace("_", " ")), justify="left" if column == "method" else "right",
                         no_wrap=True)
    for row in rows:
        table.add_row(*[_cell(row, c) for c in columns])
    Console(width=max(console.width, 180)).print(table)


def paired_report(out: Path, reference: str) -> Path:
    """Each method of a finished ``vtr compare`` run in ``out`` minus ``reference`` on the same
    queries, from the per-query results it saved (no training): ``paired_<reference>.csv``.

    Raises:
        FileNotFoundError: ``out`` holds no ``results.csv``, or a method's per-query file is missing.
        ValueError: ``reference`` is not one of its methods.
    """
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    if reference not in methods:
        raise ValueError(f"--reference {reference} is not among the methods of {out}: {methods}")
    seeds = list(dict.fromkeys(int(row.get("seed") or 0) for row in rows))
    folder = (lambda seed: out) if len(seeds) == 1 else (lambda seed: out / f"seed{seed}")
    scores = {(seed, method): query_scores(load_per_query(folder(seed) / method / "checkpoints" / PER_QUERY_FILE))
              for seed in seeds for method in methods}
    paired = paired_rows(methods, seeds, reference, scores)
    for row in paired:
        row["excludes_zero"] = "yes" if row["excludes_zero"] else "no"
    path = out / f"paired_{reference}.csv"
    _write_csv(path, paired, list(paired[0]) if paired else ["method", "reference", "metric"])
    _print_table(f"minus {reference} on the same queries: difference [95 % CI]", paired,
                 ["method", "metric", "seed", "queries", "difference", "excludes_zero"])
    return path

