"""The planner: will a real DeepSeek-VL2 fit my GPUs, and how should I split it?

``plan(variant, dtype, gpu_gb, n_gpus, batch, images_per_prompt, image_size, context)`` turns a workload into
bytes per GPU with :mod:`vl2lab.planner.layouts` (no maths of its own) for one GPU and for every legal layout of the
GPUs, picks one, and writes the commands that run it (:mod:`vl2lab.planner.commands`: vl2lab, vLLM, SGLang).
:mod:`vl2lab.planner.panel` is the notebook's interactive form of the same thing; ``python -m vl2lab plan`` its
command line (:mod:`vl2lab.planner.cli`).

Request length (what one sequence holds), from :func:`vl2lab.inputs.tiling.image_layout`::

    L = n_images · N_img + text_tokens + new_tokens      N_img = 421 (1 tile) … 2101 (1×9 tiles); with ≥ 3
                                                          images no image is tiled: 421 each (official rule);
                                                          the variant's own tile geometry (vl2-micro: 145 … 721)

L must fit the context (4096, the trained length). KV cache and activations are sized for ``context`` tokens
per sequence (what a server with ``--max-model-len context`` must hold for a full-length request), or for L
when ``context=None``. Per GPU: total = weights + KV + activations ≤ usable = gpu · (1 − margin) − 0.5 GB, the
activations being one prefill of every in-flight sequence at full length (an upper bound: servers chunk it).
``gpu_gb`` is read as 10⁹ bytes, which is conservative: an "80 GB" A100/H100 has 80 GiB = 85.9·10⁹ bytes.
Parameter counts print with the unit that fits (3.37B, 3.29M: :func:`vl2lab.planner.sizing.format_count`).

A layout is (tp, ep, dp, moe) with tp·dp = n_gpus: dp replicas of a tp-rank group; moe="tp" splits every
expert by width over the group, moe="ep" places whole experts, over the group (ep = tp) or over all GPUs
(ep = n_gpus: data-parallel attention with shared experts, vLLM's ``--data-parallel-size --enable-expert-parallel``).
``batch`` is the number of sequences in flight on the whole deployment; each replica takes ceil(batch/dp).

Lesson: notebook 01, section "5. Will it fit? The planner".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vl2lab.inputs.tiling import image_layout
from vl2lab.model.config import ConfigError, get_config, preset_name
from vl2lab.parallel.plan import vision_mode
from vl2lab.planner import layouts as L
from vl2lab.planner.commands import (default_model, engine_note, multinode_lines, sglang_lines, vl2lab_lines,
                                     vllm_lines)
from vl2lab.planner.sizing import CUDA_CONTEXT_BYTES, format_count, format_table, gb, param_counts

DTYPES = ("bfloat16", "float16", "float32")
# what `variant` accepts (vl2lab.model.config.preset_name; case-insensitive, a deepseek-ai/ prefix is dropped)
VARIANTS = ("tiny", "small", "base", "deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2", "deepseek-vl2-base",
            "vl2-micro", "random-tiny", "random-small", "random-base")


class PlanError(ValueError):
    """A workload the planner cannot size (the message says what to change). ``arg``: the :func:`plan` keyword
    the message starts with, when one value alone is wrong (the command line names its option instead)."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


def parse_image_size(size) -> tuple[int, int]:
    """(w, h), [w, h] or "WxH" → (w, h) positive ints."""
    try:
        w, h = (size.lower().replace("×", "x").split("x") if isinstance(size, str) else size)
        w, h = int(w), int(h)
    except (ValueError, TypeError, AttributeError):
        raise PlanError(f"image_size {size!r} is not WIDTHxHEIGHT (e.g. 768x768 or (768, 768))", "image_size") from None
    if w < 1 or h < 1:
        raise PlanError(f"image_size {w}x{h}: both sides must be at least 1 pixel", "image_size")
    return w, h


@dataclass
class Plan:
    """What :func:`plan` found. Byte fields are bytes; ``layouts`` rows are sorted by the recommendation rule."""
    cfg: object
    settings: dict
    request: dict
    usable: float
    single: dict
    layouts: list
    recommended: dict | None
    warnings: list = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ lookups
    def layout(self, tp: int, moe: str = "tp", ep: int | None = None) -> dict:
        """The row of layout (tp, moe[, ep]) (fitting or not); PlanError if it is not a legal layout here."""
        for r in self.layouts:
            if r["tp"] == tp and r["moe"] == moe and (ep is None or r["ep"] == ep):
                return r
        legal = sorted({(r["tp"], r["moe"], r["ep"]) for r in self.layouts})
        raise PlanError(f"no legal layout tp={tp} moe={moe} ep={ep} for {self.cfg.name} on "
                        f"{self.settings['n_gpus']} GPUs; legal (tp, moe, ep): {legal}")

    # ------------------------------------------------------------------------------------------- output
    def table(self) -> str:
        """Deterministic plain-text report: the request, one GPU, every layout, the pick and the warnings."""
        s, r, c = self.settings, self.request, param_counts(self.cfg)
        n = s["images_per_prompt"]
        img = (f"{n} image{'s' if n > 1 else ''} {r['image_size'][0]}x{r['image_size'][1]} -> "
               f"{r['tiles_per_image'][0]}x{r['tiles_per_image'][1]} tiles + global = {r['vit_passes']} ViT "
               f"passes, {r['image_tokens']} tokens each" if s["images_per_prompt"] else "no image")
        rows = ([_fmt(self.single, "1 GPU")] if s["n_gpus"] > 1 else []) + \
            [_fmt(x, "* pick" if x is self.recommended else "") for x in self.layouts]
        lines = [f"{self.cfg.name}: {format_count(c['total'])} parameters ({format_count(c['activated'])} activated), "
                 f"{s['dtype']}",
                 f"GPUs: {s['n_gpus']} x {s['gpu_gb']:g} GB, usable {gb(self.usable):.2f} GB each "
                 f"(= {s['gpu_gb']:g} x {1 - s['margin']:g} - {gb(CUDA_CONTEXT_BYTES):g} CUDA context)",
                 f"request: {img}; + {s['text_tokens']} text + {s['new_tokens']} new = {r['seq_len']} tokens",
                 f"sized per sequence: {r['planned_len']} tokens"
                 f" ({'context' if s['context'] else 'request length'}), {_n(s['batch'], 'sequence')} in flight",
                 "", format_table(rows, floatfmt="{:.2f}"), ""]
        if self.recommended:
            x = self.recommended
            lines.append(f"pick: tp={x['tp']} ep={x['ep']} dp={x['dp']} moe={x['moe']}: {_n(x['group'], 'GPU')} per "
                         f"model copy, {_n(x['batch_per_replica'], 'sequence')} each, "
                         f"{gb(x['headroom']):.2f} GB free per GPU")
        else:
            lines.append("pick: none fits; " + self.request["hint"])
        lines += ["rule: fewest GPUs per model copy, then TP-split experts before EP, then the smallest per-GPU "
                  "total; the other GPUs become data-parallel replicas"]
        lines += [f"vLLM can't: tp={t} ({why})" for t, why in
                  dict.fromkeys((x["tp"], x["vllm_problem"]) for x in self.layouts if x["vllm_problem"])]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def commands(self, layout: dict | None = None, model_path: str | None = None, image: str = "image.jpg",
                 prompt: str = "Describe this image.") -> dict:
        """Shell lines ({"vl2lab", "vllm", "sglang"[, "multinode"]}) for ``layout`` (default: the pick).
        ``model_path``: the vl2lab command's --model (default: ``vl2-micro`` / the ``random-*`` preset name, which
        vl2lab.serve.generate loads as such; ``/path/to/<variant>`` with a comment for the real variants)."""
        lay = layout or self.recommended
        if lay is None:
            raise PlanError("no layout fits, so there is nothing to launch; " + self.request["hint"])
        model, note = (model_path, []) if model_path else default_model(self.cfg.name)
        eng = engine_note(self.cfg.name)
        out = {"vl2lab": note + vl2lab_lines(self, lay, model, image, prompt), "vllm": eng + vllm_lines(self, lay),
               "sglang": eng + sglang_lines(self, lay)}
        if self.settings["n_gpus"] > self.settings["gpus_per_node"]:
            mn = multinode_lines(self, lay, model, image, prompt)
            out["multinode"] = (note if any(x.startswith("torchrun") for x in mn) else []) + mn
        return out

    def commands_text(self, layout: dict | None = None, **kw) -> str:
        if (layout or self.recommended) is None:
            return "commands: none (no layout fits)"
        return "\n".join(f"[{k}]\n" + "\n".join(v) for k, v in self.commands(layout, **kw).items())

    def to_dict(self) -> dict:
        """JSON-ready: settings, request, GB figures of every row, the pick, warnings and commands."""
        gbrow = lambda x: {k: (round(gb(v), 3) if k in _BYTES else v) for k, v in x.items()
                           if k != "weight_parts"}
        return {"variant": self.cfg.name, "settings": {**self.settings, "moe_modes": list(self.settings["moe_modes"])},
                "request": self.request, "usable_GB": round(gb(self.usable), 3), "single_gpu": gbrow(self.single),
                "layouts": [gbrow(x) for x in self.layouts],
                "recommended": gbrow(self.recommended) if self.recommended else None,
                "warnings": self.warnings, "commands": self.commands() if self.recommended else None}


_BYTES = ("weights", "kv_cache", "activations", "total", "headroom", "weights_replicated", "weights_sharded",
          "usable")


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'s' if k != 1 else ''}"


def _fmt(x: dict, case: str) -> dict:
    return {"case": case, "tp": x["tp"], "ep": x["ep"], "dp": x["dp"], "moe": x["moe"], "gpus/model": x["group"],
            "seqs/model": x["batch_per_replica"], "weights_GB": gb(x["weights"]), "kv_GB": gb(x["kv_cache"]),
            "act_GB": gb(x["activations"]), "total_GB": gb(x["total"]), "free_GB": gb(x["headroom"]),
            "fits": "yes" if x["fits"] else "no", "vLLM": "no" if x["vllm_problem"] else "yes"}


# ---------------------------------------------------------------------------------------------- the planner

def plan(variant: str = "deepseek-vl2-small", dtype: str = "bfloat16", gpu_gb: float = 80, n_gpus: int = 4,
         batch: int = 1, images_per_prompt: int = 1, image_size=(768, 768), context: int | None = 4096,
         moe_modes=("tp", "ep"), vision: str = "replicated", margin: float = 0.10, *, text_tokens: int = 64,
         new_tokens: int = 512, gpus_per_node: int = 8, uneven_heads: bool = True) -> Plan:
    """Size ``variant`` on ``n_gpus`` GPUs of ``gpu_gb`` GB for ``batch`` sequences of ``images_per_prompt``
    images of ``image_size`` (w, h) plus ``text_tokens`` prompt tokens and ``new_tokens`` generated ones.

    Layouts: every tp the sharding plan can split (``uneven_heads=True``: heads and widths may split unevenly, 10
    heads on 4 ranks as 3,3,2,2; False: vLLM's rule, every split divides) with tp | n_gpus, dp = n_gpus/tp, moe in ``moe_modes`` (ep ∈ {tp,
    n_gpus}, ep | experts). Each row: per-GPU weights / KV / activations / total, ``fits``, ``group`` (GPUs per
    model copy: tp, or max(tp, ep) for EP), ``vllm_problem`` (why vLLM cannot run that tp, or None).

    Recommendation: the fitting layout with the fewest GPUs per model copy; ties go to TP-split experts (no
    all-to-all), then to the smallest per-GPU total (most room for more sequences); the remaining GPUs become
    data-parallel replicas, so all GPUs serve. At these sizes a decode step is bound by reading the weights, so
    independent replicas multiply throughput almost linearly, while every TP rank adds two all-reduces per layer
    per token: TP buys latency (and room), DP buys throughput. When nothing fits, ``request["hint"]`` says how
    many such GPUs one copy needs."""
    try:
        cfg = get_config(preset_name(variant))
    except ConfigError:
        raise PlanError(f"variant {variant!r}: unknown DeepSeek-VL2 variant; use one of {', '.join(VARIANTS)} (or a "
                        "deepseek-ai/... Hub id)", "variant") from None
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}", "dtype")
    try:
        vis = vision_mode(vision)
    except ValueError:
        raise PlanError(f"vision {vision!r}: use replicated, dp or tp", "vision") from None
    moe_modes = tuple(moe_modes)
    if not moe_modes or any(m not in ("tp", "ep") for m in moe_modes):
        raise PlanError(f"moe_modes {moe_modes!r}: use ('tp',), ('ep',) or ('tp', 'ep')", "moe_modes")
    moe_modes = tuple(m for m in ("tp", "ep") if m in moe_modes)
    for name, v, lo in (("n_gpus", n_gpus, 1), ("batch", batch, 1), ("images_per_prompt", images_per_prompt, 0),
                        ("text_tokens", text_tokens, 0), ("new_tokens", new_tokens, 0),
                        ("gpus_per_node", gpus_per_node, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise PlanError(f"{name} must be an integer >= {lo}, got {v!r}", name)
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)) or not (0 < gpu_gb < math.inf):
        raise PlanError(f"gpu_gb must be a finite number > 0 (GB = 10^9 bytes per GPU), got {gpu_gb!r}", "gpu_gb")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise PlanError(f"margin must be a fraction in [0, 1) (the share of each GPU kept free), got {margin!r}",
                        "margin")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
        raise PlanError(f"context must be a positive integer or None, got {context!r}", "context")
    w, h = parse_image_size(image_size)
    geo = dict(candidate_resolutions=cfg.candidate_resolutions, image_size=cfg.vision_config.image_size,
               patch_size=cfg.vision_config.patch_size, downsample_ratio=cfg.projector_config.downsample_ratio)
    lay = image_layout(w, h, n_images=max(images_per_prompt, 1), **geo)  # vl2-micro: 24-px patches, 145/tile
    n_img_tok = images_per_prompt * lay["tokens"]
    seq_len = n_img_tok + text_tokens + new_tokens
    trained = cfg.language_config.max_position_embeddings
    cap = context or trained
    warnings = []
    if cap > trained:
        warnings.append(f"context {cap} exceeds the trained {trained} tokens (the model card says 8192 'might "
                        "work'; quality is not guaranteed)")
    if seq_len > cap:
        raise PlanError(
            f"the request needs {seq_len} tokens ({images_per_prompt} x {lay['tokens']} image tokens for "
            f"{w}x{h} + {text_tokens} text + {new_tokens} new) but the context is {cap}; use fewer or smaller "
            f"images (with 3 or more images each costs {image_layout(w, h, 3, **geo)['tokens']}), fewer new tokens, or "
            f"a larger context (above {trained} is untested)")
    planned = context or seq_len
    tiles = images_per_prompt * lay["vit_passes"]
    work = dict(batch=batch, seq_len=planned, tiles=tiles, dtype=dtype, vision=vis)
    usable = L.usable_bytes(gpu_gb * 1e9, margin)

    def row(tp, ep, dp, moe):
        x = L.layout_bytes(cfg, tp=tp, ep=ep, dp=dp, moe=moe, **work)
        vllm = L.legal_tp_sizes(cfg, max(tp, 16), moe, "tp", rule="vllm")
        return {**x, "group": tp if moe == "tp" else max(tp, ep), "fits": x["total"] <= usable,
                "headroom": usable - x["total"], "vllm_problem": vllm.rejected.get(tp)}

    single = row(1, 1, 1, "tp")
    rows = []
    eps = L.legal_ep_sizes(cfg, max_ep=n_gpus)
    rule = "vl2lab" if uneven_heads else "vllm"
    tp_ok = L.legal_tp_sizes(cfg, n_gpus, "tp", vis, rule)
    for tp in L.legal_tp_sizes(cfg, n_gpus, "ep", vis, rule):
        if n_gpus % tp:
            continue
        cands = [("tp", 1)] if "tp" in moe_modes and tp in tp_ok else []
        if "ep" in moe_modes and cfg.language_config.is_moe:
            cands += [("ep", e) for e in sorted({tp, n_gpus}) if e > 1 and e in eps]
        rows += [row(tp, ep, n_gpus // tp, moe) for moe, ep in cands]
    rows.sort(key=lambda x: (not x["fits"], x["group"], x["moe"] != "tp", x["total"], x["tp"]))
    best = rows[0] if rows and rows[0]["fits"] else None
    request = {"image_size": [w, h], "tiles_per_image": list(lay["tiles"]), "vit_passes": lay["vit_passes"],
               "image_tokens": lay["tokens"], "seq_len": seq_len, "planned_len": planned,
               "hint": _hint(cfg, usable, work, gpu_gb) if best is None else ""}
    if best and best["vllm_problem"]:
        warnings.append(f"the pick tp={best['tp']} runs in vl2lab (uneven heads) but not in vLLM/SGLang: "
                        f"{best['vllm_problem']}")
    settings = dict(variant=cfg.name, dtype=dtype, gpu_gb=gpu_gb, n_gpus=n_gpus, batch=batch,
                    images_per_prompt=images_per_prompt, image_size=[w, h], context=context, moe_modes=moe_modes,
                    vision=vision, margin=margin, text_tokens=text_tokens, new_tokens=new_tokens,
                    gpus_per_node=gpus_per_node, uneven_heads=uneven_heads)
    return Plan(cfg, settings, request, usable, single, rows, best, warnings)


def _hint(cfg, usable, work, gpu_gb) -> str:
    """How many GPUs of this size one model copy needs (smallest legal tp, experts by width or EP)."""
    for tp in L.legal_tp_sizes(cfg, 256, "ep"):
        for moe in ("tp", "ep"):
            ep = tp if moe == "ep" else 1
            try:
                if L.layout_bytes(cfg, tp=tp, ep=ep, moe=moe, **work)["total"] <= usable:
                    return (f"one copy needs tp={tp} (moe={moe}) on {gpu_gb:g} GB GPUs: use {tp} or a multiple, "
                            "larger GPUs, a smaller batch or a shorter context")
            except ValueError:
                continue
    return "no tensor-parallel size up to 256 fits: use larger GPUs, a smaller batch or a shorter context"
