"""The planner: the memory maths (``sizing``), which layouts fit which GPUs (``layouts``, ``plan``,
``python -m vl2lab plan``) and the launch commands for vl2lab, vLLM and SGLang (``commands``).

Lesson: notebook 01, section "5. Will it fit? The planner"; notebook 04, section "4. Memory per rank".
"""
