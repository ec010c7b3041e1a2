"""The commands that run a planned layout: vl2lab's launch lines (one node, on loopback; or several), and the equivalent vLLM
and SGLang serve commands for production serving. Each takes a :class:`vl2lab.planner.plan.Plan` and one of its layouts.

Lesson: notebook 01, section "Will it fit? The planner", and notebook 04, section "Beyond one machine".
"""
from __future__ import annotations

import math
import shlex

from vl2lab.model.config import REAL_PRESETS
from vl2lab.parallel.plan import vision_mode

__all__ = ["ONE_NODE", "vl2lab_lines", "vllm_lines", "sglang_lines", "multinode_lines", "default_model", "engine_note"]

# One node: torchrun whose every socket listens on 127.0.0.1 only (vl2lab.launch.agent; plain torchrun's stores,
# read with pickle, listen on every interface).
ONE_NODE = "python -m vl2lab.launch.agent --standalone"
_VLLM_ARCH = '\'{"architectures": ["DeepseekVLV2ForCausalLM"]}\''


def _replicas(p: Plan, lay: dict) -> list[list[tuple[int, list[int]]]]:
    """Per model copy: [(node, local GPU ids)] for copies of ``group`` consecutive GPUs."""
    g, gpn = (lay["tp"] if lay["moe"] == "tp" or lay["ep"] == lay["tp"] else p.settings["n_gpus"]), \
        p.settings["gpus_per_node"]
    out = []
    for r in range(p.settings["n_gpus"] // g):
        nodes = {}
        for gpu in range(r * g, (r + 1) * g):
            nodes.setdefault(gpu // gpn, []).append(gpu % gpn)
        out.append(sorted(nodes.items()))
    return out


def _gen_args(p, lay, model, image, prompt) -> str:
    s = p.settings
    imgs = f" --image {shlex.quote(image)}" if s["images_per_prompt"] else ""  # generate takes one picture
    vis = {"data_parallel": "dp"}.get(vision_mode(s["vision"]), vision_mode(s["vision"]))
    return (f"-m vl2lab.serve.generate --model {shlex.quote(model)} --moe {lay['moe']} --vision {vis} --dtype {s['dtype']} "
            f"--max-new-tokens {s['new_tokens']}{imgs} --prompt {shlex.quote(prompt)}")


def default_model(name: str) -> tuple[str, list[str]]:
    """(--model of the vl2lab command, comment lines) for variant ``name`` when no folder is given: vl2-micro and
    the random-* presets are names vl2lab.serve.generate loads as such; a real variant is the folder its Hub
    snapshot was downloaded to (a placeholder: as a preset name it would mean random weights of full size)."""
    if name == "vl2-micro":
        return name, ["# --model vl2-micro: the trained snapshot shipped with vl2lab (vl2lab/assets/vl2-micro)"]
    if name not in REAL_PRESETS:
        return name, [f"# --model {name}: random weights (seed 0), so the answer is meaningless text; the layout "
                      "and the memory are real"]
    return f"/path/to/{name}", [f"# /path/to/{name}: the folder you downloaded deepseek-ai/{name} to from the "
                                "Hugging Face Hub (config.json, *.safetensors, tokenizer files)"]


def engine_note(name: str) -> list[str]:
    """Comment lines above the vLLM and SGLang commands of a variant that is not on the Hugging Face Hub."""
    if name in REAL_PRESETS:
        return []
    where = "vl2lab/assets/vl2-micro, shipped with vl2lab" if name == "vl2-micro" else "saved by vl2lab.save_pretrained"
    return [f"# {name} is vl2lab's own model, not on the Hugging Face Hub, and untested in vLLM/SGLang; "
            f"/path/to/{name} = its snapshot folder ({where})"]


def _hub(p) -> str:
    """The Hugging Face id of a real variant; a snapshot folder placeholder for vl2lab's own models."""
    return f"deepseek-ai/{p.cfg.name}" if p.cfg.name in REAL_PRESETS else f"/path/to/{p.cfg.name}"


def _per_node(p, by_node: dict, suffix_many: str = " &", closing: str | None = "wait") -> list[str]:
    """{node: [commands]} → lines; several commands on a node run in the background, then ``closing``.
    When every node runs the same commands (GPU ids restart at 0 on each node), they are written once."""
    blocks = {n: [c + (suffix_many if len(cs) > 1 else "") for c in cs] + ([closing] if len(cs) > 1 and closing
                                                                         else []) for n, cs in by_node.items()}
    if p.settings["n_gpus"] <= p.settings["gpus_per_node"]:
        return [line for b in blocks.values() for line in b]
    vals = list(blocks.values())
    if len(vals) > 1 and all(b == vals[0] for b in vals):
        return [f"# on each of the {len(vals)} nodes:"] + vals[0]
    return [line for n, b in blocks.items() for line in [f"# on node {n}:"] + b]


def vl2lab_lines(p, lay, model, image, prompt) -> list[str]:
    args = _gen_args(p, lay, model, image, prompt)
    if lay["moe"] == "ep" and lay["ep"] != lay["tp"]:
        return [f"# vl2lab.serve.generate runs one model copy per job (attention split by heads, experts over the same "
                f"ranks); ep={lay['ep']} shared by {lay['dp']} attention replicas is a vLLM/SGLang layout",
                f"# nearest vl2lab layout, tp=ep={lay['ep']}:",
                f"{ONE_NODE} --nproc-per-node {lay['ep']} {args}"]
    lines = ["# vl2lab.serve.generate has no tensor-parallel ViT: it runs the tower replicated (or --vision dp)"] \
        if lay["vision"] == "tp" else []
    if p.settings["images_per_prompt"] > 1:
        lines.append(f"# vl2lab.serve.generate takes one --image; {p.settings['images_per_prompt']} images per prompt go "
                     "through the Python API (processor(conversation=...) with several images)")
    reps, by_node = _replicas(p, lay), {}
    for nodes in reps:
        if len(nodes) > 1:
            lines.append("# this model copy spans several nodes: see [multinode]")
            continue
        node, ids = nodes[0]
        env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, ids))} " if len(reps) > 1 else ""
        by_node.setdefault(node, []).append(f"{env}{ONE_NODE} --nproc-per-node {len(ids)} {args}")
    if len(reps) > 1:
        lines.append(f"# {len(reps)} independent copies (data parallel): give each its own images and prompts")
    return lines + _per_node(p, by_node)


def _engine_fallback(p, lay, engine: str, write) -> list[str]:
    """vLLM and SGLang split heads and widths evenly: name why ``lay`` fails there and write the engine's lines
    for the best layout that is legal for it and fits (the rows are already in recommendation order)."""
    ok = [x for x in p.layouts if x["fits"] and not x["vllm_problem"]]
    name = lambda x: f"tp={x['tp']} ep={x['ep']} dp={x['dp']} moe={x['moe']}"
    lines = [f"# WARNING: {engine} cannot shard {p.cfg.name} with tensor-parallel size {lay['tp']} "
             f"({lay['vllm_problem']}); vl2lab can (uneven heads). {engine}-legal layouts that fit: "
             + (", ".join(map(name, ok)) or "none")]
    return lines + ([f"# nearest {engine} layout, {name(ok[0])}:"] + write(p, ok[0]) if ok else [])


def vllm_lines(p, lay) -> list[str]:
    s, tp, dp = p.settings, lay["tp"], lay["dp"]
    base = (f"vllm serve {_hub(p)} --tensor-parallel-size {tp} --dtype {s['dtype']} "
            f"--max-model-len {p.request['planned_len']} --max-num-seqs {lay['batch_per_replica']} "
            f"--limit-mm-per-prompt '{{\"image\": {s['images_per_prompt']}}}' --hf-overrides {_VLLM_ARCH}")
    if lay["vllm_problem"]:
        return _engine_fallback(p, lay, "vLLM", vllm_lines)
    lines = []
    if vision_mode(s["vision"]) == "data_parallel":
        lines.append("# vLLM keeps the ViT replicated (MLP split by TP); the vision setting is vl2lab's")
    gpn = s["gpus_per_node"]
    if lay["moe"] == "ep" and lay["ep"] != tp:  # DP attention + experts over all GPUs: one vLLM deployment
        cmd = f"{base} --data-parallel-size {dp} --enable-expert-parallel"
        if s["n_gpus"] <= gpn:
            return lines + [cmd]
        local = gpn // tp
        lines += ["# on node 0 (address $HEAD_NODE):", f"{cmd} --data-parallel-size-local {local} "
                  "--data-parallel-address $HEAD_NODE --data-parallel-rpc-port 13345"]
        for node in range(1, math.ceil(s["n_gpus"] / gpn)):
            lines += [f"# on node {node}:", f"{cmd} --headless --data-parallel-size-local {local} "
                      f"--data-parallel-start-rank {node * local} --data-parallel-address $HEAD_NODE "
                      "--data-parallel-rpc-port 13345"]
        return lines
    ep = " --enable-expert-parallel" if lay["moe"] == "ep" else ""
    reps = _replicas(p, lay)
    if any(len(n) > 1 for n in reps):
        return lines + ["# a tensor-parallel group wider than one node needs a Ray cluster in vLLM (or "
                        "--pipeline-parallel-size across nodes): see vLLM's distributed serving guide"]
    if len(reps) == 1:
        return lines + [base + ep]
    lines.append(f"# {len(reps)} independent servers behind a load balancer (vLLM's --data-parallel-size would "
                 "instead shard the experts over all GPUs: DP attention, a different, lower-memory layout)")
    by_node = {}
    for ((node, ids),) in reps:
        port = 8000 + len(by_node.get(node, []))
        by_node.setdefault(node, []).append(f"CUDA_VISIBLE_DEVICES={','.join(map(str, ids))} {base}{ep} "
                                            f"--port {port}")
    return lines + _per_node(p, by_node, closing=None)


def sglang_lines(p, lay) -> list[str]:
    s, tp, dp = p.settings, lay["tp"], lay["dp"]
    cmd = (f"python -m sglang.launch_server --model-path {_hub(p)} --dtype {s['dtype']} "
           f"--context-length {p.request['planned_len']}")
    if lay["moe"] == "ep" and lay["ep"] != tp:
        cmd += f" --tp {s['n_gpus']} --dp {dp} --enable-dp-attention --ep-size {lay['ep']}"
    else:
        cmd += f" --tp {tp}" + (f" --dp {dp}" if dp > 1 else "") + (f" --ep-size {tp}" if lay["moe"] == "ep" else "")
    if lay["vllm_problem"]:
        return _engine_fallback(p, lay, "SGLang", sglang_lines)
    lines = []
    if p.cfg.name == "deepseek-vl2-tiny":
        lines.append("# tiny (MHA) runs on SGLang's separate DeepseekForCausalLM path; its TP is untested")
    if vision_mode(s["vision"]) == "data_parallel":
        lines.append("# --mm-enable-dp-encoder (ViT data parallel) is not listed for DeepSeek-VL2 in SGLang")
    gpn, nn = s["gpus_per_node"], math.ceil(s["n_gpus"] / s["gpus_per_node"])
    if nn == 1:
        return lines + [cmd]
    if all(len(n) == 1 for n in _replicas(p, lay)) and not (lay["moe"] == "ep" and lay["ep"] != tp):
        per = (gpn // tp) if gpn % tp == 0 else 1
        return lines + [f"# on each of the {nn} nodes (independent servers behind sglang_router or a load balancer):",
                        cmd.replace(f" --dp {dp}", f" --dp {per}" if per > 1 else "")]
    return lines + [x for i in range(nn) for x in
                    (f"# on node {i}:", f"{cmd} --nnodes {nn} --node-rank {i} --dist-init-addr $HEAD_NODE:50000")]


def multinode_lines(p, lay, model, image, prompt) -> list[str]:
    """torchrun with a c10d rendezvous for every model copy that spans nodes (one line per node)."""
    args, lines = _gen_args(p, lay, model, image, prompt), []
    for r, nodes in enumerate(_replicas(p, lay)):
        if len(nodes) == 1 or (lay["moe"] == "ep" and lay["ep"] != lay["tp"]):
            continue
        for node, ids in nodes:
            lines += [f"# on node {node} (copy {r}; $HEAD_NODE = the first node of the copy):",
                      f"torchrun --nnodes {len(nodes)} --nproc-per-node {len(ids)} --rdzv-backend c10d "
                      f"--rdzv-endpoint $HEAD_NODE:{29500 + r} --rdzv-id vl2lab-{r} {args}"]
    return lines or [f"# every model copy fits in one node: run the [vl2lab] lines on each of the "
                     f"{math.ceil(p.settings['n_gpus'] / p.settings['gpus_per_node'])} nodes; no cross-node "
                     "rendezvous is needed"]
