"""The planner: the memory maths (``sizing``), which layouts fit which GPUs (``layouts``, ``plan``; its command line
``cli`` is ``python -m vl2lab plan``), the launch commands for vl2lab, vLLM and SGLang (``commands``), the notebook
panel (``panel``) and the source article's claims checked (``claims``).

Lesson: notebook 01, section "5. Will it fit? The planner"; notebook 04, section "4. Memory per rank".
"""
