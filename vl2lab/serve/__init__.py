"""Serving: ``deploy`` loads this rank's shard and answers a request; ``generate`` is its command line
(``torchrun --nproc-per-node N -m vl2lab.serve.generate ...``).

Lesson: notebook 04, section "2. Run it on 4 ranks".
"""
