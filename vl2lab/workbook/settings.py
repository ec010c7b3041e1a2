"""The resolve cell: turn a notebook's parameters cell into checked, canonical settings.

Every notebook has one ``parameters`` cell of literals (papermill overrides them; it never recomputes derived
values), followed by a *resolve* cell::

    S = vl2lab.workbook.settings.resolve(globals())

``resolve`` reads the upper-case parameters, applies ``VL2LAB_<NAME>`` environment overrides (so the same
notebook can be pointed at a GPU box without editing it), turns ``"auto"`` into concrete choices, checks that
they are consistent (a world size the machine can run, a backend the devices support), and prints one canonical
summary with no times or paths — a line nbval can compare.

The kernel never initialises CUDA: the GPUs are counted with ``nvidia-smi -L`` (a separate process), and the
ranks — fresh processes started by :mod:`vl2lab.launch.launcher` — are the only ones that touch a device.

Lesson: notebook 00, section "Parameters" (the parameters cell and the resolve cell).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

DEFAULTS: dict[str, Any] = {
    "PROFILE": "cpu", "WORLD_SIZE": 1, "BACKEND": "auto", "DEVICE": "auto", "MODEL": "random-tiny",
    "DTYPE": "float32", "SEED": 0, "LAUNCH_TIMEOUT_S": 600, "OUTPUT_DIR": "", "MAKE_PLOTS": True,
}
_DTYPES = ("float32", "bfloat16", "float16", "float64")
_BACKENDS = ("auto", "gloo", "nccl")


class SettingsError(ValueError):
    """A parameter combination this machine cannot run."""


def gpu_count() -> int:
    """Number of NVIDIA GPUs visible, without initialising CUDA in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        n = min(n, len([v for v in vis.split(",") if v.strip()]))
    return n


def _coerce(name: str, raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    return raw


@dataclass
class Settings:
    """Resolved settings: ``S.WORLD_SIZE``, ``S.BACKEND`` … plus ``S.gpus`` and ``S.device_kind``."""
    values: dict = field(default_factory=dict)
    gpus: int = 0
    overridden: tuple = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r} in this notebook's settings") from None

    @property
    def device_kind(self) -> str:
        return "cuda" if self.values["DEVICE"] == "cuda" else "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.device_kind == "cuda"

    def cannot_run(self, world_size: int) -> str | None:
        """Why a launch of ``world_size`` ranks on this notebook's backend cannot run here (None: it can)."""
        if self.values["BACKEND"] == "nccl" and world_size > self.gpus:
            return (f"{world_size} ranks on NCCL need {world_size} GPUs, this machine has {self.gpus} "
                    f"(skipped: run it on a machine with more GPUs, or with BACKEND='gloo')")
        return None

    def world_sizes(self, candidates) -> list[int]:
        """The sizes of ``candidates`` this machine can launch, in order; each one it cannot is printed with why."""
        keep = []
        for n in sorted(set(candidates)):
            why = self.cannot_run(n)
            if why:
                print(f"world size {n}: {why}")
            else:
                keep.append(n)
        return keep

    def summary(self) -> str:
        v = self.values
        head = (f"profile={v['PROFILE']} backend={v['BACKEND']} world_size={v['WORLD_SIZE']} "
                f"device={v['DEVICE']} dtype={v['DTYPE']} model={v['MODEL']} seed={v['SEED']}")
        extra = {k: v[k] for k in sorted(v) if k not in DEFAULTS}
        lines = [head]
        if extra:
            lines.append("notebook parameters: " + ", ".join(f"{k}={json.dumps(x)}" for k, x in extra.items()))
        if self.overridden:
            lines.append("overridden from the environment: " + ", ".join(self.overridden))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def resolve(namespace: dict, *, min_world_size: int = 1, quiet: bool = False) -> Settings:
    """Resolve the upper-case parameters found in ``namespace`` (pass ``globals()``)."""
    values = {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")
              and isinstance(v, (bool, int, float, str, list, tuple, type(None)))}
    for k, v in DEFAULTS.items():
        values.setdefault(k, v)
    overridden = []
    for k in sorted(values):
        env = os.environ.get(f"VL2LAB_{k}")
        if env is not None:
            values[k] = _coerce(k, env, values[k])
            overridden.append(k)

    n_gpu = gpu_count()
    if values["BACKEND"] not in _BACKENDS:
        raise SettingsError(f"BACKEND={values['BACKEND']!r}: use one of {_BACKENDS}")
    if values["DTYPE"] not in _DTYPES:
        raise SettingsError(f"DTYPE={values['DTYPE']!r}: use one of {_DTYPES}")
    ws = values["WORLD_SIZE"]
    if not isinstance(ws, int) or ws < min_world_size:
        raise SettingsError(f"WORLD_SIZE={ws!r}: this notebook needs an integer ≥ {min_world_size}")

    if values["DEVICE"] == "auto":
        # the ranks get a GPU each, or the notebook runs on CPU processes (and says so: settings.hardware)
        values["DEVICE"] = "cuda" if (0 < ws <= n_gpu and values["BACKEND"] != "gloo") else "cpu"
    if values["DEVICE"] not in ("cpu", "cuda"):
        raise SettingsError(f"DEVICE={values['DEVICE']!r}: use 'auto', 'cpu' or 'cuda'")
    if values["DEVICE"] == "cuda" and n_gpu == 0:
        raise SettingsError("DEVICE='cuda' but no NVIDIA GPU is visible (nvidia-smi -L lists none); "
                            "use DEVICE='auto' or 'cpu'")
    if values["BACKEND"] == "auto":
        values["BACKEND"] = "nccl" if (values["DEVICE"] == "cuda" and ws <= n_gpu) else "gloo"
    if values["BACKEND"] == "nccl" and ws > n_gpu:
        raise SettingsError(f"BACKEND='nccl' with WORLD_SIZE={ws} needs {ws} GPUs, this machine has {n_gpu}; "
                            f"lower WORLD_SIZE to ≤ {n_gpu} or use BACKEND='gloo' on CPU")
    if values["DEVICE"] == "cpu" and values["DTYPE"] in ("float16",):
        raise SettingsError("float16 matmuls are not supported well on CPU; use float32 or bfloat16")
    s = Settings(values=values, gpus=n_gpu, overridden=tuple(overridden))
    if values.get("OUTPUT_DIR"):
        os.makedirs(values["OUTPUT_DIR"], exist_ok=True)
    if not quiet:
        print(s.summary())
    return s


def hardware(settings: "Settings | None" = None) -> str:
    """Name the hardware a result ran on, for titles and tables ("one NVIDIA H200", "CPU, 2 cores").

    Read with ``nvidia-smi`` and ``os.cpu_count()``; CUDA is not initialised in this process.
    """
    if settings is not None and not settings.on_gpu:
        return f"CPU, {os.cpu_count()} cores (CPU timings: not a GPU performance result)"
    exe = shutil.which("nvidia-smi")
    names = []
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout
            names = [n.strip() for n in out.splitlines() if n.strip()]
        except (OSError, subprocess.SubprocessError):
            names = []
    if not names:
        return f"CPU, {os.cpu_count()} cores (CPU timings: not a GPU performance result)"
    n = len(names) if settings is None else min(len(names), max(1, settings.WORLD_SIZE))
    words = {1: "one", 2: "two", 3: "three", 4: "four", 8: "eight"}
    return f"{words.get(n, str(n))} {names[0]}" + ("s" if n > 1 else "")
