"""The DeepSeek-VL2 model, knowing nothing of parallelism: ``config`` (presets, official config.json), ``attention``
(MHA, MLA), ``moe``, ``language``, ``vision`` (SigLIP + projector + token layout), ``vl2`` (the whole model),
``generation`` (KV cache, sampling), ``graph_decode`` (the decode step as a CUDA graph), ``build`` and ``dtypes``.

Lesson: notebook 01 (the model, end to end) and notebook 04 (the same model sharded over N ranks).
"""
from vl2lab.model.vl2 import DeepseekVL2ForCausalLM, VL2Output, build_model

__all__ = ["DeepseekVL2ForCausalLM", "VL2Output", "build_model"]
