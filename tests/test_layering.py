"""The package's layering rules, read from the source with ``ast`` (nothing of vl2lab is imported).

Layers, bottom to top: the core (model, inputs, weights, parallel) knows nothing of the layers built on it
(serve, train, perf, planner, launch, workbook, lessons); ``vl2lab.lessons`` is the notebooks' own layer and
nothing else imports it. Each rule is its own test, so a failure names the rule and lists every offender.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vl2lab"
MAX_LINES = 400
CORE = ("vl2lab.model", "vl2lab.inputs", "vl2lab.weights", "vl2lab.parallel")
UPPER = ("vl2lab.lessons", "vl2lab.perf", "vl2lab.workbook", "vl2lab.serve", "vl2lab.train", "vl2lab.planner",
         "vl2lab.launch")
# Third-party packages that may be imported inside a function (rule d): heavy or optional, so importing them at
# the top would slow every rank and test, or fail where they are not installed.
LAZY_OK = {
    "matplotlib",      # figures only; ranks and most tests never draw
    "ipywidgets",      # notebook panels only
    "IPython",         # display helpers and the %%torchrun magic; only inside a kernel
    "transformers",    # seconds to import; only needed when a Hugging Face model or tokenizer is built
    "papermill",       # the workbook runner's `run` only
    "nbformat",        # the workbook runner's `refresh` only
    "nbclient",        # the workbook runner's `refresh` only
    "jupyter_client",  # kernels, for the runner and the magic only
    "triton",          # GPU kernels; not installed on CPU-only machines
    "torch._dynamo",   # the compiler stack: seconds to import, needed only by decode="compile"
}


def parse_package(pkg: Path):
    """{module name: path}, {module name: ast tree} and the files that do not parse, for every .py under
    ``pkg`` except assets/ (a package's module is its __init__.py)."""
    sources, trees, errors = {}, {}, []
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg.parent).with_suffix("").parts
        if "assets" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path
        try:
            trees[name] = ast.parse(path.read_text(), str(path))
        except SyntaxError as e:  # someone is mid-edit: report it, check the rest
            errors.append(f"{path.relative_to(pkg.parent)}:{e.lineno}: {e.msg}")
    return sources, trees, errors


SOURCES, TREES, SYNTAX_ERRORS = parse_package(PKG)


def import_nodes(node: ast.AST, in_function: bool = False):
    """Every import statement below ``node``, at any depth, as (statement, inside a function?); the body of
    ``if TYPE_CHECKING:`` is skipped (it never runs)."""
    for child in ast.iter_child_nodes(node):
        type_checking = isinstance(child, ast.If) and "TYPE_CHECKING" in (getattr(child.test, "id", None),
                                                                          getattr(child.test, "attr", None))
        for c in child.orelse if type_checking else [child]:
            if isinstance(c, (ast.Import, ast.ImportFrom)):
                yield c, in_function
            yield from import_nodes(c, in_function or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.Lambda)))


def imports(mod: str):
    """(line, target, name, inside a function?) for each name ``mod`` imports. ``from vl2lab.x import y``
    targets vl2lab.x.y when that is a module, else vl2lab.x; relative imports are resolved."""
    here = mod if SOURCES[mod].name == "__init__.py" else mod.rpartition(".")[0]  # the package `.` means
    for node, in_fn in import_nodes(TREES[mod]):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name, a.name.rpartition(".")[2], in_fn) for a in node.names)
            continue
        base = node.module or ""
        if node.level:  # `from ..x import y`: go up level - 1 packages from `here`
            up = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
            base = f"{up}.{base}" if base else up
        for a in node.names:
            yield node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base, a.name, in_fn


def where(mod: str, line: int) -> str:
    return f"{SOURCES[mod].relative_to(PKG.parent)}:{line}"


def in_layer(mod: str, *layers: str) -> bool:
    return any(mod == layer or mod.startswith(layer + ".") for layer in layers)


def check(rule: str, offenders: list[str]) -> None:
    """Fail with one line per offender (duplicates, e.g. several names of one statement, listed once)."""
    offenders = list(dict.fromkeys(offenders))
    if offenders:
        pytest.fail(f"{rule}: {len(offenders)} offender(s)\n  " + "\n  ".join(offenders), pytrace=False)


def test_every_module_parses():
    check("modules that do not parse (the other rules skip them)", SYNTAX_ERRORS)


def test_a_no_import_cycles():
    graph = {m: {} for m in SOURCES}  # module -> {vl2lab module it imports: line of the first such import}
    for m in TREES:
        for line, target, _, _ in imports(m):
            if target in SOURCES:
                graph[m].setdefault(target, line)
    # A module is on a cycle when it can reach itself. Its strongly connected component (the cycle, with any
    # cycles interlocked with it) is every module it reaches that reaches it back.
    reach = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        reach[start] = seen
    cycles = sorted({tuple(sorted(w for w in reach[m] if m in reach[w])) for m in graph if m in reach[m]})
    check("import cycles between vl2lab modules", [
        " <-> ".join(c) + "\n      " + "\n      ".join(
            f"{a} -> {b} ({where(a, graph[a][b])})" for a in c for b in sorted(graph[a]) if b in c)
        for c in cycles])


def test_b_layers_import_downwards_only():
    offenders = []
    for m in TREES:
        for line, target, _, _ in imports(m):
            if in_layer(m, *CORE) and in_layer(target, *UPPER):
                offenders.append(f"{where(m, line)}: core module {m} imports {target}")
            elif in_layer(target, "vl2lab.lessons") and not in_layer(m, "vl2lab.lessons"):
                offenders.append(f"{where(m, line)}: {m} imports the notebooks' layer ({target})")
    check("layer violations", offenders)


def test_c_no_private_names_across_modules():
    check("underscore-prefixed names imported from another vl2lab module", [
        f"{where(m, line)}: {m} imports {name} from {target}" for m in TREES for line, target, name, _ in imports(m)
        if in_layer(target, "vl2lab") and target != m
        and any(p.startswith("_") and not p.startswith("__") for p in [*target.split("."), name])])


def test_d_imports_at_the_top():
    # The package root is exempt: it maps its public names lazily (importlib) so that ranks import it cheaply.
    check(f"imports inside a function (allowed only for {', '.join(sorted(LAZY_OK))})", [
        f"{where(m, line)}: {target}" for m in TREES if m != "vl2lab"
        for line, target, _, in_fn in imports(m) if in_fn and target.split(".")[0] not in LAZY_OK
        and ".".join(target.split(".")[:2]) not in LAZY_OK])


def test_e_modules_are_short():
    check(f"modules over {MAX_LINES} lines", [
        f"{p.relative_to(PKG.parent)}: {n} lines" for p in SOURCES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES])


def test_f_package_root_and_docstrings():
    offenders = [f"vl2lab/{p.name}: not __init__.py, __main__.py, assets/ or a subpackage"
                 for p in sorted(PKG.iterdir()) if p.name not in {"__init__.py", "__main__.py", "assets", "__pycache__"}
                 and not (p.is_dir() and (p / "__init__.py").is_file())]
    offenders += [f"{SOURCES[m].relative_to(PKG.parent)}: no docstring" for m in TREES
                  if m != "vl2lab" and SOURCES[m].name == "__init__.py" and not ast.get_docstring(TREES[m])]
    check("package root and subpackage docstrings", offenders)
