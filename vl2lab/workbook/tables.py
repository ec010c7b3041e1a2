"""Tables a notebook shows: an HTML table in JupyterLab, the same aligned text in a terminal.

A wide table printed as text wraps mid-column in a narrow window; JupyterLab renders ``_repr_html_`` as a real
table instead. ``Table(rows)`` is both: make it the last expression of a cell (or ``display(Table(rows))``) and
JupyterLab shows HTML, while ``print(Table(rows))`` and a plain console show the aligned text of
:func:`vl2lab.planner.sizing.format_table`. The HTML is deterministic (no ids, no styles computed at run time),
so nbval can compare it.

Lesson: notebook 05, section "The ladder, run here" (the ladder's tables).
"""
from __future__ import annotations

import html
import math

from vl2lab.planner.sizing import format_table


MISSING = "—"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value, floatfmt: str) -> str:
    return floatfmt.format(value) if isinstance(value, float) else str("" if value is None else value)


class Table:
    """Rows (dicts) shown as an HTML table in a notebook and as aligned text elsewhere.

    ``columns`` picks and orders the keys (default: the first row's); ``floatfmt`` formats floats;
    ``caption`` is shown above the table (say what was measured, and on what). A value that is missing (None or
    nan: e.g. a spread an older result file did not record) shows as a dash.
    """

    def __init__(self, rows: list[dict], columns=None, floatfmt: str = "{:.3f}", caption: str = ""):
        # a value that was not measured (nan, None) shows as a dash, never as "nan"
        self.rows = [{k: MISSING if _missing(v) else v for k, v in r.items()} for r in rows]
        self.columns = list(columns or (self.rows[0] if self.rows else []))
        self.floatfmt = floatfmt
        self.caption = caption

    def __str__(self) -> str:
        text = format_table(self.rows, self.columns, self.floatfmt)
        return f"{self.caption}\n{text}" if self.caption else text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = []
        for r in self.rows:
            tds = "".join(
                f'<td style="text-align:{"right" if num(r.get(c)) else "left"}">'
                f"{html.escape(_cell(r.get(c), self.floatfmt))}</td>" for c in self.columns)
            body.append(f"<tr>{tds}</tr>")
        cap = f"<caption style=\"text-align:left\">{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
