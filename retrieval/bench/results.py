"""Result files of the benchmarks: where they go, how they are named, merged and plotted.

- Results go under ``runs/`` unless an output folder is named: ``experiments/results/`` holds
  the committed measurements and is written only when asked (``--out experiments/results``).
- A file name records where it was measured (timm's convention: device, threads, dtype,
  versions); a row is keyed by everything that defines it, and a re-measured row replaces its
  old row.
- Every file is written atomically (:func:`atomic_path`): an interrupted run leaves the old
  file whole.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

import retrieval

DEFAULT_OUT = Path("runs/bench")
"""Where ``vtr bench`` writes without ``--out`` (never the committed ``experiments/results/``)."""

COLUMNS = (
    "method", "class_path", "fusion_free", "backbone", "device", "dtype", "threads", "gallery", "batch",
    "ms_per_query_median", "ms_per_query_p50", "ms_per_query_p99", "ms_per_query_p10", "ms_per_query_p90", "text_ms", "score_ms", "repeats",
    "macs_per_pair", "floor_ms", "bw_floor_ms", "ratio_to_floor", "matmul_ms", "bytes_per_video", "gallery_mb",
    "peak_mem_mb", "mem_method", "offline_ms_per_video", "offline_videos_per_s", "matmul_gflops",
    "bandwidth_gbs", "torch", "vtr", "note",
)
ROW_KEY = ("method", "backbone", "device", "dtype", "threads", "gallery", "batch")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder, renamed onto ``path`` when the block succeeds.

    The rename is atomic (same file system), so readers see the old file or the new one,
    never half of one. If the block raises (an error, Ctrl-C), ``path`` is left as it was and
    the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device) -> str:
    """A short hardware name: ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1] for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    words = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", " ", name.lower()).split()
    return "cpu-" + _slug(" ".join(words[:4]))


def other_load(sample_s: float = 1.0) -> float:
    """Cores' worth of CPU the host's other processes use: the whole host's use over
    ``sample_s`` seconds, sampled while this process waits (the load average would count the
    benchmark's own last minute too)."""
    return psutil.cpu_percent(interval=sample_s) / 100 * (psutil.cpu_count() or 1)


def result_filename(kind: str, device: torch.device, dtype: str, threads: int) -> str:
    """``<kind>_<device>[-<threads>t]_<dtype>_torch<version>_vtr<version>.csv`` (timm convention)."""
    where = device_name(device) + (f"-{threads}t" if device.type == "cpu" else "")
    torch_version = torch.__version__.split("+")[0]
    return f"{kind}_{where}_{dtype}_torch{torch_version}_vtr{retrieval.__version__}.csv"


def merge_rows(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str] = COLUMNS,
               key: Sequence[str] = ROW_KEY) -> list[dict[str, Any]]:
    """Write ``rows`` to ``path``, replacing earlier rows with the same key; returns all rows."""
    merged: dict[tuple, dict[str, Any]] = {}
    if path.is_file():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                merged[tuple(str(row.get(c, "")) for c in key)] = row
    for row in rows:
        merged[tuple(str(row.get(c, "")) for c in key)] = row
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in merged.values():
            writer.writerow({c: csv_value(row.get(c)) for c in columns})
    return list(merged.values())


def csv_value(value: Any) -> Any:
    """A CSV cell: floats to 6 significant digits, None empty."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot_latency(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Log-log ms/query against gallery size, one panel per batch size, one line per method
    (and backbone, where the rows hold several), p10-p90 band, and each line's gallery-read
    floor dotted in its colour; a skipped point is a cross at its read floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(row: dict, column: str) -> float | None:
        value = row.get(column)
        return None if value in (None, "") else float(value)

    timed = [r for r in rows if num(r, "ms_per_query_median") is not None]
    batches = sorted({int(r["batch"]) for r in timed}) or [1]
    series = sorted({(r["method"], r["backbone"]) for r in timed})
    several_backbones = len({backbone for _, backbone in series}) > 1
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches) + 3, 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes[0], batches):
        for i, (method, backbone) in enumerate(series):
            points = sorted(((int(r["gallery"]), r) for r in timed
                             if (r["method"], r["backbone"]) == (method, backbone) and int(r["batch"]) == batch),
                            key=lambda point: point[0])
            if not points:
                continue
            label = f"{method} ({backbone})" if several_backbones else method
            x = [n for n, _ in points]
            colour = colours[i % len(colours)]
            ax.plot(x, [num(r, "ms_per_query_median") for _, r in points], "o-", color=colour, label=label)
            ax.fill_between(x, [num(r, "ms_per_query_p10") for _, r in points],
                            [num(r, "ms_per_query_p90") for _, r in points], color=colour, alpha=0.2)
            skipped = sorted((int(r["gallery"]), num(r, "bw_floor_ms")) for r in rows
                             if (r["method"], r["backbone"]) == (method, backbone) and int(r["batch"]) == batch
                             and str(r.get("note") or "").startswith("skipped") and num(r, "bw_floor_ms"))
            if skipped:  # drawn at their read floor: the time was never measured
                ax.plot([n for n, _ in skipped], [v for _, v in skipped], "x", color=colour, markersize=9,
                        label="skipped point (at its read floor)")
            floor = [(n, num(r, "bw_floor_ms")) for n, r in points if num(r, "bw_floor_ms")]
            if floor:
                ax.plot([n for n, _ in floor], [v for _, v in floor], ":", color=colour, linewidth=1,
                        label=f"{label} read floor ({num(points[0][1], 'bytes_per_video') / 1024:.1f} KiB/video)")
        ax.set(xscale="log", yscale="log", xlabel="gallery size N (videos)", ylabel="ms per query",
               title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    first = timed[0] if timed else {}
    return _save_figure(fig, axes[0], f"online latency: encode_text + score + top-k | {first.get('device', '')} "
                        f"{first.get('dtype', '')} {first.get('threads', '')} threads | torch {first.get('torch', '')} "
                        f"vtr {first.get('vtr', '')}", path)


def _save_figure(fig, axes, title: str, path: Path) -> Path:
    """One legend for all ``axes`` (each label once) at the right, ``title`` above, and the
    figure written atomically to ``path`` (its suffix names the format), then closed."""
    import matplotlib.pyplot as plt

    legend = {}
    for ax in axes:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_two_stage(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``vtr bench latency --rerank-k``'s plot: ms/query against the re-ranked k, one panel per
    gallery size (batch 1 rows), one line per pair (rows ``<pair>@k<K>``), and each method timed
    alone (the frontier's ends) as a dashed level in the same panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ms_per_query_median") not in (None, "") and int(r["batch"]) == 1]
    galleries = sorted({int(r["gallery"]) for r in timed}) or [0]
    pairs = sorted({r["method"].split("@k")[0] for r in timed if "@k" in r["method"]})
    ends = sorted({r["method"] for r in timed if "@k" not in r["method"]})
    fig, axes = plt.subplots(1, len(galleries), figsize=(5 * len(galleries) + 3, 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, n in zip(axes[0], galleries):
        here = [r for r in timed if int(r["gallery"]) == n]
        for i, pair in enumerate(pairs):
            points = sorted((int(r["method"].split("@k")[1]), float(r["ms_per_query_median"]))
                            for r in here if r["method"].split("@k")[0] == pair and "@k" in r["method"])
            ax.plot([k for k, _ in points], [ms for _, ms in points], "o-", color=colours[i % len(colours)], label=pair)
        for j, end in enumerate(ends):
            for r in here:
                if r["method"] == end:
                    ax.axhline(float(r["ms_per_query_median"]), linestyle="--", linewidth=1,
                               color=colours[(len(pairs) + j) % len(colours)], label=f"{end} alone")
        ax.set(xscale="log", yscale="log", xlabel="re-ranked k", ylabel="ms per query (batch 1)",
               title=f"gallery N = {n:,}")
        ax.grid(True, which="both", alpha=0.3)
    first = timed[0] if timed else {}
    return _save_figure(fig, axes[0], f"two-stage latency: both text towers + recall + re-rank of k | "
                        f"{first.get('device', '')} {first.get('dtype', '')} {first.get('backbone', '')} | "
                        f"torch {first.get('torch', '')} vtr {first.get('vtr', '')}", path)
