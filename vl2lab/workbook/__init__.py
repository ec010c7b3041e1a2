"""The workbook around the notebooks: ``settings`` (parameters cell → resolved settings), ``runner`` (papermill:
``python -m vl2lab.workbook run|refresh``), the figures (``plots``: ranks working together, notebooks 02–04;
``baseline_plots``: one device, notebook 01; ``tuning_plots``: notebook 05) and ``widgets``.

Lesson: notebook 00 (the parameters and resolve cells).
"""
