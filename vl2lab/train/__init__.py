"""Training: the synthetic shapes task (``scenes``), DDP training (``ddp``), sharded evaluation (``eval``), the
vision-tower stage (``tower``) and the vl2-micro recipe (``micro``, ``python -m vl2lab.train.micro``).

Lesson: notebook 03 (data parallelism).
"""
