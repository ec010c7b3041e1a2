"""Training: the synthetic shapes task (``scenes``) and its scoring (``score``), the pieces shared by the training
runs (``loop``) and those of one DDP step (``batches``), the vision-tower stage (``tower``), DDP training with
checkpoints (``ddp``), sharded evaluation (``eval``) and the vl2-micro recipe (``micro``,
``python -m vl2lab.train.micro``).

Each module imports only the ones listed before it here: loop, scenes, score, batches, tower, ddp, eval, micro.

Lesson: notebook 03 (data parallelism).
"""
