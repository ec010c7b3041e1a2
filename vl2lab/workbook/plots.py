"""One style for every figure: one colour per rank, titles that say what ran where.

Every plotting function returns the matplotlib Figure (notebooks end the cell with ``;`` or ``plt.show()``) and
never computes numbers itself: it draws what a measured or derived result holds.

Lesson: every notebook; the split drawings are notebook 02, section 1.
"""
from __future__ import annotations

import os

import matplotlib
import matplotlib.pyplot as plt  # matplotlib picks Agg by itself where there is no display
from matplotlib.patches import Rectangle

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


# ------------------------------------------------------------------------------------ notebook 01 (baseline)

_KIND_COLORS = {0: "#9DB8D9", 1: "#DD8452", 2: "#C44E52"}  # image cell, newline, view separator


def _tile_image(t):
    """A normalised tile [3, S, S] in [−1, 1] → an [S, S, 3] array in [0, 1] for imshow."""
    return ((t.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def draw_tiles(image, tiles, crop, layout: dict, title: str = ""):
    """What the processor makes of one picture: the original, the 384×384 global view, the local tiles on the
    chosen canvas (row-major, as cut), and the image-token layout (``baseline.token_layout``): one square per LM
    position, rows as the model lays them out (global 14×14 + a newline per row, the separator, the stitched local
    grid + a newline per row)."""
    import numpy as np

    tw, th = crop
    fig = plt.figure(figsize=(13, 3.6))
    gs = fig.add_gridspec(th, 3 + tw, width_ratios=[th, th, *([1] * tw), 1.4 * th])
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(image)
    ax.set_title(f"original {image.width}×{image.height}", fontsize=9)
    ax = fig.add_subplot(gs[:, 1])
    ax.imshow(_tile_image(tiles[0]))
    ax.set_title("global view 384×384", fontsize=9)
    for i in range(tw * th):
        a = fig.add_subplot(gs[i // tw, 2 + i % tw])
        a.imshow(_tile_image(tiles[1 + i]))
        a.set_title(f"tile {i}", fontsize=8)
        a.axis("off")
    fig.axes[0].axis("off")
    fig.axes[1].axis("off")
    kinds, h = layout["kinds"], 14
    width = max(h + 1, h * tw + 1)
    grid = np.full((h + 1 + h * th, width, 3), 1.0)
    rgb = {k: matplotlib.colors.to_rgb(c) for k, c in _KIND_COLORS.items()}
    sep = layout["separator_at"]
    for j, k in enumerate(kinds):
        if j < sep:
            r, c = divmod(j, h + 1)
        elif j == sep:
            r, c = h, 0
        else:
            r, c = divmod(j - sep - 1, h * tw + 1)
            r += h + 1
        grid[r, c] = rgb[k]
    ax = fig.add_subplot(gs[:, -1])
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(f"{layout['tokens']} image tokens", fontsize=9)
    ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, facecolor=_KIND_COLORS[k]) for k in (0, 1, 2)]
    ax.legend(handles, ["cell", "newline", "separator"], loc="upper center", bbox_to_anchor=(0.5, 0.0),
              ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title or f"canvas {layout['canvas'][0]}×{layout['canvas'][1]}: {tw}×{th} tiles + global = "
                 f"{layout['vit_passes']} ViT passes", fontsize=10)
    fig.tight_layout()
    return fig


def draw_answers(items, cols: int = 4):
    """Scenes with their question, the model's answer and its verdict; grounding boxes drawn (answer solid, truth
    dashed). ``items``: dicts with image, question, answer, truth, ok and, for grounding, boxes (answer),
    truth_boxes (pixels) and iou."""
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items):
        ax.imshow(it["image"])
        for boxes, style in ((it.get("truth_boxes", []), "--"), (it.get("boxes", []), "-")):
            for x1, y1, x2, y2 in boxes:
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ls=style,
                                       edgecolor="black" if style == "--" else "#C44E52"))
        mark = "✓" if it["ok"] else "✗"
        said = f"box, IoU {it['iou']:.2f}" if "iou" in it else repr(it["answer"][:30])
        ax.set_title(f"{it['question']}\n→ {said} {mark}", fontsize=8,
                     color="black" if it["ok"] else "#C44E52")
    fig.tight_layout()
    return fig


def plot_profile(result: dict, hardware: str):
    """Stage times per batch size (stacked: preprocess, vision, projector, LM prefill, decode of the new
    tokens) and throughput, from ``baseline.profile``."""
    runs = result["runs"]
    n = result["new_tokens"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [str(r["batch"]) for r in runs]
    parts = [("preprocess", lambda r: r["times"]["preprocess"]["median"]),
             ("vision", lambda r: r["times"]["vision"]["median"]),
             ("projector", lambda r: r["times"]["projector"]["median"]),
             ("LM prefill", lambda r: r["times"]["prefill"]["median"]),
             (f"decode ({n - 1} steps)", lambda r: r["decode_s_per_token"] * (n - 1))]
    bottom = [0.0] * len(runs)
    for i, (name, f) in enumerate(parts):
        vals = [max(f(r), 0.0) * 1e3 for r in runs]
        a1.bar(labels, vals, bottom=bottom, color=rank_color(i), label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a1.set_xlabel("batch size")
    a1.set_ylabel("time (ms, medians)")
    a1.legend(fontsize=8)
    b = [r["batch"] for r in runs]
    a2.plot(b, [r["tokens_per_s"] for r in runs], "o-", color=rank_color(0), label="new tokens/s")
    a2.set_xlabel("batch size")
    a2.set_ylabel("new tokens/s", color=rank_color(0))
    a3 = a2.twinx()
    a3.plot(b, [r["images_per_s"] for r in runs], "s--", color=rank_color(1), label="images/s (end to end)")
    a3.set_ylabel("images/s (end to end)", color=rank_color(1))
    a2.set_xscale("log", base=2)
    a2.set_xticks(b, [str(x) for x in b])
    a2.minorticks_off()
    a2.grid(alpha=0.3)
    fig.suptitle(f"one image 768×768 + 32-token prompt + {n} new tokens, {result['dtype']} — {hardware}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_prefill_memory(rows, title: str):
    """Measured peak memory of one-shot and chunked prefills beside the prediction, from
    ``baseline.measure_prefill`` rows (MB on a log scale)."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = [f"{r['mode'].split(' (')[0]}\n{r['prefill']}" + (f" {r['chunk']}" if r["prefill"] == "chunked" else "")
             for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [(r["measured_bytes"] or 0) / 1e6 for r in rows], 0.4, color=rank_color(0),
           label="measured peak")
    ax.bar([i + 0.2 for i in x], [r["predicted_bytes"] / 1e6 for r in rows], 0.4, color=rank_color(1),
           label="predicted (sizing)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MB above the loaded model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- notebook 04 (full deployment)

def _segments(ax, y, parts, total, label, height=0.6):
    """One horizontal bar of ``total`` units split into ``parts`` = [(start, end, rank, text)]."""
    for s, e, r, txt in parts:
        ax.add_patch(Rectangle((s / total, y - height / 2), (e - s) / total, height, facecolor=rank_color(r),
                               edgecolor="white", lw=1))
        ax.text((s + e) / 2 / total, y, txt, ha="center", va="center", fontsize=7, color="white")
    ax.text(-0.01, y, label, ha="right", va="center", fontsize=8)


def draw_rank_holdings(plan: dict, config, title: str = ""):
    """What each rank holds (``deploy_checks.holdings_plan``), one colour per rank: attention heads, vocabulary
    rows, dense and shared-expert widths, and the routed experts under moe="tp" (every expert, each rank a slice
    of its width: stripes) and moe="ep" (whole experts per rank)."""
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
    """``deploy_checks.three_layouts`` (one dict per rank): left, the compute intervals of each rank during one
    request in each layout (time from that layout's first interval); right, latency of one request and requests
    per second for the whole batch."""
    names = {"tp": "tensor + expert parallel", "dp": "data parallel (DDP replicas)",
             "layer_split": "layer split (official device_map)"}
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


def plot_ladder(tables: dict, metric: str = "decode_ms_per_step", batch: int = 1, title: str = ""):
    """One bar per rung (log scale) for each model: ``tables`` = {model: ladder_report.rows(...)}; the floor as a
    dashed line."""
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
    ``rows`` as from ``ladder_report.rows``."""
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
