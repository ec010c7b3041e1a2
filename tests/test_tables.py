"""workbook.tables.Table: the same rows as HTML (JupyterLab) and as aligned text (terminals, nbval's text/plain)."""
from vl2lab.workbook.tables import MISSING, Table


def test_table_renders_rows_as_html_and_text_and_dashes_what_is_missing():
    t = Table([{"rung": "1 <fp32>", "ms": 2.0, "p90": float("nan")}, {"rung": "5", "ms": 0.25, "p90": None}],
              floatfmt="{:.2f}", caption="measured on: here")
    text = str(t).splitlines()
    assert text[0] == "measured on: here" and text[1].split() == ["rung", "ms", "p90"]
    assert text[3].split() == ["1", "<fp32>", "2.00", MISSING] and text[4].split() == ["5", "0.25", MISSING]
    html = t._repr_html_()
    assert html.count("<tr>") == 3 and "&lt;fp32&gt;" in html and "nan" not in html
    assert '<td style="text-align:right">0.25</td>' in html and "<caption" in html
    assert Table([])._repr_html_().startswith("<table>") and str(Table([])) == ""
