"""One style for every figure: one colour per rank, titles that say what ran where.

Every plotting function returns the matplotlib Figure (notebooks end the cell with ``;`` or ``plt.show()``) and
never computes numbers itself: it draws what a measured or derived result holds.

Lesson: every notebook; the split drawings are notebook 02, section 1.
"""
from __future__ import annotations

import os

import matplotlib

if not os.environ.get("MPLBACKEND") and "ipykernel" not in str(matplotlib.get_backend()):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

RANK_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
GREY = "#D0D0D0"


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


def _matrix(ax, x0, y0, w, h, blocks, axis, label, shape_txt):
    """Draw a w×h matrix at (x0, y0); ``blocks`` = [(start, end, colour)] along ``axis`` ('cols'|'rows'),
    given as fractions of the full extent."""
    if not blocks:
        ax.add_patch(Rectangle((x0, y0), w, h, facecolor=GREY, edgecolor="black", lw=1))
    for s, e, col in blocks:
        if axis == "cols":
            ax.add_patch(Rectangle((x0 + s * w, y0), (e - s) * w, h, facecolor=col, edgecolor="black", lw=1))
        else:  # rows, drawn top to bottom
            ax.add_patch(Rectangle((x0, y0 + h - e * h), w, (e - s) * h, facecolor=col, edgecolor="black", lw=1))
    ax.text(x0 + w / 2, y0 + h + 0.15, label, ha="center", va="bottom", fontsize=11, weight="bold")
    ax.text(x0 + w / 2, y0 - 0.15, shape_txt, ha="center", va="top", fontsize=8)


def draw_linear_split(table: dict, tokens: int = 4):
    """Column and row splits of Y = X·W (W in the maths layout [in, out]) from a ``tp_checks.shard_table``.

    Column: W split by output columns, X whole on every rank, each rank a block of Y's columns.
    Row: W split by input rows, X split by the matching columns, each rank a full-size partial Y; Y = Σ.
    """
    out_f, in_f = table["dense_weight_shape"]
    n = table["world_size"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    col = [(r["out_range"][0] / out_f, r["out_range"][1] / out_f, rank_color(r["rank"])) for r in table["column"]]
    row = [(r["in_range"][0] / in_f, r["in_range"][1] / in_f, rank_color(r["rank"])) for r in table["row"]]
    wx, wh, xw = 2.0, 2.0, 2.0  # drawing sizes: W is wx wide (out) and wh tall (in); X is xw wide (in)
    for ax, kind in zip(axes, ("column", "row")):
        ax.set_xlim(-0.3, 9.3)
        ax.set_ylim(-0.8, 3.0)
        ax.axis("off")
        if kind == "column":
            _matrix(ax, 0, 0.5, xw, 1.0, [], "cols", "X (whole)", f"[{tokens}, {in_f}]")
            _matrix(ax, 3.0, 0, wx, wh, col, "cols", "W split by columns", f"[{in_f}, {out_f}]")
            _matrix(ax, 6.3, 0.5, wx, 1.0, col, "cols", "Y blocks → all-gather", f"[{tokens}, {out_f}]")
            ax.set_title(f"Column parallel on {n} ranks: no communication until Y is needed whole", fontsize=10)
        else:
            _matrix(ax, 0, 0.5, xw, 1.0, row, "cols", "X split by columns", f"[{tokens}, {in_f}]")
            _matrix(ax, 3.0, 0, wx, wh, row, "rows", "W split by rows", f"[{in_f}, {out_f}]")
            _matrix(ax, 6.3, 0.5, wx, 1.0, [], "cols", "Y = Σ partials (all-reduce)", f"[{tokens}, {out_f}]")
            ax.set_title(f"Row parallel on {n} ranks: each rank a full-size partial sum", fontsize=10)
        ax.text(2.5, 1.0, "·", fontsize=22, ha="center", va="center")
        ax.text(5.65, 1.0, "=", fontsize=16, ha="center", va="center")
    handles = [Rectangle((0, 0), 1, 1, facecolor=rank_color(r)) for r in range(n)]
    fig.legend(handles, [f"rank {r}" for r in range(n)], loc="lower center", ncol=n, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_collectives(result: dict, hardware: str):
    """Time and bus bandwidth against message size, from ``collectives.bench_collectives`` (rank 0)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (op, rows) in enumerate(result["ops"].items()):
        sizes = rows["sizes"]
        a1.plot(sizes, [t * 1e6 for t in rows["median_s"]], "o-", color=rank_color(i), label=op)
        a1.fill_between(sizes, [t * 1e6 for t in rows["p10"]], [t * 1e6 for t in rows["p90"]],
                        color=rank_color(i), alpha=0.2)
        a2.plot(sizes, rows["busbw"], "o-", color=rank_color(i), label=op)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_yscale("log")
    a1.set_ylabel("time (µs, median; band p10–p90)")
    a2.set_ylabel("bus bandwidth (GB/s)")
    fig.suptitle(f"{result['backend']} collectives, {result['world_size']} ranks, {result['dtype']} — {hardware}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, output_dir: str, name: str) -> str | None:
    """Save under ``output_dir/figures/name.png`` when an output folder is set (papermill runs)."""
    if not output_dir:
        return None
    d = os.path.join(output_dir, "figures")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
