"""Performance: the fixed workload and its measurement (``workload``), time and memory on one device stage by stage
(``memory``), the benchmark (``bench``), the tuning ladder (``rungs``, ``ladder``, ``report``), the floor
(``roofline``), the routed experts a decode step reads (``routing``), the best tensor-parallel speed-up the floor
and the all-reduce latency allow (``tp_bound``), the decode-step profiler (``step_profile``), collectives timings
(``collectives``) and transformers' own model as a peer (``peer``).

Layers, bottom up (no module imports one above it): ``workload`` → ``roofline``, ``step_profile``, ``peer``,
``collectives``, ``rungs``, ``memory``, ``routing`` → ``tp_bound``, ``bench``, ``ladder``; ``report`` reads recorded
JSON only. The perf layer builds on model, inputs, weights, parallel, planner and launch (and the workbook's figure
functions, for the benchmark's plot and the results explorer), never on lessons, train or serve.

Lesson: notebook 05, section "2. The ladder, run here"; notebook 01, section "4. Where time and memory go".
"""
