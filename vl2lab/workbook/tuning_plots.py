"""Figures of the tuning notebook (notebook 05): the ladder of changes and the benchmark against its floor.

:func:`plot_ladder` draws one bar per rung, :func:`plot_batch_curve` latency against throughput over batch size,
:func:`plot_bench_floor` a ``vl2lab.perf.bench`` result beside the floor its measured ceilings allow. Colours and
saving come from :mod:`vl2lab.workbook.plots`; matplotlib is imported inside each function (heavy and optional).

Lesson: notebook 05 ("The ladder", batching, the benchmark).
"""
from __future__ import annotations

from vl2lab.workbook.plots import rank_color


def plot_ladder(tables: dict, metric: str = "decode_ms_per_step", batch: int = 1, title: str = ""):
    """One bar per rung (log scale) for each model: ``tables`` = {model: vl2lab.perf.report.rows(...)}; the floor as a
    dashed line."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.6), squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        rs = [r for r in rows if r["batch"] == batch]
        vals = [r[metric] for r in rs]
        ax.bar(range(len(rs)), vals, color=[rank_color(i) for i in range(len(rs))])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        floor_key = "floor_decode_ms" if metric == "decode_ms_per_step" else "floor_images_per_s"
        if rs and rs[0][floor_key] == rs[0][floor_key]:
            ax.axhline(rs[0][floor_key], ls="--", color="k", lw=1, label="floor (measured ceilings)")
            ax.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["rung"].split(" ")[0] for r in rs], fontsize=8)
        ax.set_xlabel("rung", fontsize=8)
        ax.set_ylabel(f"{metric} (batch {batch})", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_batch_curve(rows: list, title: str = ""):
    """Latency (ms per decode step) against throughput (images/s) over batch size, one line per rung:
    ``rows`` as from ``vl2lab.perf.report.rows``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, rung in enumerate(dict.fromkeys(r["rung"] for r in rows)):
        rs = sorted((r for r in rows if r["rung"] == rung), key=lambda r: r["batch"])
        if len(rs) < 2:
            continue
        ax.plot([r["images_per_s"] for r in rs], [r["decode_ms_per_step"] for r in rs], "o-", color=rank_color(i),
                label=rung)
        for r in rs:
            ax.annotate(f"b{r['batch']}", (r["images_per_s"], r["decode_ms_per_step"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("images/s (whole workload)")
    ax.set_ylabel("ms per decode step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_bench_floor(result: dict):
    """The benchmark against its floor: per batch size, measured vs floor for the vision tower, the prefill (which
    includes the vision tower), one decode step and the whole request (log scale); ``result`` from
    ``vl2lab.perf.bench.run``."""
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.4), squeeze=False)
    parts = ("vision", "vision + prefill", "decode step", "request")
    for ax, r in zip(axes[0], runs):
        f = r["floor"]
        meas = [r["vision_s"]["median"], r["prefill_s"]["median"], r["decode_ms_per_token"] / 1e3, r["e2e_s"]["median"]]
        floor = [f["vision_s"], f["vision_s"] + f["prefill_s"], f["decode_s_per_step"], f["e2e_s"]]
        x = range(len(parts))
        ax.bar([i - 0.2 for i in x], [v * 1e3 for v in meas], 0.4, label="measured", color=rank_color(0))
        ax.bar([i + 0.2 for i in x], [v * 1e3 for v in floor], 0.4, label="floor", color=rank_color(2))
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(parts, fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.set_title(f"batch {r['batch']}: {r['images_per_s']:.1f} images/s (floor {r['floor']['images_per_s']:.0f})",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    env = result["environment"]
    fig.suptitle(f"{result['model']}, {result['dtype']}, decode={result.get('decode', 'eager')} — "
                 f"{env.get('gpu', 'CPU')}", fontsize=10)
    fig.tight_layout()
    return fig
