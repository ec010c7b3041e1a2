"""Run the whole workbook, or refresh the notebooks' reference outputs.

``python -m vl2lab.workbook run --profile cpu`` (what ``make run`` calls) executes every ``notebooks/NN_*.ipynb``
in order with papermill into a fresh folder ``runs/<time>-<profile>/`` — never over the sources — with the
parameters of ``notebooks/params/<profile>.yaml``, and writes ``report.md`` / ``report.json`` (notebook, status,
duration). A profile file maps ``all`` and each notebook's stem to papermill parameters::

    all: {DTYPE: bfloat16}
    04_full_4gpu_deployment: {WORLD_SIZE: 4}

``python -m vl2lab.workbook refresh`` (``make refresh``) re-executes the source notebooks *in place* with their
own defaults (no injected-parameters cell), so that their stored outputs — nbval's reference — come from a real
CPU-default run. Widget state is dropped and the kernelspec normalised to ``python3``.

papermill, nbformat and nbclient are imported inside :func:`run` and :func:`refresh`: they are heavy and only
needed when notebooks are executed.

Lesson: notebook 00, section "Parameters" (papermill parameters and profile files).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def notebooks(only: str | None = None) -> list[Path]:
    """The workbook's notebooks in order (``NN_slug.ipynb``); ``only`` filters by prefix or substring."""
    nbs = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        nbs = [p for p in nbs if any(p.name.startswith(k) or k in p.stem for k in keys)]
        if not nbs:
            raise SystemExit(f"no notebook matches {only!r}; notebooks: "
                             + ", ".join(p.name for p in sorted(NOTEBOOKS.glob('[0-9][0-9]_*.ipynb'))))
    return nbs


def load_profile(profile: str) -> dict:
    """The papermill parameters of ``notebooks/params/<profile>.yaml``: {"all" or a notebook stem: {NAME: value}}."""
    fn = NOTEBOOKS / "params" / f"{profile}.yaml"
    if not fn.is_file():
        known = sorted(p.stem for p in (NOTEBOOKS / "params").glob("*.yaml"))
        raise SystemExit(f"no parameter profile {profile!r} ({fn} missing); known profiles: {', '.join(known)}")
    data = yaml.safe_load(fn.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{fn}: expected a mapping of notebook stem → parameters")
    return data


def params_for(profile: dict, stem: str) -> dict:
    """The parameters one notebook gets: the profile's ``all`` entry, overridden by the notebook's own entry."""
    return {**(profile.get("all") or {}), **(profile.get(stem) or {})}


def run(profile_name: str, only: str | None, out: str | None, timeout: int) -> int:
    """Execute the notebooks with papermill into a fresh output folder and write its report; 1 if any failed."""
    import papermill as pm

    profile = load_profile(profile_name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out else ROOT / "runs" / f"{stamp}-{profile_name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for nb in notebooks(only):
        params = params_for(profile, nb.stem)
        params.setdefault("OUTPUT_DIR", str(out_dir / nb.stem))
        t0 = time.perf_counter()
        status, err = "ok", ""
        print(f"[vl2lab] {nb.name} …", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, kernel_name="python3",
                                cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
                                execution_timeout=timeout)
        except Exception as e:  # papermill still writes the partial notebook, with the error cell marked
            status, err = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        dt = time.perf_counter() - t0
        rows.append({"notebook": nb.name, "status": status, "duration_s": round(dt, 1), "error": err,
                     "parameters": params})
        print(f"[vl2lab] {nb.name}: {status} in {dt:.1f} s {err}", flush=True)
    (out_dir / "report.json").write_text(json.dumps({"profile": profile_name, "runs": rows}, indent=2))
    lines = [f"# Workbook run ({profile_name})", "", "| notebook | status | duration (s) |", "|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['status']} | {r['duration_s']} |" for r in rows]
    fails = [r for r in rows if r["status"] != "ok"]
    if fails:
        lines += ["", "## Failures", ""] + [f"- {r['notebook']}: {r['error']}" for r in fails]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[vl2lab] outputs in {out_dir}")
    return 1 if fails else 0


def clean_notebook(nb) -> None:
    """Normalise metadata so the committed notebook renders anywhere and nbval finds the current kernel."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for o in cell.get("outputs", []):
                o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)


def refresh(only: str | None, timeout: int) -> int:
    """Re-execute the source notebooks in place with their own defaults; a failing one is left unchanged."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    rc = 0
    for nb_path in notebooks(only):
        nb = nbformat.read(nb_path, as_version=4)
        t0 = time.perf_counter()
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}})
        try:
            client.execute()
        except CellExecutionError as e:
            print(f"[vl2lab] {nb_path.name}: FAILED, left unchanged\n{str(e)[-3000:]}", file=sys.stderr)
            rc = 1
            continue
        clean_notebook(nb)
        nbformat.write(nb, nb_path)
        print(f"[vl2lab] refreshed {nb_path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def main(argv=None) -> int:
    """``python -m vl2lab.workbook run|refresh`` (see the module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m vl2lab.workbook", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    only_help = "comma-separated notebook prefixes or name parts, e.g. 02,04 (default: every notebook)"
    timeout_help = "per-cell timeout in seconds (default: 1800)"
    r = sub.add_parser("run", help="execute the notebooks with papermill into runs/<time>-<profile>/")
    r.add_argument("--profile", default="cpu",
                   help="parameter profile, notebooks/params/<profile>.yaml (default: cpu)")
    r.add_argument("--only", default=None, help=only_help)
    r.add_argument("--out", default=None, help="output folder (default: runs/<time>-<profile>/)")
    r.add_argument("--timeout", type=int, default=1800, help=timeout_help)
    f = sub.add_parser("refresh", help="re-execute the source notebooks in place (reference outputs)")
    f.add_argument("--only", default=None, help=only_help)
    f.add_argument("--timeout", type=int, default=1800, help=timeout_help)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.cmd == "run":
        return run(a.profile, a.only, a.out, a.timeout)
    return refresh(a.only, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
