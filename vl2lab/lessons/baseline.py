"""The single-device baseline: load one DeepSeek-VL2, look at its token layout, and measure where time and memory go.

Lesson: notebook 01 (every section calls in here; the rank functions are :func:`profile` and :func:`prefill_memory`).

Memory is measured as the peak above what was in use when a block started::

    GPU:  max_memory_allocated − memory_allocated(before)     (the CUDA caching allocator's own count)
    CPU:  VmHWM − VmRSS(before): the resident set's high-water mark, reset through /proc/self/clear_refs after
          glibc's malloc_trim has returned the free heap pages (else memory freed by an earlier block and reused
          would not count). It also holds the thread pools' scratch: an upper bound on the tensors alive.

Predictions come from :mod:`vl2lab.planner.sizing` only. For a prefill of T prompt tokens in chunks of c, the transient
bytes are those of c tokens, except the attention scores where they materialise (eager attention, or SDPA's
"math" kernel): the c queries of a chunk score against up to T keys, so batch · heads · c · T · (2b + 4) bytes
instead of batch · heads · T² · (2b + 4).
"""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from pathlib import Path

import torch

from vl2lab.planner import sizing
from vl2lab.model.config import ConfigError, get_config, preset_name

MICRO_DIR = Path(__file__).resolve().parents[1] / "assets" / "vl2-micro"
PHOTOS = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")  # shipped with matplotlib


class BaselineError(ValueError):
    """A model name or folder notebook 01 cannot load (the message says what to pass instead)."""


# ------------------------------------------------------------------------------------------------ the model

def resolve_model(model: str, dtype: str = "float32", seed: int = 0, cache_dir: str | None = None) -> dict:
    """MODEL → a snapshot folder: {"path", "source", "name"}.

    An existing folder is used as it is ("folder"); ``"vl2-micro"`` is the shipped ``vl2lab/assets/vl2-micro``
    ("shipped"); a preset name gets random weights at that preset's real size, written once as a snapshot in
    ``cache_dir`` (default: the temp folder, where ``python -m vl2lab.perf.bench`` writes the same) ("random")."""
    if os.path.isdir(str(model)):
        if not os.path.isfile(os.path.join(str(model), "config.json")):
            raise BaselineError(f"{model} is a folder without config.json: not a DeepSeek-VL2 snapshot")
        return {"path": os.path.abspath(str(model)), "source": "folder", "name": os.path.basename(str(model))}
    if model == "vl2-micro":
        if not (MICRO_DIR / "config.json").is_file():
            raise BaselineError(f"the shipped vl2-micro snapshot is missing ({MICRO_DIR}); rebuild it with "
                                "`python -m vl2lab.train.micro --out vl2lab/assets/vl2-micro`, or set MODEL to a "
                                "snapshot folder or a preset such as 'random-tiny' (random weights)")
        return {"path": str(MICRO_DIR), "source": "shipped", "name": "vl2-micro"}
    try:
        name = preset_name(model)
    except ConfigError:
        raise BaselineError(f"MODEL={model!r} is neither a snapshot folder nor 'vl2-micro' nor a preset "
                            f"(random-tiny, deepseek-vl2-tiny, ...)") from None
    from vl2lab.weights.checkpoint import make_random_snapshot
    path = os.path.join(cache_dir or tempfile.gettempdir(), f"vl2lab-bench-{name}-{dtype}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_random_snapshot(path, preset=name, seed=seed, dtype=getattr(torch, dtype))
    return {"path": path, "source": "random", "name": name}


_LM = "language.model.layers."
_PARTS = (  # sizing.param_counts key → which parameters (by name) hold it
    ("vision_no_pool", lambda n: n.startswith("vision.")),
    ("projector", lambda n: n.startswith("projector.")),
    ("special_vectors", lambda n: n in ("image_newline", "view_seperator")),
    ("embedding", lambda n: n.startswith("language.model.embed_tokens")),
    ("attention", lambda n: n.startswith(_LM) and ".self_attn." in n),
    ("dense_mlp", lambda n: n.startswith(_LM) and n.split(".mlp.")[-1].split(".")[0] in ("gate_proj", "up_proj",
                                                                                           "down_proj")),
    ("shared_experts", lambda n: n.startswith(_LM) and ".mlp.shared_experts." in n),
    ("routed_experts", lambda n: n.startswith(_LM) and ".mlp.experts." in n),
    ("router", lambda n: n.startswith(_LM) and ".mlp.gate." in n),
    ("norms", lambda n: n.startswith(_LM) and n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))
     or n == "language.model.norm.weight"),
    ("lm_head", lambda n: n.startswith("language.lm_head")),
)


def param_rows(model) -> list[dict]:
    """Per component: the count from :func:`sizing.param_counts` beside ``numel`` summed over the model."""
    c = sizing.param_counts(model.config)
    named = list(model.named_parameters())
    rows = [{"part": k, "sizing": c[k], "counted": sum(p.numel() for n, p in named if f(n))} for k, f in _PARTS]
    rows.append({"part": "total", "sizing": c["total_instantiated"], "counted": sum(p.numel() for _, p in named)})
    return rows


# --------------------------------------------------------------------------------------- pictures and tokens

def sample_images(scene_seeds=(3,)) -> dict:
    """Real photos shipped with matplotlib (they exist offline) and rendered shape scenes: {name: RGB image}."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from vl2lab.train.scenes import make_scene

    out = {}
    for name in PHOTOS:
        with cbook.get_sample_data(name) as f:
            out[name] = Image.open(f).convert("RGB")
    for s in scene_seeds:
        out[f"scene {s}"] = make_scene(s).render()
    return out


def token_layout(width: int, height: int, n_images: int = 1, patch_size: int = 14, downsample_ratio: int = 2) -> dict:
    """Everything the tiling decides for a width×height image, and where its image tokens go, counted by running
    the model's own layout (``layout_image_features``) on marker vectors: cells 0, newline 1, separator 2.
    ``patch_size``/``downsample_ratio``: the model's geometry (DeepSeek-VL2: 14 and 2, 14×14 tokens per tile)."""
    from vl2lab.model.vision import layout_image_features
    from vl2lab.inputs.tiling import image_layout

    lay = image_layout(width, height, n_images, patch_size=patch_size, downsample_ratio=downsample_ratio)
    tw, th = lay["tiles"]
    h = lay["grid"]
    seq = layout_image_features(torch.zeros(1 + tw * th, h, h, 1), tw, th, torch.ones(1), torch.full((1,), 2.0))
    kind = seq[:, 0]                                                   # [N_img]: 0 cell, 1 newline, 2 separator
    sep = int((kind == 2).nonzero()[0])
    return {**lay, "global_cells": int((kind[:sep] == 0).sum()), "global_newlines": int((kind[:sep] == 1).sum()),
            "separator_at": sep, "local_cells": int((kind[sep + 1:] == 0).sum()),
            "local_newlines": int((kind[sep + 1:] == 1).sum()), "counted": int(kind.numel()), "kinds": kind.tolist()}


# ------------------------------------------------------------------------------------------------ memory

def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so that reusing them later counts again."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` → ``m.delta`` (bytes above the start), ``m.peak`` (the peak itself:
    allocated bytes on a GPU, the resident set on the CPU); both None where the CPU peak cannot be reset."""

    def __init__(self, device):
        self.device, self.delta, self.peak = torch.device(device), None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _malloc_trim()                                             # freed heap pages leave the resident set
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                                       # VmHWM := VmRSS
                self.before = _proc_status("VmRSS")
            except (OSError, KeyError):
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.before is not None:
            self.peak = _proc_status("VmHWM")
        if self.peak is not None:
            self.delta = self.peak - self.before
        return False


# ------------------------------------------------------------------------------------------------ profile

def _tiles(batch) -> torch.Tensor:
    """The real tiles of a processor batch, in order: [N, 3, 384, 384]."""
    per = [int(sum(1 + w * h for w, h in rows.tolist())) for rows in batch["images_spatial_crop"]]
    return torch.cat([batch["images"][b, :n] for b, n in enumerate(per)], dim=0)


def profile(snapshot: str, dtype: str = "float32", batch_sizes=(1,), new_tokens: int = 64, repeats: int = 3,
            warmup: int = 1, seed: int = 0) -> dict:
    """Rank function: the fixed workload of :mod:`vl2lab.perf.bench` (one 768×768 image, a 32-token prompt,
    ``new_tokens`` new tokens, EOS ignored) at each batch size, stage by stage, on this rank's device.

    Stages: preprocess (processor, CPU), vision (tower over all tiles), projector, prefill (the language model over
    the prompt embeddings), decode per token = (generate(n) − generate(1)) / (n − 1); e2e = preprocess +
    generate(n). Memory (:class:`PeakMemory`): each device stage's peak above what was in use before it, beside
    :func:`sizing.layout_bytes` for the same batch and length; ``peak_total_bytes`` is generate(n)'s peak itself
    (GPU: allocated bytes, weights included; CPU: the whole process's resident set)."""
    from vl2lab.perf import bench
    from vl2lab.parallel import groups as dist
    from vl2lab.weights.checkpoint import load_pretrained

    dev, dt = dist.device(), getattr(torch, dtype)
    model, processor = load_pretrained(snapshot, dtype=dt, device=dev)
    lm, cfg = model.language, model.config
    conv = bench.workload_conversation(processor, bench.workload_image(seed))
    out = {"device": str(dev), "dtype": dtype, "new_tokens": new_tokens, "environment": bench.environment(),
           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "runs": []}
    timed = lambda fn, d=dev: bench.timed(fn, torch.device(d), repeats, warmup)  # noqa: E731
    for b in batch_sizes:
        convs = [conv] * b
        batch = processor(conversations=convs).to(dev, dt)
        tiles, T = _tiles(batch), int(batch["input_ids"].shape[1])
        gen = lambda n: model.generate(**batch, max_new_tokens=n, do_sample=False, ignore_eos=True)  # noqa: E731
        with torch.inference_mode():
            feats = model.encode_tiles(tiles)
            embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                                 batch["images_spatial_crop"])
            stages = {"preprocess": lambda: processor(conversations=convs), "vision": lambda: model.encode_tiles(tiles),
                      "projector": lambda: model.projector(feats),
                      "prefill": lambda: lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            cache=lm.new_cache(T), num_logits_to_keep=1),
                      "generate_1": lambda: gen(1), "generate_n": lambda: gen(new_tokens)}
            t, mem = {"preprocess": timed(stages.pop("preprocess"), "cpu")}, {}
            for name, fn in stages.items():
                t[name] = timed(fn)
                with PeakMemory(dev) as m:
                    fn()
                mem[name] = m.delta
        pred = sizing.layout_bytes(cfg, dtype=dtype, batch=b, seq_len=T + new_tokens, tiles=int(tiles.shape[0]) // b)
        gen_n = t["generate_n"]["median"]
        out["runs"].append({
            "batch": b, "prompt_len": T, "tiles": int(tiles.shape[0]),
            "image_tokens": int(batch["images_seq_mask"][0].sum()),
            "times": t, "decode_s_per_token": (gen_n - t["generate_1"]["median"]) / max(new_tokens - 1, 1),
            "e2e_s": t["preprocess"]["median"] + gen_n, "tokens_per_s": b * new_tokens / gen_n,
            "images_per_s": b / (t["preprocess"]["median"] + gen_n), "peak_delta_bytes": mem,
            "peak_total_bytes": m.peak,
            "predicted": {k: pred[k] for k in ("weights", "kv_cache", "activations", "total")}})
    return out


# ------------------------------------------------------------------------------------ prefill in chunks

def prefill_activation_bytes(cfg, seq_len: int, chunk: int | None = None, dtype: str = "bfloat16",
                             attn: str = "sdpa", logits: str = "last", batch: int = 1) -> int:
    """Transient bytes of a language-model prefill of ``seq_len`` tokens, in one shot (``chunk=None``) or in
    chunks: :func:`sizing.activation_bytes` of one chunk, its score term widened to the chunk's c queries × T keys.
    ``logits="all"`` is the official HF forward (fp32 logits for every position of the chunk)."""
    c = min(chunk or seq_len, seq_len)
    a = sizing.activation_bytes(cfg, batch=batch, seq_len=c, tiles=0, dtype=dtype, attn=attn, logits=logits)
    scores = a["lm_scores"] * seq_len // c
    return a["lm_residual"] + max(a["lm_attention"] + scores, a["lm_mlp"], a["logits"])


MODES = {"vl2lab (SDPA, last logits)": ("sdpa", "last"), "official-like (eager scores, all logits)": ("eager", "all")}


def attention_kernel(attn: str):
    """SDPA as it chooses ("sdpa"), or its math kernel, which materialises the scores like eager attention
    ("eager", or "math")."""
    if attn == "sdpa":
        return contextlib.nullcontext()
    if attn not in ("eager", "math"):
        raise ValueError(f"attention must be 'sdpa', 'eager' or 'math', got {attn!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def measure_prefill(lm, cfg, embeds, mask, chunk_size: int, dtype: str) -> dict:
    """Peak memory of one-shot and chunked prefills in each of :data:`MODES` (the static KV cache of the T
    positions included) beside the prediction (activations + that cache), and whether the chunked result equals
    the one-shot one: ``equal`` = last-position logits within 1e-3 of their scale (5e-2 in 16-bit dtypes, whose
    rounding differs with the matmul shapes), ``same_next_token`` = the same argmax."""
    from vl2lab.model.generation import chunked_prefill

    dev, (B, T) = embeds.device, mask.shape
    kv = sizing.kv_cache_bytes(cfg, B * T, dtype)
    rows = []
    for mode, (attn, logits) in MODES.items():
        keep = 0 if logits == "all" else 1
        res = {}
        for how, chunk in (("one-shot", None), ("chunked", chunk_size)):
            with torch.inference_mode(), attention_kernel(attn), PeakMemory(dev) as m:
                out, cache = chunked_prefill(lm, embeds, mask, chunk or T, num_logits_to_keep=keep)
                last = out[:, -1].float().cpu()
            del out, cache
            res[how] = last
            act = prefill_activation_bytes(cfg, T, chunk, dtype, attn, logits, batch=B)
            rows.append({"mode": mode, "prefill": how, "chunk": chunk or T, "tokens": T, "measured_bytes": m.delta,
                         "predicted_bytes": act + kv, "predicted_activations": act, "kv_bytes": kv})
        diff = (res["one-shot"] - res["chunked"]).abs().max().item()
        tol = (1e-3 if sizing.dtype_bytes(dtype) >= 4 else 5e-2) * (res["one-shot"].abs().max().item() or 1.0)
        for r in rows[-2:]:
            r.update(equal=diff <= tol, max_abs_diff=diff,
                     same_next_token=bool(torch.equal(res["one-shot"].argmax(-1), res["chunked"].argmax(-1))))
    return {"rows": rows}


def long_prompt(processor, n_images: int = 2, size: int = 1152, seed: int = 0):
    """The longest kind of request the 4096-token context holds: ``n_images`` scenes scaled to size×size
    (1152² = 3×3 tiles, 2017 tokens each) and one question."""
    from vl2lab.train.scenes import make_scene
    ims = [make_scene(seed + i).render().resize((size, size)) for i in range(n_images)]
    return processor(conversation=[{"role": "<|User|>", "content": "<image>\n" * n_images + "Compare the pictures.",
                                    "images": ims}, {"role": "<|Assistant|>", "content": ""}])


@contextlib.contextmanager
def constructed_on(device, dtype: str, seed: int = 0):
    """Modules constructed inside are allocated on ``device`` in ``dtype`` and initialised from ``seed`` (no fp32
    copy on the CPU first); the default dtype and the global random state are restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(old)


def build_on_device(preset: str, dtype: str = "bfloat16", device="cpu", seed: int = 0):
    """A random DeepSeek-VL2 built directly on ``device`` in ``dtype`` (no fp32 copy, no snapshot): what the
    real-size memory measurement needs. Weights are the modules' own random initialisation."""
    from vl2lab.model.vl2 import DeepseekVL2ForCausalLM

    with constructed_on(device, dtype, seed):
        model = DeepseekVL2ForCausalLM(get_config(preset))
    return model.eval()


def prefill_memory(snapshot: str, dtype: str = "float32", chunk_size: int = 512, n_images: int = 2,
                   image_size: int = 1152, real_presets=(), seed: int = 0) -> dict:
    """Rank function: one-shot vs chunked prefill memory (:func:`measure_prefill`) for the snapshot's model on a
    long two-image prompt; on a GPU also for each of ``real_presets`` at its real size (random weights built on
    the device, random prompt embeddings of the same length), with its measured weight bytes."""
    from vl2lab.parallel import groups as dist
    from vl2lab.weights.checkpoint import load_pretrained

    dev, dt = dist.device(), getattr(torch, dtype)
    model, processor = load_pretrained(snapshot, dtype=dt, device=dev)
    batch = long_prompt(processor, n_images, image_size, seed).to(dev, dt)
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                             batch["images_spatial_crop"])
    out = {"device": str(dev), "model": measure_prefill(model.language, model.config, embeds, batch["attention_mask"],
                                                       chunk_size, dtype), "tokens": int(embeds.shape[1]), "real": {}}
    del model, embeds
    if dev.type != "cuda":
        return out
    T = out["tokens"]
    for name in real_presets:
        torch.cuda.empty_cache()
        try:
            before = torch.cuda.memory_allocated(dev)
            big = build_on_device(name, dtype, dev, seed)
            weights = torch.cuda.memory_allocated(dev) - before
            cfg = big.config
            e = torch.randn(1, T, cfg.language_config.hidden_size, device=dev, dtype=dt) * 0.02
            res = measure_prefill(big.language, cfg, e, torch.ones(1, T, dtype=torch.long, device=dev), chunk_size,
                                  dtype)
            out["real"][name] = {"weights_bytes": weights, **res,
                                 "weights_predicted": sizing.weight_bytes(cfg, dtype, instantiated=True)}
        except torch.cuda.OutOfMemoryError as err:
            out["real"][name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        big = e = None
    return out
