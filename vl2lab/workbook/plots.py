"""One style for every figure, and the figures of ranks working together.

Every plotting function returns the matplotlib Figure (notebooks end the cell with ``;`` or ``plt.show()``) and
never computes numbers itself: it draws what a measured or derived result holds. One colour per rank
(:func:`rank_color`) everywhere; titles say what ran where.

The figures live in four modules, one per kind of question:

- ``plots`` (this one): the shared style (``RANK_COLORS``, ``rank_color``, ``save``) and the figures of several
  ranks — how a linear layer is split and what collectives cost (notebook 02), what each rank holds and how the
  three layouts compare (notebook 04);
- ``tp_plots``: where f and g communicate in a column → row block, forward and backward (notebook 02);
- ``baseline_plots``: one model on one device — tiles, answers, stage times, prefill memory (notebook 01);
- ``tuning_plots``: the tuning ladder and the benchmark against its floor (notebook 05).

matplotlib is imported inside each figure function: it is heavy, and ranks and tests that draw nothing never
load it (it picks the Agg backend by itself where there is no display).

Lesson: every notebook; the split drawings are notebook 02, section 1.
"""
from __future__ import annotations

import os

RANK_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
GREY = "#D0D0D0"


def rank_color(rank: int) -> str:
    """The colour of ``rank`` in every figure of the workbook."""
    return RANK_COLORS[rank % len(RANK_COLORS)]


def save(fig, output_dir: str, name: str) -> str | None:
    """Save under ``output_dir/figures/name.png`` when an output folder is set (papermill runs)."""
    if not output_dir:
        return None
    d = os.path.join(output_dir, "figures")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# -------------------------------------------------------------------------------- notebook 02 (tensor-parallel maths)

def _matrix(ax, x0, y0, w, h, blocks, axis, label, shape_txt):
    """Draw a w×h matrix at (x0, y0); ``blocks`` = [(start, end, colour)] along ``axis`` ('cols'|'rows'),
    given as fractions of the full extent."""
    from matplotlib.patches import Rectangle

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
    """Column and row splits of Y = X·W (W in the maths layout [in, out]) from
    ``vl2lab.lessons.tp_layers.shard_table``.

    Column: W split by output columns, X whole on every rank, each rank a block of Y's columns.
    Row: W split by input rows, X split by the matching columns, each rank a full-size partial Y; Y = Σ.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

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


def plot_collectives(result: dict, hardware: str, marks: dict | None = None):
    """Time and bus bandwidth against message size, from ``vl2lab.perf.collectives.bench_collectives`` (rank 0).
    ``marks`` {label: bytes}: message sizes to mark with a dotted line on the time axis (e.g. one decode step's
    all-reduce for each model)."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (label, nbytes) in enumerate((marks or {}).items()):
        a1.axvline(nbytes, color="grey", ls=":", lw=1)
        a1.annotate(label, (nbytes, 0.98 - 0.09 * i), xycoords=("data", "axes fraction"), fontsize=7,
                    color="dimgrey", ha="left", va="top", rotation=0, xytext=(2, 0), textcoords="offset points")
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


# ------------------------------------------------------------------------------------ notebook 04 (full deployment)

def _segments(ax, y, parts, total, label, height=0.6):
    """One horizontal bar of ``total`` units split into ``parts`` = [(start, end, rank, text)]."""
    from matplotlib.patches import Rectangle

    for s, e, r, txt in parts:
        ax.add_patch(Rectangle((s / total, y - height / 2), (e - s) / total, height, facecolor=rank_color(r),
                               edgecolor="white", lw=1))
        ax.text((s + e) / 2 / total, y, txt, ha="center", va="center", fontsize=7, color="white")
    ax.text(-0.01, y, label, ha="right", va="center", fontsize=8)


def draw_rank_holdings(plan: dict, config, title: str = ""):
    """What each rank holds (``vl2lab.parallel.plan.holdings_by_rank``), one colour per rank: attention
    heads, vocabulary rows, dense and shared-expert widths, and the routed experts under moe="tp" (every expert,
    each rank a slice of its width: stripes) and moe="ep" (whole experts per rank)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lc = getattr(config, "language_config", config)
    rows = next(v for v in plan.values() if isinstance(v, list))
    n = len(rows)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    y = 7.0

    def bar(key, total, label, start_key=None):
        nonlocal y
        parts, s = [], 0
        for r in rows:
            a, b = r[start_key] if start_key else (s, s + r[key])
            parts.append((a, b, r["rank"], str(b - a)))
            s = b
        _segments(ax, y, parts, total, label)
        y -= 1
    bar("heads", lc.num_attention_heads, f"attention heads ({lc.num_attention_heads})", "head_range")
    bar("vocab", lc.vocab_size, f"vocabulary rows ({lc.vocab_size})", "vocab_rows")
    if "dense_width" in rows[0]:
        bar("dense_width", lc.intermediate_size, f"dense MLP width ({lc.intermediate_size})")
    if "shared_width" in rows[0]:
        bar("shared_width", sum(r["shared_width"] for r in rows), "shared-experts width")
    E = lc.n_routed_experts or 0
    if E and isinstance(plan.get("tp"), list):
        h = 0.6 / n
        for e in range(E):
            for k, r in enumerate(plan["tp"]):
                ax.add_patch(Rectangle((e / E, y + 0.3 - (k + 1) * h), 1 / E, h, facecolor=rank_color(r["rank"]),
                                       edgecolor="white", lw=0.3))
        ax.text(-0.01, y, f"{E} experts, moe='tp'\n(each: width / {n})", ha="right", va="center", fontsize=8)
        y -= 1
    if E and isinstance(plan.get("ep"), list):
        _segments(ax, y, [(*r["experts"], r["rank"], f"{r['experts'][1] - r['experts'][0]}") for r in plan["ep"]],
                  E, f"{E} experts, moe='ep'\n(whole experts)")
        y -= 1
    for r in range(n):
        ax.add_patch(Rectangle((0.02 + 0.12 * r, y - 0.1), 0.03, 0.4, facecolor=rank_color(r)))
        ax.text(0.06 + 0.12 * r, y + 0.1, f"rank {r}", va="center", fontsize=8)
    ax.set_xlim(-0.32, 1.01)
    ax.set_ylim(y - 0.6, 7.6)
    ax.axis("off")
    ax.set_title(title or f"what each of {n} ranks holds (replicated on every rank: vision tower, projector, "
                          "norms, router)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_three_layouts(results: list, hardware: str):
    """``vl2lab.lessons.three_layouts.three_layouts`` (one dict per rank): left, the compute intervals of each rank
    during one request in each layout (time from that layout's first interval); right, latency of one request and
    requests per second for the whole batch."""
    import matplotlib.pyplot as plt

    names = {"tp": "tensor + expert parallel", "dp": "data parallel (DDP replicas)",
             "layer_split": "layer split (after the official recipe)"}
    n = len(results)
    fig = plt.figure(figsize=(12, 5))
    gs = fig.add_gridspec(3, 2, width_ratios=[2.2, 1])
    for i, key in enumerate(names):
        ax = fig.add_subplot(gs[i, 0])
        spans = [(r["rank"], a, b) for r in results for a, b in r[key]["intervals"] if b is not None]
        t0 = min((a for _, a, _ in spans), default=0.0)
        for rank, a, b in spans:
            ax.barh(rank, (b - a) * 1e3, left=(a - t0) * 1e3, color=rank_color(rank), height=0.7)
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"rank {r}" for r in range(n)], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{names[key]}: one request", fontsize=9, loc="left")
        ax.grid(alpha=0.3, axis="x")
        if i == 2:
            ax.set_xlabel("ms since the first forward")
    r0 = results[0]
    lat = [r0[k]["latency_s"] * 1e3 for k in names]
    thr = [r0["n_requests"] / r0[k]["batch_s"] for k in names]
    ax = fig.add_subplot(gs[0:2, 1])
    ax.bar(range(3), lat, color=[rank_color(k) for k in range(3)])
    ax.set_xticks(range(3))
    ax.set_xticklabels(["TP", "DP", "layer\nsplit"], fontsize=8)
    ax.set_ylabel("ms per request (alone)", fontsize=8)
    ax2 = fig.add_subplot(gs[2, 1])
    ax2.bar(range(3), thr, color=[rank_color(k) for k in range(3)])
    ax2.set_xticks(range(3))
    ax2.set_xticklabels(["TP", "DP", "layer split"], fontsize=8)
    ax2.set_ylabel(f"requests/s ({r0['n_requests']})", fontsize=8)
    fig.suptitle(f"{n} ranks, {r0['max_new_tokens']} new tokens per request — {hardware}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_param_bytes_per_rank(rows: dict, title: str):
    """Parameter bytes each rank holds under several layouts: ``rows`` = {layout: [bytes of rank 0, 1, ...]}, one
    colour per rank."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.4))
    names = list(rows)
    n = max(len(v) for v in rows.values())
    w = 0.8 / n
    for i, name in enumerate(names):
        for r, b in enumerate(rows[name]):
            ax.bar(i + (r - (n - 1) / 2) * w, b / 2**20, w, color=rank_color(r), label=f"rank {r}" if i == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("MiB of parameters")
    ax.legend(fontsize=8, ncol=n)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
