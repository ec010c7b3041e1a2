"""The planner in a notebook: the default plan printed (so papermill and nbval can check it), and an ipywidgets
panel that re-plans on every change.

Lesson: notebook 01, section "5. Will it fit? The planner".
"""
from __future__ import annotations

import html
import inspect

from vl2lab.model.config import preset_name
from vl2lab.planner.plan import DTYPES, PlanError, parse_image_size, plan
from vl2lab.workbook.kernel import in_kernel
from vl2lab.workbook.widgets import show

__all__ = ["panel", "show_planner", "report"]


_VARIANTS = (("tiny", "deepseek-vl2-tiny"), ("small", "deepseek-vl2-small"), ("base", "deepseek-vl2"))
_GPU_GB = (16, 24, 32, 40, 48, 80, 94, 141, 192)
_SIZES = ("384x384", "768x768", "1152x1152", "1024x768", "1920x1080", "384x3456")
_CONTEXTS = (("request length", None), ("2048", 2048), ("4096", 4096), ("8192", 8192))
_MOE = (("tp and ep", ("tp", "ep")), ("tp only", ("tp",)), ("ep only", ("ep",)))


def report(**kw) -> str:
    """Table + commands of ``plan(**kw)``, or the planner's error: what the panel and show_planner print."""
    try:
        p = plan(**kw)
    except PlanError as e:
        return f"error: {e}"
    return p.table() + "\n\n" + p.commands_text()


def panel(**defaults):
    """An ipywidgets panel over :func:`plan`: every control re-plans on change and rewrites the report.
    ``defaults`` are :func:`plan` keywords (variant, dtype, gpu_gb, n_gpus, batch, images_per_prompt,
    image_size, context, moe_modes, vision, margin)."""
    import ipywidgets as W

    kw = {**_plan_defaults(), **defaults}
    kw["variant"] = preset_name(kw["variant"])
    kw["moe_modes"] = tuple(m for m in ("tp", "ep") if m in kw["moe_modes"])
    kw["vision"] = {"data_parallel": "dp"}.get(kw["vision"], kw["vision"])
    size = "{}x{}".format(*parse_image_size(kw["image_size"]))
    opts = lambda seq, v: list(seq) + ([v] if v not in seq else [])
    known = kw["variant"] in dict(_VARIANTS).values()  # else vl2-micro or random-*: its own entry
    variants = list(_VARIANTS) + ([] if known else [(kw["variant"], kw["variant"])])
    c = {"variant": W.Dropdown(options=variants, value=kw["variant"], description="variant"),
         "dtype": W.Dropdown(options=DTYPES, value=kw["dtype"], description="dtype"),
         "gpu_gb": W.Dropdown(options=opts(_GPU_GB, kw["gpu_gb"]), value=kw["gpu_gb"], description="GPU GB"),
         "n_gpus": W.IntSlider(value=kw["n_gpus"], min=1, max=max(16, kw["n_gpus"]), description="GPUs"),
         "batch": W.IntSlider(value=kw["batch"], min=1, max=max(64, kw["batch"]), description="batch"),
         "images_per_prompt": W.IntSlider(value=kw["images_per_prompt"], min=0, max=max(6, kw["images_per_prompt"]),
                                          description="images"),
         "image_size": W.Dropdown(options=opts(_SIZES, size), value=size, description="image px"),
         "context": W.Dropdown(options=opts(_CONTEXTS, (str(kw["context"]), kw["context"]))
                               if kw["context"] not in dict(_CONTEXTS).values() else _CONTEXTS,
                               value=kw["context"], description="context"),
         "moe_modes": W.Dropdown(options=_MOE, value=tuple(kw["moe_modes"]), description="MoE"),
         "vision": W.Dropdown(options=("replicated", "dp", "tp"), value=kw["vision"], description="ViT")}
    view = W.HTML()
    fixed = {k: v for k, v in kw.items() if k not in c}

    def render(_=None):
        text = report(**fixed, **{k: w.value for k, w in c.items()})
        view.value = "<pre style='font-size:11px'>" + html.escape(text) + "</pre>"

    for w in c.values():
        w.observe(render, names="value")
    render()
    box = W.VBox([W.HBox(list(c.values())[:4]), W.HBox(list(c.values())[4:8]), W.HBox(list(c.values())[8:]), view])
    box.controls, box.view = c, view
    return box


def _plan_defaults() -> dict:
    return {k: v.default for k, v in inspect.signature(plan).parameters.items()}


def show_planner(**defaults):
    """Notebook cell form: the report of the default setting, once. In a Jupyter kernel with ipywidgets it is the
    panel (its first view is that report, and the report's text is what a saved notebook keeps, so papermill and
    nbval see the same deterministic text); elsewhere the report is printed. Returns the panel, or None."""
    text = report(**defaults)
    try:
        box = panel(**defaults)
    except ImportError:
        box = None
    if box is None or not in_kernel():
        print(text)
        return box
    return show(box, text)
