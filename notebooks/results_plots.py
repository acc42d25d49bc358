# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The committed results, plotted
#
# `experiments/results/` holds the measurements behind the README, as CSV files whose names
# record the device, precision and versions (`compare_<device>_<dtype>_torch<v>_vtr<v>.csv`).
# This notebook redraws two families of them:
#
# - **comparison** (`compare_*.csv`, written by `vtr compare`): accuracy of every method on the
#   synthetic benchmark's test split and its online cost. Where a CSV has 95 % bootstrap
#   intervals (a column `X_lo` / `X_hi` beside a metric `X`) they are drawn as whiskers; where it
#   has several rows per method (one per seed) the bar is their mean and the whisker ± their
#   standard deviation; otherwise the bars have no whiskers and the notebook says so;
# - **latency** (`latency_*.csv`, written by `vtr bench latency`): ms per query against gallery
#   size, with the p10–p90 band of the repeats, drawn by the project's own
#   `retrieval.bench.results.plot_latency`.
#
# Parameters: `VTR_NB_RESULTS` (the folder of CSVs, default `experiments/results`) and
# `VTR_NOTEBOOK_OUT` (where the figures are saved, default `notebooks/figures`).

# %%
import csv
import os
import statistics
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.transforms import Bbox

if "ipykernel" not in sys.modules:  # run as a script or by the test: no display
    plt.switch_backend("Agg")

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments" / "model").is_dir())
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from retrieval.bench.results import plot_latency  # noqa: E402

RESULTS = Path(os.environ.get("VTR_NB_RESULTS") or ROOT / "experiments" / "results")
OUT = Path(os.environ.get("VTR_NOTEBOOK_OUT") or ROOT / "notebooks" / "figures")
OUT.mkdir(parents=True, exist_ok=True)
INTERACTIVE = "ipykernel" in sys.modules


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(value) -> float | None:
    return None if value in (None, "") else float(value)


def save(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=110)
    if not INTERACTIVE:
        plt.close(fig)
    print(f"saved {path}")
    return path


compare_files = sorted(RESULTS.glob("compare_*.csv"))
latency_files = sorted(RESULTS.glob("latency_*.csv"))
print(f"{RESULTS}: {len(compare_files)} compare CSV(s), {len(latency_files)} latency CSV(s)")

# %% [markdown]
# ## Comparison
#
# One value (and, where the CSV allows, one interval) per method and metric. Several rows of a
# method (per-seed rows) are summarised as mean ± std across them; a single row keeps its own
# bootstrap interval.

# %%
METRICS = {"t2v_R@1": "t2v R@1", "static_R@1": "static R@1", "temporal_R@1": "temporal R@1",
           "temporal_pair_acc": "temporal pair accuracy"}
COLOURS = {True: "tab:blue", False: "tab:red"}  # fusion-free vs text-conditioned, as `vtr compare` draws them


def summarise(rows: list[dict], metric: str) -> dict[str, dict]:
    """Per method: value, (lo, hi) or None, the fusion-free flag and what the whisker means."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if number(row.get(metric)) is not None:
            by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for method, group in by_method.items():
        values = [number(row[metric]) for row in group]
        mean = statistics.fmean(values)
        if len(group) > 1:
            spread = statistics.stdev(values)
            interval, kind = (mean - spread, mean + spread), f"± std over {len(group)} rows"
        elif number(group[0].get(f"{metric}_lo")) is not None and number(group[0].get(f"{metric}_hi")) is not None:
            interval, kind = (number(group[0][f"{metric}_lo"]), number(group[0][f"{metric}_hi"])), "95 % bootstrap CI"
        else:
            interval, kind = None, "no interval in the CSV"
        summary[method] = {"value": mean, "interval": interval, "kind": kind,
                           "fusion_free": str(group[0].get("fusion_free")) == "True"}
    return summary


def whiskers(entries: list[dict]) -> list[list[float]] | None:
    """matplotlib's ``xerr``/``yerr`` (distances below and above) for the entries with intervals."""
    if not any(e["interval"] for e in entries):
        return None
    return [[e["value"] - e["interval"][0] if e["interval"] else 0.0 for e in entries],
            [e["interval"][1] - e["value"] if e["interval"] else 0.0 for e in entries]]


def plot_accuracy(path: Path) -> Path:
    rows = read_rows(path)
    metrics = [m for m in METRICS if any(number(row.get(m)) is not None for row in rows)]
    has_ci = {m: any(f"{m}_lo" in row and f"{m}_hi" in row for row in rows[:1]) for m in metrics}
    order = summarise(rows, "temporal_pair_acc" if "temporal_pair_acc" in metrics else metrics[0])
    methods = sorted(order, key=lambda m: order[m]["value"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.35 * len(methods) + 1.8),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        summary = summarise(rows, metric)
        entries = [summary[m] for m in methods if m in summary]
        kept = [m for m in methods if m in summary]
        ax.barh(kept, [e["value"] for e in entries], color=[COLOURS[e["fusion_free"]] for e in entries],
                xerr=whiskers(entries), capsize=3, error_kw={"elinewidth": 1})
        kinds = sorted({e["kind"] for e in entries})
        ax.set_title(f"{METRICS[metric]}\n({'; '.join(kinds)})", fontsize=8)
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        if metric == "temporal_pair_acc":
            ax.axvline(50, color="grey", linestyle=":", linewidth=1)  # an order-blind method's chance level
        print(f"{path.name} {metric}: {'CI columns present' if has_ci[metric] else 'no _lo/_hi columns'}; "
              f"whiskers: {', '.join(kinds)}")
    fig.suptitle(f"{path.stem}: accuracy (%), fusion-free blue, text-conditioned red", fontsize=9)
    fig.tight_layout()
    return save(fig, f"{path.stem}_accuracy.png")


OFFSETS = [(6, 4), (6, -11), (-6, 4), (-6, -11), (6, 15), (6, -22), (-6, 15), (-6, -22), (18, 26), (18, -33)]


def place_labels(ax, points: list[tuple[float, float, tuple[float, float] | None, str]]) -> None:
    """Each label at the first offset around its point whose box overlaps no label, marker or
    whisker placed before it (greedy, in display space): dense clusters stay readable."""
    renderer = ax.figure.canvas.get_renderer()
    to_pixels = ax.transData.transform
    taken = []
    for x, y, interval, _ in points:
        low, high = interval or (y, y)
        (left, bottom), (_, top) = to_pixels((x, low)) - 5, to_pixels((x, high)) + 5
        taken.append(Bbox.from_extents(left, bottom, left + 10, top))
    for x, y, _, label in points:
        for dx, dy in OFFSETS:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right",
                               arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if abs(dy) > 20 else None)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken) or (dx, dy) == OFFSETS[-1]:
                taken.append(box)
                break
            text.remove()


def plot_tradeoff(path: Path) -> Path | None:
    """Pair accuracy against online ms/query over the tiled gallery, y whiskers where present."""
    rows = read_rows(path)
    cost = "ms_per_query_tiled" if any(number(r.get("ms_per_query_tiled")) for r in rows) else "ms_per_query_test"
    accuracy, latency = summarise(rows, "temporal_pair_acc"), summarise(rows, cost)
    methods = sorted(set(accuracy) & set(latency), key=lambda m: -accuracy[m]["value"])
    if not methods:
        print(f"{path.name}: no pair accuracy and latency to plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        acc, ms = accuracy[method], latency[method]
        ax.errorbar(ms["value"], acc["value"], yerr=whiskers([acc]), fmt="o", color=COLOURS[acc["fusion_free"]],
                    capsize=3)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set(xlabel=f"{cost} (log)", ylabel="temporal pair accuracy (%)",
           title="fusion-free (blue) vs text-conditioned (red)")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.15, y=0.08)
    fig.tight_layout()
    place_labels(ax, [(latency[m]["value"], accuracy[m]["value"], accuracy[m]["interval"], m) for m in methods])
    return save(fig, f"{path.stem}_tradeoff.png")


compare_figures = []
for path in compare_files:
    compare_figures += [plot_accuracy(path), plot_tradeoff(path)]

# %% [markdown]
# Methods below the dotted 50 % line in pair accuracy cannot tell a clip from its time-reversed
# partner better than chance: MeanPool is order-blind by construction (the mean of the frames
# does not see their order), and so is X-Pool's text-conditioned pooling: an attention-weighted
# mean over frames that carry no position (`order_blind_failure.py` checks both on one pair).
#
# ## Latency
#
# `plot_latency` draws one panel per query batch size: the median ms per query (encode_text +
# score + top-k) against gallery size, the p10–p90 band of the repeats, and each method's
# gallery-read floor (dotted). A point skipped because it would have taken too long is a cross
# at its read floor.

# %%
latency_figures = []
for path in latency_files:
    rows = read_rows(path)
    latency_figures.append(plot_latency(rows, OUT / f"{path.stem}.png"))
    print(f"saved {latency_figures[-1]} ({len(rows)} rows)")
    if INTERACTIVE:
        from IPython.display import Image, display

        display(Image(filename=latency_figures[-1]))

# %%
figures = [p for p in compare_figures + latency_figures if p is not None]
assert all(p.is_file() for p in figures)
print(f"{len(figures)} figures in {OUT}")
