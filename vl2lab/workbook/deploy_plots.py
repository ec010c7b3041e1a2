"""Figures of the whole model on N ranks (notebook 04): one decode step's collectives in the order the ranks ran
them (:func:`plot_decode_timeline`) and the tensor-parallel speed-up bound beside the article's claim
(:func:`plot_tp_bound`). Rank colours and saving come from :mod:`vl2lab.workbook.plots`; matplotlib is imported
inside each function (heavy, and ranks never draw).

Lesson: notebook 04, sections "5. Communication per generated token" and "7. The article checked".
"""
from __future__ import annotations

from vl2lab.workbook.plots import rank_color

__all__ = ["plot_decode_timeline", "plot_tp_bound"]

_KINDS = {"embed_tokens": ("embedding", "#8C8C8C"), "self_attn": ("attention", "#4C72B0"),
          "mlp": ("feed-forward (MoE or MLP)", "#55A868"), "lm_head": ("lm_head", "#C44E52")}


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def plot_decode_timeline(orders: list, hardware: str, title: str = ""):
    """``orders``: one list per rank of :func:`vl2lab.lessons.sharded_vs_dense.record_order` entries of one decode
    step. One row per rank, time from the step's first entry on any rank: a bar per module forward (its compute
    and, at its end, its collective), a marker where each collective ends it, numbered in order on rank 0."""
    import matplotlib.pyplot as plt

    n = len(orders)
    t0 = min(e["t0"] for o in orders for e in o)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.55 * n))
    for rank, order in enumerate(orders):
        k = 0
        for e in order:
            _, colour = _KINDS[_kind(e["module"])]
            a, b = (e["t0"] - t0) * 1e6, (e["t1"] - t0) * 1e6
            ax.barh(rank, b - a, left=a, height=0.6, color=colour, edgecolor="white", lw=0.5)
            if e["all_reduce"] or e["all_gather"]:
                k += 1
                ax.plot([b], [rank - 0.36], marker="v", ms=5, color="black" if e["all_reduce"] else "#C44E52")
                if rank == 0 and (len(order) <= 40 or k % 5 == 0 or e["all_gather"]):
                    ax.text(b, rank - 0.45, "AG" if e["all_gather"] else str(k), ha="center", va="bottom",
                            fontsize=6)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=name) for name, colour in _KINDS.values()]
    handles += [Line2D([], [], ls="", marker="v", color=c, label=lab)
                for c, lab in (("black", "all-reduce ends"), ("#C44E52", "logits all-gather ends"))]
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"rank {r}" for r in range(n)], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), range(n)):
        tick.set_color(rank_color(r))
    ax.set_ylim(n - 0.5, -0.9)
    ax.set_xlabel("µs since the decode step began (each rank's clock, one host)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(handles=handles, fontsize=7, ncol=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if n > 1 else -0.45))
    ax.set_title(title or f"one decode step, in the order the ranks ran it — {hardware}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_tp_bound(rows: list, claim: tuple, note: str = ""):
    """``rows``: {"variant", "N", "bound" (measured all-reduces), "free" (all-reduces that cost nothing)} per
    variant and GPU count (:func:`vl2lab.perf.tp_bound.tp_speedup_bound`); ``claim``: (N, speed-up, label) of the
    article, drawn as a star. The line y = N is perfect scaling."""
    import matplotlib.pyplot as plt

    colours = ["#4C72B0", "#DD8452", "#8172B3", "#937860"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ns = sorted({r["N"] for r in rows})
    ax.plot(ns, ns, color="#BBBBBB", lw=1, label="N × (perfect scaling)")
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["N"])
        c = colours[i % len(colours)]
        ax.plot([r["N"] for r in mine], [r["free"] for r in mine], "--o", ms=3, color=c, lw=1,
                label=f"{v}: all-reduces free")
        ax.plot([r["N"] for r in mine], [r["bound"] for r in mine], "-o", ms=4, color=c,
                label=f"{v}: measured all-reduces")
    n, s, label = claim
    ax.plot([n], [s], "*", ms=14, color="#C44E52", label=label)
    ax.axhline(1, color="black", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(x) for x in ns])
    ax.set_xlabel("GPUs (tensor parallel)")
    ax.set_ylabel("best speed-up over one GPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(note or "tensor-parallel speed-up bound, one request", fontsize=9)
    fig.tight_layout()
    return fig
