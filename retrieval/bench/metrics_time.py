"""``vtr bench metrics``: the cost of :func:`retrieval.metrics.retrieval_metrics` itself, and of
its bootstrap intervals.

One row per run in each of two CSVs named like the latency files (:mod:`retrieval.bench.results`),
``metrics_*`` (the whole suite on an ``n x n`` similarity, intervals included) and ``bootstrap_*``
(the intervals alone: every R@K of ``n`` t2v and ``n`` v2t queries, 1,000 resamples each),
under ``runs/bench/`` unless ``--out`` names another folder.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import retrieval
from retrieval.bench.results import DEFAULT_OUT, csv_value, result_filename
from retrieval.metrics import BOOTSTRAP_RESAMPLES, RECALL_AT, bootstrap_ci, retrieval_metrics


def time_metrics(n: int, repeats: int = 3, chunk_size: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Seconds of :func:`retrieval.metrics.retrieval_metrics` on a random ``n x n`` similarity."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randn(n, n, generator=generator)
    query_video = torch.arange(n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        retrieval_metrics(similarity, query_video, chunk_size)
        times.append(time.perf_counter() - start)
    return {"n": n, "chunk_size": chunk_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "seconds_median": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times),
            "torch": torch.__version__, "vtr": retrieval.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


METRIC_COLUMNS = ("n", "chunk_size", "threads", "repeats", "seconds_median", "seconds_min", "seconds_max",
                  "torch", "vtr", "date")
BOOTSTRAP_COLUMNS = ("n", "intervals", "resamples", "threads", "repeats", "seconds_median", "seconds_min",
                     "seconds_max", "torch", "vtr", "date")


def time_bootstrap(n: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Seconds of the bootstrap intervals of every R@K of ``n`` t2v and ``n`` v2t queries
    (random ranks), as :func:`retrieval.metrics.summarize_ranks` computes them."""
    generator = torch.Generator().manual_seed(seed)
    ranks = [torch.randint(1, 100, (n,), generator=generator) for _ in range(2)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r in ranks:
            for k in RECALL_AT:
                bootstrap_ci(100.0 * (r <= k).double())
        times.append(time.perf_counter() - start)
    return {"n": n, "intervals": 2 * len(RECALL_AT), "resamples": BOOTSTRAP_RESAMPLES,
            "threads": torch.get_num_threads(), "repeats": repeats, "seconds_median": statistics.median(times),
            "seconds_min": min(times), "seconds_max": max(times), "torch": torch.__version__,
            "vtr": retrieval.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def _append(path: Path, columns: tuple[str, ...], row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({c: csv_value(row[c]) for c in columns})


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``vtr bench metrics``'s options."""
    met = sub.add_parser("metrics", help="time retrieval_metrics on an n x n similarity",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    met.add_argument("--n", type=int, default=10000)
    met.add_argument("--repeats", type=int, default=3)
    met.add_argument("--chunk-size", type=int, default=4096)
    met.add_argument("--threads", type=int, default=None)
    met.add_argument("--out", type=Path, default=DEFAULT_OUT,
                     help="output folder (the committed results: experiments/results)")
    met.set_defaults(tool=__name__)


def run(args: argparse.Namespace) -> None:
    """``vtr bench metrics``: time the metric suite, append a row to its CSV."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = time_metrics(args.n, args.repeats, args.chunk_size)
    path = args.out / result_filename("metrics", torch.device("cpu"), "fp32", torch.get_num_threads())
    _append(path, METRIC_COLUMNS, result)
    print(f"retrieval_metrics {args.n}x{args.n}: median {result['seconds_median']:.3f} s "
          f"(min {result['seconds_min']:.3f}, max {result['seconds_max']:.3f}; {result['threads']} threads) -> {path}")
    boot = time_bootstrap(args.n, args.repeats)
    boot_path = args.out / result_filename("bootstrap", torch.device("cpu"), "fp64", torch.get_num_threads())
    _append(boot_path, BOOTSTRAP_COLUMNS, boot)
    print(f"bootstrap intervals of {boot['intervals']} R@K over {args.n} queries ({boot['resamples']} resamples each): "
          f"median {boot['seconds_median']:.4f} s -> {boot_path}")
