"""``python -m vl2lab <command> ...`` (also the ``vl2lab`` console script): a small table of subcommands.

Each entry names a module and a function ``fn(argv) -> int`` that parses the rest of the command line, so a
subcommand's imports happen only when it runs. Add a command by adding a row.

Lesson: notebook 01, section "Will it fit? The planner" (``plan``).
"""
from __future__ import annotations

import importlib
import sys

# name: (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "plan": ("vl2lab.planner.cli", "main", "will DeepSeek-VL2 fit these GPUs, and how to split it (memory per GPU, "
                                           "layouts, launch commands; exit 1 if nothing fits)"),
    "generate": ("vl2lab.serve.generate", "main", "answer a question about an image, the model sharded over the "
                                                  "ranks of torchrun (same as python -m vl2lab.serve.generate)"),
    "bench": ("vl2lab.perf.bench", "main", "the fixed benchmark workload on one device (python -m vl2lab.perf.bench)"),
    "ladder": ("vl2lab.perf.ladder", "main", "the tuning ladder, every rung measured in one run "
                                             "(python -m vl2lab.perf.ladder)"),
    "train-micro": ("vl2lab.train.micro", "main", "rebuild the shipped vl2-micro (python -m vl2lab.train.micro)"),
    "launch": ("vl2lab.launch.__main__", "main", "run module:function on N ranks, or print the torchrun command "
                                                 "(python -m vl2lab.launch)"),
    "workbook": ("vl2lab.workbook.runner", "main", "run or refresh the notebooks with papermill "
                                                   "(python -m vl2lab.workbook)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: python -m vl2lab <command> [options]\n\ncommands:\n" + "\n".join(
        f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()) + \
        "\n\n'python -m vl2lab <command> --help' shows a command's options."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vl2lab: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, fn, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), fn)(rest)


if __name__ == "__main__":
    sys.exit(main())
