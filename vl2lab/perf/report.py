"""Recorded tuning-ladder runs → tables: every rung beside the first one, the floor and the targets.

Lesson: notebook 05, sections "The ladder" and "Targets".

A ladder JSON (``python -m vl2lab.perf.ladder --out FILE``) holds ``runs`` (one per rung × batch), the device's
measured ceilings and the workload's ``floor`` (see :mod:`vl2lab.perf.roofline`), and with ``--e2e`` an
``end_to_end`` part (images/s from files to answers, :mod:`vl2lab.perf.pipeline_e2e`; :func:`end_to_end_rows`).
Several files of one model (runs cut in parts, on the same machine type) are read together; a rung measured twice
keeps its latest measurement, and :func:`provenance` says which file (which run) each rung comes from.

A decode step is read from ``decode_step_s`` (each step timed on its own: median, p10, p90); files recorded before
that field existed hold only ``decode_ms_per_step``, a difference of two totals ((t(N) − t(1)) / (N − 1)), read as
such and labelled so (:func:`decode_step_ms`).
"""
from __future__ import annotations

import glob
import json
import os
import statistics

from vl2lab.workbook.kernel import in_kernel
from vl2lab.workbook.tables import Table
from vl2lab.workbook.tuning_plots import plot_ladder
from vl2lab.workbook.widgets import show

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(_CHECKOUT, "results", "h200-1gpu")

__all__ = ["RESULTS_DIR", "TARGETS", "load", "decode_step_ms", "rows", "provenance", "target_rows", "peer_rows",
           "profile_rows", "end_to_end_rows", "table", "explore"]

# What the tuned path should reach on one H200 (bf16, random weights at real size): (metric, batch) → (bound, value)
TARGETS = {
    "deepseek-vl2-tiny": {("decode_ms_per_step", 1): ("<=", 0.5), ("images_per_s", 32): (">=", 100.0)},
    "deepseek-vl2-small": {("decode_ms_per_step", 1): ("<=", 2.0), ("decode_ms_per_step", 32): ("<=", 10.0),
                           ("images_per_s", 32): (">=", 35.0)},
    "vision tower": {("tiles_per_s", 32): (">=", 700.0)},
}
SPEEDUP_TARGET = 20.0            # the last rung against the first, same machine, same workload


def load(folder: str, model: str) -> dict:
    """Every ``ladder_<model>_*.json`` in ``folder`` merged (in file-name order): runs, floor, ceilings, peer,
    profiles, environment."""
    files = sorted(glob.glob(os.path.join(folder, f"ladder_{model}_*.json")))
    if not files:
        raise FileNotFoundError(f"no ladder results for {model} in {folder}: run `python -m vl2lab.perf.ladder "
                                f"--model {model} --out {folder}/ladder_{model}_1.json` on the GPU machine")
    merged = {"model": model, "runs": {}, "floor": {}, "peer": [], "profiles": [], "end_to_end": [], "files": files}
    for fn in files:
        with open(fn) as f:
            r = json.load(f)
        for run in r["runs"]:
            if "error" not in run:
                merged["runs"][(run["rung"], run["batch"])] = {**run, "file": os.path.basename(fn),
                                                               "repeats": r.get("repeats")}
        merged["floor"].update(r.get("floor", {}))
        merged["peer"] += [{**p, "file": os.path.basename(fn)} for p in r.get("peer", []) if "error" not in p]
        merged["profiles"] += r.get("profiles", [])
        if "runs" in r.get("end_to_end", {}):
            merged["end_to_end"].append({**r["end_to_end"], "file": os.path.basename(fn)})
        merged["environment"], merged["ceilings"] = r["environment"], r["ceilings"]
    return merged


def decode_step_ms(run: dict) -> dict:
    """One decode step of a recorded run (or peer row), in ms: median, p10, p90, the number of steps timed and
    ``timing``: "per step" (``decode_step_s``) or "difference of totals" (an older file's ``decode_ms_per_step``,
    no spread: p10 and p90 are nan)."""
    d = run.get("decode_step_s")
    if d:
        return {"median": d["median"] * 1e3, "p10": d["p10"] * 1e3, "p90": d["p90"] * 1e3, "n": d["n"],
                "timing": "per step"}
    nan = float("nan")
    return {"median": run.get("decode_ms_per_step", nan), "p10": nan, "p90": nan, "n": 0,
            "timing": "difference of totals"}


def rows(merged: dict) -> list[dict]:
    """One row per (rung, batch): prefill ms, decode ms/step (median, p10, p90), images/s, vision tiles/s, speed-up
    of decode and of images/s against rung 1 at that batch, the floor, and the file the run comes from."""
    runs = merged["runs"]
    out = []
    for (rung, b), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        first = next((x for (n, bb), x in runs.items() if bb == b and n.startswith("1 ")), None)
        nan = float("nan")
        floor = merged["floor"].get(str(b), {})
        d = decode_step_ms(r)
        out.append({"rung": rung, "batch": b, "prefill_ms": r["prefill_s"]["median"] * 1e3,
                    "decode_ms_per_step": d["median"], "decode_p10_ms": d["p10"], "decode_p90_ms": d["p90"],
                    "images_per_s": r["images_per_s"], "tiles_per_s": r["tiles_per_s"],
                    "decode_speedup": decode_step_ms(first)["median"] / d["median"] if first else nan,
                    "images_speedup": r["images_per_s"] / first["images_per_s"] if first else nan,
                    "floor_decode_ms": floor.get("decode_s_per_step", float("nan")) * 1e3,
                    "floor_images_per_s": floor.get("images_per_s", float("nan")),
                    "decode_timing": d["timing"], "file": r.get("file", "")})
    return out


def provenance(merged: dict) -> list[dict]:
    """Which run (file) measured what: one row per file that holds a measurement of the merged table, with the rungs
    it measured (and at which batch sizes), its repeats and how its decode was timed."""
    out = {}
    for (rung, b), r in sorted(merged["runs"].items(), key=lambda kv: (int(kv[0][0].split(" ")[0]), kv[0][1])):
        row = out.setdefault(r.get("file", ""), {"file": r.get("file", ""), "measured": {}, "repeats": r.get("repeats"),
                                                 "decode_timing": set()})
        row["measured"].setdefault(rung.split(" ")[0], []).append(str(b))
        row["decode_timing"].add(decode_step_ms(r)["timing"])
    return [{"file": row["file"], "rungs (batch sizes)": ", ".join(f"{k} ({'/'.join(v)})"
                                                                   for k, v in row["measured"].items()),
             "repeats": row["repeats"], "decode_timing": ", ".join(sorted(row["decode_timing"]))}
            for _, row in sorted(out.items())]


def _best(merged: dict, metric: str, batch: int) -> tuple:
    cands = [(r["rung"], r[metric]) for r in rows(merged) if r["batch"] == batch]
    if not cands:
        return None, float("nan")
    pick = min if metric == "decode_ms_per_step" else max
    return pick(cands, key=lambda c: c[1])


def target_rows(results: dict) -> list[dict]:
    """``results`` maps model name → merged ladder; one row per target: reached, best rung, floor, verdict."""
    out = []
    for model, targets in TARGETS.items():
        sources = results.items() if model == "vision tower" else [(model, results.get(model))]
        for (metric, b), (bound, value) in targets.items():
            best_rung, best = None, float("nan")
            for name, merged in sources:
                if merged is None:
                    continue
                rung, v = _best(merged, metric, b)
                better = (v < best if bound == "<=" else v > best) if best == best else True
                if rung is not None and better:
                    best_rung, best = f"{name}: {rung}" if model == "vision tower" else rung, v
            floor = float("nan")
            m = results.get(model)
            if m is not None and metric == "decode_ms_per_step":
                floor = m["floor"].get(str(b), {}).get("decode_s_per_step", float("nan")) * 1e3
            elif m is not None and metric == "images_per_s":
                floor = m["floor"].get(str(b), {}).get("images_per_s", float("nan"))
            met = best <= value if bound == "<=" else best >= value
            out.append({"model": model, "metric": metric, "batch": b, "target": f"{bound} {value:g}",
                        "reached": best, "floor": floor, "met": bool(met), "best_rung": best_rung})
    for model, merged in results.items():
        for b in sorted({b for (_, b) in merged["runs"]}):
            rs = [r for r in rows(merged) if r["batch"] == b and r["decode_speedup"] == r["decode_speedup"]]
            if not rs:
                continue                                  # no rung 1 at this batch size
            last = min(rs, key=lambda r: r["decode_ms_per_step"])
            out.append({"model": model, "metric": "decode speed-up vs rung 1", "batch": b,
                        "target": f">= {SPEEDUP_TARGET:g}", "reached": last["decode_speedup"], "floor": float("nan"),
                        "met": last["decode_speedup"] >= SPEEDUP_TARGET, "best_rung": last["rung"]})
    return out


def peer_rows(results: dict) -> list[dict]:
    """transformers' own LM (same machine, same run as the last rungs) beside vl2lab's best decode."""
    out = []
    for model, merged in results.items():
        for p in merged["peer"]:
            rung, best = _best(merged, "decode_ms_per_step", p["batch"])
            peer = decode_step_ms(p)["median"]
            out.append({"model": model, "batch": p["batch"], "peer": p["peer"], "peer_decode_ms": peer,
                        "vl2lab_decode_ms": best, "vl2lab_rung": rung, "ratio": peer / best,
                        "peer_timing": decode_step_ms(p)["timing"], "peer_file": p.get("file", "")})
    return out


def profile_rows(merged: dict, top: int = 8) -> list[dict]:
    """The recorded decode-step profiles (the latest of each rung): per profile, its totals and top kernels."""
    out = []
    latest = {p["rung"]: p for p in merged["profiles"] if "error" not in p}
    for p in latest.values():
        for r in p["rows"][:top]:
            out.append({"rung": p["rung"], "kernels_per_step": p["kernels_per_step"],
                        "busy_us_per_step": p["device_busy_us"],
                        "op": r["op"][:60], "calls": r["calls"], "self_us": r["self_us"], "category": r["category"]})
    return out


def end_to_end_rows(merged: dict) -> list[dict]:
    """The recorded end-to-end runs (``--e2e``): one row per number of preprocessing workers: images/s from files
    to answers, beside the same rung and batch from a ready batch (and their ratio), the share of the wall clock
    the model waited for input, the fill (the first wait), the median wait of the later batches and of a batch."""
    out, nan = [], float("nan")
    for e in merged.get("end_to_end", []):
        ready = e.get("ready_batch_images_per_s") or nan
        for r in e["runs"]:
            later = r["wait_s"][1:]
            out.append({"rung": e["rung"], "batch": e["batch"], "images": e["images"], "workers": r["num_workers"],
                        "images_per_s": r["images_per_s"], "ready_batch_images_per_s": ready,
                        "vs_ready": r["images_per_s"] / ready, "wait_fraction": r["wait_fraction"],
                        "fill_ms": r["fill_s"] * 1e3,
                        "later_wait_ms": statistics.median(later) * 1e3 if later else nan,
                        "batch_ms": r["batch_stats_s"]["median"] * 1e3, "same_tokens": e["same_tokens"],
                        "file": e.get("file", "")})
    return out


_COLUMNS = ("rung", "batch", "prefill_ms", "decode_ms_per_step", "decode_p10_ms", "decode_p90_ms", "images_per_s",
            "tiles_per_s", "decode_speedup", "floor_decode_ms")


def table(merged: dict, batch=None, columns=_COLUMNS, caption: str = "") -> Table:
    """The rows of one model (one batch size, or all): a :class:`~vl2lab.workbook.tables.Table` (HTML in a
    notebook, aligned text when printed)."""
    rs = [r for r in rows(merged) if batch is None or r["batch"] == batch]
    return Table([{k: r[k] for k in columns} for r in rs], columns, floatfmt="{:.2f}", caption=caption)


def explore(results: dict, model: str | None = None, batch: int = 1):
    """In a Jupyter kernel, an ipywidgets panel to pick the model, the batch size (of that model's runs) and the
    metric: the table and the chart of the choice, redrawn into the panel's own output. Elsewhere (or without
    ipywidgets) the default view's table, printed. Returns the panel, or None."""
    model = model or next(iter(results))
    try:
        import ipywidgets as W
    except ImportError:
        W = None
    if W is None or not in_kernel():
        print(table(results[model], batch, caption=f"{model}, batch {batch}:"))
        return None
    import matplotlib.pyplot as plt
    from IPython.display import display

    batches = lambda m: sorted({b for (_, b) in results[m]["runs"]})  # noqa: E731
    pick_model = W.Dropdown(options=list(results), value=model, description="model")
    pick_batch = W.Dropdown(options=batches(model), value=batch, description="batch")
    pick_metric = W.Dropdown(options=["decode_ms_per_step", "images_per_s", "prefill_ms", "tiles_per_s"],
                             value="decode_ms_per_step", description="metric")
    out = W.Output()
    busy = []                                          # set while the model's batch sizes are swapped in

    def render(_=None):
        if busy:
            return
        m, b = pick_model.value, pick_batch.value
        fig = plot_ladder({m: rows(results[m])}, pick_metric.value, b)
        plt.close(fig)                                 # ours alone: pyplot must not draw it again at cell end
        with out:
            out.clear_output(wait=True)
            display(table(results[m], b, caption=f"{m}, batch {b}:"))
            display(fig)

    def new_model(change):
        bs = batches(change["new"])
        busy.append(1)
        try:
            keep = pick_batch.value if pick_batch.value in bs else bs[0]
            pick_batch.options = bs
            pick_batch.value = keep
        finally:
            busy.clear()
        render()

    pick_model.observe(new_model, names="value")
    pick_batch.observe(render, names="value")
    pick_metric.observe(render, names="value")
    render()
    box = W.VBox([W.HBox([pick_model, pick_batch, pick_metric]), out])
    return show(box, "[results explorer: pick a model, a batch size and a metric]")
