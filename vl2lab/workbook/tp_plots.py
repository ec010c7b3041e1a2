"""Megatron's f and g in a column → row block, forward and backward: where each rank works alone and where the
ranks add up.

Lesson: notebook 02, section "3. Column → row: one all-reduce per block".

:func:`draw_fg_block` draws :func:`vl2lab.lessons.tp_layers.column_row_block`: one lane per rank, one column per
stage. A stage that is ``local`` is one box per rank in the rank's colour (its shard, its block [s, e) of the
intermediate dimension); an ``all-reduce`` is one dark box across every lane (the ranks wait for each other and
all leave with the sum); an ``identity`` is a dashed box in each lane (nothing moves). The forward panel runs
left to right, the backward panel right to left, so f and g swap roles between the two.
"""
from __future__ import annotations

from vl2lab.workbook.plots import rank_color

__all__ = ["draw_fg_block", "ALL_REDUCE_COLOR"]

ALL_REDUCE_COLOR = "#2F2F2F"
_W, _H = 0.78, 0.62          # a box's width and height, in stage and lane units


def _label(stage: dict, block: tuple) -> str:
    s, e = block
    return stage["code"].replace("s:e", f"{s}:{e}").replace(" + ", "\n+ ")


def _panel(ax, block: dict, direction: str) -> None:
    from matplotlib.patches import FancyBboxPatch, Rectangle

    stages, n = block["stages"], block["world_size"]
    lanes = [n - 1 - r for r in range(n)]                          # rank 0 on top
    top, bottom = n - 1 + _H / 2, -_H / 2
    for i, st in enumerate(stages, start=1):
        what = st[direction]
        ax.text(i, top + 0.25, f"{st['stage']}\n{st['code']}" if what != "local" else st["stage"],
                ha="center", va="bottom", fontsize=8, weight="bold")
        if what == "all-reduce":
            ax.add_patch(Rectangle((i - _W / 2, bottom), _W, top - bottom, facecolor=ALL_REDUCE_COLOR,
                                   edgecolor="black", gid=f"all-reduce:{st['stage']}"))
            ax.text(i, (top + bottom) / 2, "all-reduce\n(Σ ranks)", ha="center", va="center", fontsize=8,
                    color="white", weight="bold")
            continue
        for r, y in enumerate(lanes):
            if what == "identity":
                ax.add_patch(Rectangle((i - _W / 2, y - _H / 2), _W, _H, facecolor="white", edgecolor="grey",
                                       ls="--", gid=f"identity:{st['stage']}:{r}"))
                ax.text(i, y, "identity", ha="center", va="center", fontsize=7, color="grey")
            else:
                ax.add_patch(FancyBboxPatch((i - _W / 2, y - _H / 2), _W, _H, boxstyle="round,pad=0.02",
                                            facecolor=rank_color(r), edgecolor="black", lw=0.6,
                                            gid=f"local:{st['stage']}:{r}"))
                ax.text(i, y, _label(st, block["blocks"][r]), ha="center", va="center", fontsize=7,
                        color="white")
    last = len(stages) + 1
    ends = ("X, whole", "Y, whole") if direction == "forward" else ("dL/dX, whole", "dL/dY, whole")
    for r, y in enumerate(lanes):
        ax.text(0, y, ends[0], ha="center", va="center", fontsize=8)
        ax.text(last, y, ends[1], ha="center", va="center", fontsize=8)
        ax.text(-0.75, y, f"rank {r}", ha="right", va="center", fontsize=8, color=rank_color(r), weight="bold")
        for i in range(last):                                        # arrows between neighbours
            a, b = (i + 0.42, i + 0.58) if direction == "forward" else (i + 0.58, i + 0.42)
            ax.annotate("", xy=(b, y), xytext=(a, y), arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.8})
    ax.set_xlim(-1.2, last + 0.6)
    ax.set_ylim(bottom - 0.3, top + 0.95)
    ax.axis("off")


def draw_fg_block(block: dict):
    """Forward (top) and backward (bottom) of a column → row block on ``block['world_size']`` ranks, from
    :func:`vl2lab.lessons.tp_layers.column_row_block`. Each patch carries a ``gid`` — ``all-reduce:<stage>``,
    ``identity:<stage>:<rank>`` or ``local:<stage>:<rank>`` — naming what it draws."""
    import matplotlib.pyplot as plt

    n = block["world_size"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.2 + 1.3 * max(n, 2)))
    for ax, direction in zip(axes, ("forward", "backward")):
        _panel(ax, block, direction)
        comm = [st["stage"] for st in block["stages"] if st[direction] == "all-reduce"]
        arrow = "left to right" if direction == "forward" else "right to left"
        ax.set_title(f"{direction} ({arrow}): the all-reduce sits in {' and '.join(comm)}", fontsize=10, loc="left")
    fig.suptitle(f"A column → row block on {n} rank{'s' * (n != 1)}: intermediate dimension "
                 f"{block['intermediate']} split as {[e - s for s, e in block['blocks']]}", fontsize=10)
    fig.tight_layout()
    return fig
