"""Every notebook has the workbook's shape, and its stored outputs are a clean, in-order, CPU-default run."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXEMPT_SECTIONS = ("summary", "exercises", "goals", "prerequisites", "what you will learn")
PACKAGE = ROOT / "vl2lab"
MODULES = sorted(p for p in PACKAGE.rglob("*.py")
                 if p.name not in ("__init__.py", "__main__.py") and "assets" not in p.parts)


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/NN_*.ipynb missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"], "widget state stored: run `make refresh`"
    assert cells[0]["cell_type"] == "markdown" and _src(cells[0]).startswith("# "), "first cell: title and goals"
    params = [i for i, c in enumerate(cells) if "parameters" in _tags(c)]
    assert len(params) == 1, "exactly one cell tagged `parameters`"
    p = params[0]
    tree = ast.parse(_src(cells[p]))
    for stmt in tree.body:  # literals only: papermill never recomputes derived values
        assert isinstance(stmt, ast.Assign), f"parameters cell: only assignments, found {ast.dump(stmt)[:60]}"
        ast.literal_eval(stmt.value)
        assert all(isinstance(t, ast.Name) and t.id.isupper() for t in stmt.targets)
    nxt = next(c for c in cells[p + 1:] if c["cell_type"] == "code")
    assert "settings.resolve(" in _src(nxt) and "nbval-check-output" in _tags(nxt), "resolve cell follows"
    heads = [_src(c).splitlines()[0].lower() for c in cells if c["cell_type"] == "markdown"
             and _src(c).startswith("## ")]
    buried = [c for c in cells if c["cell_type"] == "markdown" and "\n## " in _src(c)]
    assert not buried, "a section heading (##) must open its own markdown cell"
    assert any("summary" in h for h in heads) and any("exercises" in h for h in heads)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_a_clean_in_order_run(path):
    cells = _cells(path)
    counts = [c["execution_count"] for c in cells if c["cell_type"] == "code" and _src(c).strip()]
    assert all(isinstance(n, int) for n in counts), "every code cell executed (run `make refresh`)"
    assert counts == sorted(counts) and counts[0] == 1, "cells executed top to bottom in one kernel"
    for c in cells:
        if c["cell_type"] != "code":
            continue
        errors = [o for o in c.get("outputs", []) if o["output_type"] == "error"]
        if "raises-exception" in _tags(c):
            assert errors, "a raises-exception cell must store its error"
        else:
            assert not errors, f"stored error in cell: {_src(c)[:80]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_section_ends_in_checked_evidence(path):
    section, checked = None, {}
    for c in _cells(path):
        if c["cell_type"] == "markdown" and _src(c).startswith("## "):
            section = _src(c).splitlines()[0][3:].strip()
            checked.setdefault(section, False)
        elif c["cell_type"] == "code" and section and "nbval-check-output" in _tags(c):
            checked[section] = True
    missing = [s for s, ok in checked.items() if not ok and not s.lower().startswith(EXEMPT_SECTIONS)]
    assert not missing, f"sections without a checked (nbval-check-output) cell: {missing}"


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert sorted(pip) == sorted(reqs)
    assert "torch==2.13.0" in reqs, "torch pinned exactly (a range pulls a multi-GB CUDA build)"


def _headings(number):
    """Lower-cased heading lines (any level) of notebooks/NN_*.ipynb, or None if there is no such notebook."""
    paths = sorted((ROOT / "notebooks").glob(f"{number}_*.ipynb"))
    if not paths:
        return None
    return [line.lower() for c in _cells(paths[0]) if c["cell_type"] == "markdown"
            for line in _src(c).splitlines() if line.startswith("#")]


def _lessons(path):
    """The `Lesson:` paragraphs of a module's docstrings (its own, then its classes' and functions'), one line each."""
    tree = ast.parse(path.read_text())
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, defs)]
    out = []
    for node in nodes:
        for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
            if "Lesson:" in para:
                out.append((node is tree, " ".join(para[para.index("Lesson:"):].split())))
    return out


def test_there_are_modules():
    assert MODULES, "vl2lab/*.py missing"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_module_names_a_lesson_that_exists(path):
    lessons = _lessons(path)
    assert any(own for own, _ in lessons), "module docstring: a `Lesson: notebook NN, section \"...\"` line"
    for _, text in lessons:
        parts = re.split(r"\bnotebook (\d\d)\b", text)      # [before, NN, text, NN, text, ...]
        for number, after in zip(parts[1::2], parts[2::2]):
            heads = _headings(number)
            assert heads is not None, f"{text!r}: no notebooks/{number}_*.ipynb"
            for title in re.findall(r'"([^"]+)"', after):
                assert any(title.lower() in h for h in heads), \
                    f"{text!r}: notebook {number} has no section {title!r} (its headings: {heads})"


# ------------------------------------------------------------------ measured truth only (issue 15)
# A measured quantity — a time, a rate, a bandwidth, a speed-up, a percentage — never sits in markdown prose: it
# comes from a code cell's output (rendered with IPython.display.Markdown where it reads as running text). Quoted
# claims of the article go in a blockquote (a line starting with ">"); code and literals go in backticks.
_NUM = r"(?<![\w.])\d+(?:[.,]\d+)?(?:\s*(?:–|-|to)\s*\d+(?:[.,]\d+)?)?"
MEASURED = [
    ("time", re.compile(_NUM + r"\s*(?:ns|µs|μs|us|ms|s|secs?|seconds?|mins?|minutes?)(?!\w)")),
    ("rate", re.compile(_NUM + r"\s*(?:[kKMGTP]i?B|[kMGT]?bit|[GT]?FLOP|tokens?|images?|tiles?|it|steps?)/s\b")),
    ("speed-up", re.compile(_NUM + r"\s*[×x](?=\s*(?:faster|slower|speed|more|fewer|less|ahead|above|below"
                                   r"|over|of|the|[,.;:)]|$))", re.M)),
    ("percentage", re.compile(_NUM + r"\s*%")),
]


def _prose(md: str) -> str:
    """A markdown cell's prose: without blockquotes (quoted claims), code spans, fenced code and link targets."""
    md = re.sub(r"```.*?```", " ", md, flags=re.S)
    md = "\n".join(l for l in md.splitlines() if not l.lstrip().startswith(">"))
    md = re.sub(r"`[^`]*`", " ", md)
    return re.sub(r"\]\([^)]*\)", "]", md)


def measured_figures_in(md: str) -> list[str]:
    text = _prose(md)
    return [f"{kind}: {m.group(0)!r}" for kind, rx in MEASURED for m in rx.finditer(text)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_states_no_measured_quantity(path):
    found = [(i, f) for i, c in enumerate(_cells(path)) if c["cell_type"] == "markdown"
             for f in measured_figures_in(_src(c))]
    assert not found, ("measured quantities written into markdown (render them from a cell, or quote the article "
                       f"in a blockquote): {found}")


def test_the_prose_check_catches_what_it_should():
    bad = ["costs a few 34–60 µs", "decode at 1.67 ms/token", "4191 GB/s", "1.45–1.85× faster", "68 % of it",
           "12.7 s to 3.2 s", "56.7 images/s"]
    good = ["> the article: 12.7 s on one GPU", "`timeout=60` s", "4 × 80 GB cards", "2 × 2101 = 4202 positions",
            "the 4096-token context", "batch 32"]
    assert all(measured_figures_in(t) for t in bad), [t for t in bad if not measured_figures_in(t)]
    assert not any(measured_figures_in(t) for t in good), [t for t in good if measured_figures_in(t)]


# ------------------------------------------------------------------ figures and timings on the page
_DRAWS = re.compile(r"\b(?:plt\.show\(\)|plots\.save\(|_plots?\.plot_\w+\(|\.savefig\()")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_that_draws_stores_its_image(path):
    empty = [_src(c)[:70] for c in _cells(path) if c["cell_type"] == "code" and _DRAWS.search(_src(c))
             and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not empty, f"cells that draw but store no image (run `make refresh`): {empty}"


_NEG_TIME = re.compile(r"(?<![\w.\-e])-\d+(?:\.\d+)?\s*(?:ns|µs|us|ms|s)\b|(?:ms|_s|time|speed-?up|per_s\w*)"
                       r"[^\n]{0,3}[=:]\s*-\d", re.I)


def _texts(cell):
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            yield "".join(o["text"])
        for k in ("text/plain", "text/html", "text/markdown"):
            v = o.get("data", {}).get(k)
            if v:
                yield "".join(v) if isinstance(v, list) else v


_TIMED_HEADER = re.compile(r"_ms\b|\bms_|speed_?up|_per_s\b|_s\b|\bms\b|/s\b")


def negative_timings(text: str) -> list[str]:
    """Negative times or speed-ups in an output: inline (``decode -4.0 ms``) or in a table with timed columns."""
    bad = [m.group(0) for m in _NEG_TIME.finditer(text)]
    timed = False
    for line in text.splitlines():
        if _TIMED_HEADER.search(line) and not re.search(r"\d", line.replace("_s", "")):
            timed = True                                   # a header row of a table with timed columns
        elif not line.strip():
            timed = False
        elif timed:
            bad += [f"{c} in {line.strip()[:60]!r}" for c in line.split() if re.fullmatch(r"-\d+(?:\.\d+)?", c)]
    return bad


def test_the_negative_timing_check_catches_a_table():
    table = "rung  batch  decode_ms_per_step  decode_speedup\n----  -----\n3  2  -4.04  -1.94\n"
    assert len(negative_timings(table)) == 2 and negative_timings("decode: -18.36 ms/step")
    assert not negative_timings("max |Δ| = -1.2e-07\nlogit 0 -3.5")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_negative_time_or_speed_up_on_the_page(path):
    bad = [b for c in _cells(path) if c["cell_type"] == "code" for t in _texts(c) for b in negative_timings(t)]
    assert not bad, f"negative times or speed-ups in stored outputs: {bad}"
