"""Parallelism: ``groups`` (rank, world size, device), ``ops`` (Megatron's f/g and the split arithmetic),
``layers`` (column/row/vocab-parallel layers), ``plan`` (the one sharding-plan table), ``shard`` (apply it in
place), ``load`` (each rank reads its slices), ``pipeline`` (the official layer split) and ``comm`` (counting
collectives and their bytes).

Lesson: notebook 02 (the layers), notebook 04 (the whole model sharded over N ranks).
"""
