"""The DeepSeek-VL2 model: vision tower + projector (:mod:`.vision`), language model (:mod:`.language`), the whole
model (:mod:`.vl2`) and greedy/sampled decoding (:mod:`.generation`).

Lesson: notebook 01 (the model, end to end) and notebook 04 (the same model sharded over N ranks).
"""
from vl2lab.model.vl2 import DeepseekVL2ForCausalLM, VL2Output, build_model

__all__ = ["DeepseekVL2ForCausalLM", "VL2Output", "build_model"]
