"""``vtr compare``'s plot: temporal pair accuracy against ms per query, one point per method.

Fusion-free methods are blue, text-conditioned ones red. Each point carries its 95 % bootstrap
interval over test pairs (thin whisker with caps) and, with several seeds, ± one standard
deviation across seeds (thick bar). Labels never overlap each other or a point: each sits
beside its point where there is room (:func:`draw`), else in a column right of the axes, in the
order of the points' heights, one text line apart (:func:`spread`), with a leader line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

COLOURS = {True: "tab:blue", False: "tab:red"}
FONT_SIZE = 9


def spread(wanted: list[float], gap: float, low: float, high: float) -> list[float]:
    """Positions as close as possible to ``wanted`` (any order), at least ``gap`` apart and
    inside ``[low, high]`` when they fit (else starting at ``low``); deterministic."""
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    placed = [max(low, min(high, wanted[i])) for i in order]
    for k in range(1, len(placed)):  # push up what sits too close above the one below
        placed[k] = max(placed[k], placed[k - 1] + gap)
    if placed and placed[-1] > high:  # then push the top back inside, and down what that crowds
        placed[-1] = max(high, low + gap * (len(placed) - 1))
        for k in range(len(placed) - 2, -1, -1):
            placed[k] = min(placed[k], placed[k + 1] - gap)
    out = [0.0] * len(wanted)
    for k, i in enumerate(order):
        out[i] = placed[k]
    return out


# where a label may sit around its point, in order of preference: (dx, dy) points, alignment
PLACES = ((6, 0, "left", "center"), (-6, 0, "right", "center"), (0, 7, "center", "bottom"),
          (0, -7, "center", "top"), (6, 6, "left", "bottom"), (-6, 6, "right", "bottom"),
          (6, -6, "left", "top"), (-6, -6, "right", "top"))


def draw(ax, summary: list[dict]) -> list:
    """The points, whiskers and labels of ``summary`` (``vtr compare``'s summary rows) on ``ax``;
    returns the labels (annotations: their text's extent is ``matplotlib.text.Text.get_window_extent``).

    Each label takes the first of :data:`PLACES` beside its point that stays inside the axes and
    clear of every point and of the labels placed before it; a label with no such place goes to
    the column right of the axes (:func:`spread`), joined to its point by a leader line."""
    several = any(isinstance(row.get("temporal_pair_acc_std"), float) for row in summary)
    for row in summary:
        x, y, colour = row["ms_per_query_tiled"], row["temporal_pair_acc"], COLOURS[bool(row["fusion_free"])]
        ax.errorbar(x, y, yerr=[[y - row["temporal_pair_acc_lo"]], [row["temporal_pair_acc_hi"] - y]], color=colour,
                    elinewidth=0.8, capsize=3, fmt="none", alpha=0.8)
        if several:
            ax.errorbar(x, y, yerr=row["temporal_pair_acc_std"], color=colour, elinewidth=3, fmt="none", alpha=0.5)
        ax.scatter(x, y, color=colour, s=40, zorder=3)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.figure.canvas.draw()
    ax.set_xlim(ax.get_xlim())  # the limits, and so the transforms, are final from here on
    ax.set_ylim(ax.get_ylim())
    renderer, box = ax.figure.canvas.get_renderer(), ax.get_window_extent()
    inside = box.padded(-3)  # clear of the spines
    points = [ax.transData.transform((row["ms_per_query_tiled"], row["temporal_pair_acc"])) for row in summary]
    # a label keeps clear of every marker, and of other points' by more (else it reads as theirs)
    markers = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in points]
    near = [marker.padded(8) for marker in markers]
    taken = []  # the labels placed so far
    labels, unplaced = [], []
    for i, (row, point) in enumerate(zip(summary, points)):
        avoid = [markers[i], *near[:i], *near[i + 1:]]
        style = {"fontsize": FONT_SIZE, "color": COLOURS[bool(row["fusion_free"])], "zorder": 4,
                 "bbox": {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7}}
        for dx, dy, ha, va in PLACES:
            label = ax.annotate(row["method"], xy=(row["ms_per_query_tiled"], row["temporal_pair_acc"]), xytext=(dx, dy),
                                textcoords="offset points", ha=ha, va=va, **style)
            label.update_positions(renderer)  # (else a new annotation's text has no place yet)
            extent = Text.get_window_extent(label, renderer)
            if inside.contains(extent.x0, extent.y0) and inside.contains(extent.x1, extent.y1) and not any(
                    extent.overlaps(other) for other in (*taken, *avoid)):
                taken.append(extent)
                labels.append(label)
                break
            label.remove()
        else:
            unplaced.append((row, point, style))
    line = 1.35 * FONT_SIZE * ax.figure.dpi / 72
    heights = spread([point[1] for _, point, _ in unplaced], line, box.y0 + line / 2, box.y1 - line / 2)
    for (row, _, style), height in zip(unplaced, heights):
        labels.append(ax.annotate(
            row["method"], xy=(row["ms_per_query_tiled"], row["temporal_pair_acc"]),
            xytext=ax.transAxes.inverted().transform((box.x1 + 8, height)), textcoords="axes fraction", va="center",
            annotation_clip=False, **style,
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "relpos": (0.0, 0.5), "shrinkA": 2,
                        "shrinkB": 3},
        ))
    return labels


def plot(summary: list[dict], path: Path, tiled: int) -> None:
    """``results.png``: :func:`draw` with axes labels and a key of the whiskers; the axes leave
    room on the right only when some label needs the column."""
    several = any(isinstance(row.get("temporal_pair_acc_std"), float) for row in summary)
    for right in (0.96, 0.72):
        fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)  # the dpi draw lays the labels out at
        fig.subplots_adjust(left=0.09, right=right, bottom=0.13, top=0.88)
        ax.set_xlabel(f"ms per query over {tiled:,} videos (encode_text + score + top-k, CPU)")
        ax.set_ylabel("temporal pair accuracy (%)")
        ax.set_title("fusion-free (blue) vs text-conditioned (red)")
        in_column = [label for label in draw(ax, summary) if label.arrow_patch is not None]
        if not in_column or right < 0.9:
            break
        plt.close(fig)
    key = [Line2D([], [], color="0.3", linewidth=0.8, marker="_", markersize=6, label="95 % CI over test pairs")]
    if several:
        key.append(Line2D([], [], color="0.3", linewidth=3, alpha=0.5, label="± std across seeds"))
    fig.legend(handles=key, loc="upper right", fontsize=8, frameon=False)  # beside the title
    fig.savefig(path)
    plt.close(fig)
