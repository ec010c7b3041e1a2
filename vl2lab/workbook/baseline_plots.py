"""Figures of one model on one device (notebook 01, the single-GPU baseline).

What the processor makes of a picture (:func:`draw_tiles`), what the model answered (:func:`draw_answers`), where
the time of one request goes (:func:`plot_profile`) and the memory of a prefill beside its prediction
(:func:`plot_prefill_memory`). Colours and saving come from :mod:`vl2lab.workbook.plots`; matplotlib is imported
inside each function (heavy and optional).

Lesson: notebook 01 (sections on the processor, the answers, the stage profile and prefill memory).
"""
from __future__ import annotations

import numpy as np

from vl2lab.workbook.plots import rank_color

_KIND_COLORS = {0: "#9DB8D9", 1: "#DD8452", 2: "#C44E52"}  # image cell, newline, view separator


def _tile_image(t):
    """A normalised tile [3, S, S] in [−1, 1] → an [S, S, 3] array in [0, 1] for imshow."""
    return ((t.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def draw_tiles(image, tiles, crop, layout: dict, title: str = ""):
    """What the processor makes of one picture: the original, the 384×384 global view, the local tiles on the
    chosen canvas (row-major, as cut), and the image-token layout (``vl2lab.lessons.baseline.token_layout``): one
    square per LM position, rows as the model lays them out (global 14×14 + a newline per row, the separator, the
    stitched local grid + a newline per row)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Rectangle

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
    rgb = {k: to_rgb(c) for k, c in _KIND_COLORS.items()}
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
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

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
    tokens) and throughput, from ``vl2lab.lessons.baseline.profile``."""
    import matplotlib.pyplot as plt

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
    ``vl2lab.lessons.baseline.measure_prefill`` rows (MB on a log scale)."""
    import matplotlib.pyplot as plt

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
