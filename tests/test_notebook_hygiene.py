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
