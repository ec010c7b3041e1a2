"""The workbook around the notebooks: ``settings`` (parameters cell → resolved settings), ``runner`` (papermill:
``python -m vl2lab.workbook run|refresh``), ``plots`` (the figures) and ``widgets``.

Lesson: notebook 00 (the parameters and resolve cells).
"""
