"""Figures of the tuning notebook (notebook 05): the ladder of changes and the benchmark against its floor.

:func:`plot_ladder` draws one bar per rung, :func:`plot_ladder_floor` every rung's decode step against the floor
(bytes one step must read / copy bandwidth), :func:`plot_batch_curve` latency against throughput over batch size,
:func:`plot_bench_floor` a ``vl2lab.perf.bench`` result beside the floor its measured ceilings allow. Colours and
saving come from :mod:`vl2lab.workbook.plots`; matplotlib is imported inside each function (heavy and optional).

Lesson: notebook 05 ("The ladder", batching, the benchmark).
"""
from __future__ import annotations

from vl2lab.workbook.plots import rank_color


def _plain_log_axis(ax) -> None:
    """Log-scale y axis with plain numbers (0.3, 2, 50) rather than 3×10⁻¹ on its ticks."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    lo, hi = ax.get_ylim()
    if hi / lo < 30:                                   # under ~1.5 decades: label the 2s and 5s too
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def plot_ladder(tables: dict, metric: str = "decode_ms_per_step", batch: int = 1, title: str = ""):
    """One bar per rung (log scale) for each model: ``tables`` = {model: vl2lab.perf.report.rows(...)}; the floor as a
    dashed line; for decode, the p10–p90 spread of the steps as a whisker where the run recorded it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.6), squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        rs = [r for r in rows if r["batch"] == batch]
        vals = [r[metric] for r in rs]
        ax.bar(range(len(rs)), vals, color=[rank_color(i) for i in range(len(rs))])
        spread = [(i, r) for i, r in enumerate(rs) if metric == "decode_ms_per_step"
                  and r.get("decode_p10_ms", float("nan")) == r.get("decode_p10_ms", float("nan"))]
        if spread:
            ax.errorbar([i for i, _ in spread], [r[metric] for _, r in spread], fmt="none", ecolor="k", lw=0.8,
                        capsize=2, yerr=[[r[metric] - r["decode_p10_ms"] for _, r in spread],
                                         [r["decode_p90_ms"] - r[metric] for _, r in spread]])
        tops = {i: r["decode_p90_ms"] for i, r in spread}
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, tops.get(i, v)), ha="center", va="bottom", fontsize=7,
                        textcoords="offset points", xytext=(0, 2))
        floor_key = "floor_decode_ms" if metric == "decode_ms_per_step" else "floor_images_per_s"
        if rs and rs[0][floor_key] == rs[0][floor_key]:
            ax.axhline(rs[0][floor_key], ls="--", color="k", lw=1, label="floor (measured ceilings)")
            ax.legend(fontsize=7, loc="lower left")
        ax.margins(y=0.15)
        _plain_log_axis(ax)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["rung"].split(" ")[0] for r in rs], fontsize=8)
        ax.set_xlabel("rung", fontsize=8)
        ax.set_ylabel(f"{metric} (batch {batch})", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ladder_floor(tables: dict, batches=(1, 32), title: str = ""):
    """Each rung's decode step (median, p10–p90 whisker where recorded) against its floor, one panel per model,
    one line per batch size: the floor (dashed, same colour) is the bytes one step must read (weights + KV cache)
    over the measured copy bandwidth; the label over each point is measured / floor. ``tables`` =
    {model: vl2lab.perf.report.rows(...)}."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.4 * len(tables), 3.8), squeeze=False, sharey=True)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        names = sorted({r["rung"] for r in rows}, key=lambda n: int(n.split(" ")[0]))
        for j, b in enumerate(batches):
            rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: names.index(r["rung"]))
            if not rs:
                continue
            x = [names.index(r["rung"]) for r in rs]
            y = [r["decode_ms_per_step"] for r in rs]
            lo = [v - (r["decode_p10_ms"] if r["decode_p10_ms"] == r["decode_p10_ms"] else v) for v, r in zip(y, rs)]
            hi = [(r["decode_p90_ms"] if r["decode_p90_ms"] == r["decode_p90_ms"] else v) - v for v, r in zip(y, rs)]
            c = rank_color(2 * j)
            ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", color=c, capsize=2, lw=1.2, label=f"batch {b}")
            floor = rs[0]["floor_decode_ms"]
            if floor == floor:
                ax.axhline(floor, ls="--", color=c, lw=1, label=f"floor, batch {b}")
                for xi, v in zip(x, y):                    # first batch's labels below its points, the next above
                    ax.annotate(f"{v / floor:.0f}×" if v / floor >= 10 else f"{v / floor:.1f}×", (xi, v),
                                textcoords="offset points", xytext=(5, -11 if j == 0 else 5), fontsize=7, color=c)
        ax.margins(x=0.08, y=0.12)
        _plain_log_axis(ax)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split(" ")[0] for n in names], fontsize=8)
        ax.set_xlabel("rung (labels: measured / floor)", fontsize=8)
        ax.set_ylabel("ms per decode step", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower left")
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
        step = r["decode_step_s"]["median"] if r.get("decode_step_s") else r["decode_ms_per_token"] / 1e3  # older files
        meas = [r["vision_s"]["median"], r["prefill_s"]["median"], step, r["e2e_s"]["median"]]
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
