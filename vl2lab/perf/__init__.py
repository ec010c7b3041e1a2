"""Performance: the fixed workload and its measurement (``workload``), the benchmark (``bench``), the tuning ladder
(``rungs``, ``ladder``, ``report``), the floor (``roofline``), the decode-step profiler, collectives timings and
transformers' own model as a peer (``peer``).

Lesson: notebook 05 (tuning); notebook 01, section "4. Where time and memory go".
"""
