"""``python -m vl2lab plan``: the planner (:func:`vl2lab.planner.plan.plan`) on the command line.

Every option is checked by its argparse type before anything is sized, so a bad value is one line on stderr that
names the option (``vl2lab plan: error: --gpus must be an integer >= 1, got '0'``) and exit status 2; a
:class:`~vl2lab.planner.plan.PlanError` that names a keyword of :func:`plan` is reworded with its option.
Exit status (``EXIT``): 0 a layout fits, 1 none fits (the table and the hint are still printed), 2 bad arguments.

Lesson: notebook 01, section "5. Will it fit? The planner".
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap

from vl2lab.launch.options import at_least
from vl2lab.model.config import ConfigError, preset_name
from vl2lab.planner.plan import DTYPES, VARIANTS, PlanError, parse_image_size, plan
from vl2lab.planner.sizing import gb

__all__ = ["main", "parser", "EXIT", "OPTIONS"]

EXIT = {"fits": 0, "no_fit": 1, "bad_arguments": 2}
# plan() keyword → command-line option
OPTIONS = {"variant": "--variant", "n_gpus": "--gpus", "gpu_gb": "--gpu-gb", "dtype": "--dtype", "batch": "--batch",
           "images_per_prompt": "--images", "image_size": "--image-size", "context": "--context",
           "text_tokens": "--text-tokens", "new_tokens": "--new-tokens", "moe_modes": "--moe-modes",
           "vision": "--vision", "margin": "--margin", "gpus_per_node": "--gpus-per-node"}
PREFIX = "vl2lab plan: error: "

DESCRIPTION = [
    "Will DeepSeek-VL2 fit these GPUs, and how should it be split? For one request shape (images of a size, text "
    "and new tokens, sized for --context tokens per sequence) and --batch sequences in flight, it computes the "
    "bytes each GPU holds for the weights, the KV cache and the activations (one full-length prefill), on one "
    "GPU and in every legal layout of the --gpus GPUs: tp (tensor-parallel ranks per model copy), ep (experts "
    "split over ep GPUs), dp (independent copies), moe (tp: every expert split by width; ep: whole experts). It "
    "picks the fitting layout with the fewest GPUs per copy and prints the commands that run it: vl2lab "
    "(torchrun), vLLM and SGLang (and per-node lines past --gpus-per-node).",
    "GB means 10^9 bytes (an \"80 GB\" H100 holds 80 GiB = 85.9 GB, so the plan errs on the safe side). "
    "A GPU's usable memory is gpu-gb x (1 - margin) - 0.5 GB of CUDA context.",
]
EPILOG = """\
exit status:
  0  a layout fits (with --tp: that layout fits)
  1  no layout fits: the table and the hint (how many such GPUs one copy
     needs) are still printed
  2  bad arguments: one line on stderr, naming the option

examples:
  python -m vl2lab plan --variant small --gpus 4 --gpu-gb 80
  python -m vl2lab plan --variant base --gpus 2 --gpu-gb 40 --batch 8 --json
  python -m vl2lab plan --variant tiny --gpus 4 --tp 4          # the commands of tp=4 instead of the pick"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, naming the option: "argument --gpus: must be ..." → "--gpus must be ..."."""
        m = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if m:
            opt, rest = m[1].split("/")[-1], m[2]
            message = f"{opt} {rest}" if rest.startswith("must ") else f"{opt}: {rest}"
        self.exit(EXIT["bad_arguments"], PREFIX + " ".join(message.split()) + "\n")


def _gpu_gb(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (GB = 10^9 bytes per GPU), got {text!r}")
    return v


def _margin(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (the share of each GPU kept free), "
                                         f"got {text!r}")
    return v


def _context(text: str):
    if text.lower() in ("request", "none"):
        return None
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'request', got {text!r}")
    return v


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except PlanError:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT in pixels, both at least 1 (e.g. 768x768), "
                                         f"got {text!r}") from None


def _moe_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ("tp", "ep") for m in modes):
        raise argparse.ArgumentTypeError(f"must be tp, ep or tp,ep, got {text!r}")
    return modes


def _variant(text: str) -> str:
    try:
        return preset_name(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"unknown DeepSeek-VL2 variant {text!r}; use one of "
                                         f"{', '.join(VARIANTS)} (or a deepseek-ai/... Hub id)") from None


def parser() -> argparse.ArgumentParser:
    fill = lambda p: textwrap.fill(p, 79, break_on_hyphens=False)
    ap = _Parser(prog="python -m vl2lab plan", formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="\n\n".join(map(fill, DESCRIPTION)), epilog=EPILOG)
    add, d = ap.add_argument, " (default: %(default)s)"
    add("--variant", metavar="NAME", type=_variant, default="small",
        help="model: tiny, small, base (= deepseek-vl2-tiny, deepseek-vl2-small, deepseek-vl2), vl2-micro (vl2lab's "
             "trained miniature) or random-tiny/-small/-base" + d)
    add("--gpus", metavar="N", type=at_least(1), default=4, help="number of GPUs, all of them used" + d)
    add("--gpu-gb", metavar="GB", type=_gpu_gb, default=80, help="memory per GPU in GB of 10^9 bytes" + d)
    add("--dtype", default="bfloat16", choices=DTYPES, help="of the weights and activations" + d)
    add("--batch", metavar="N", type=at_least(1), default=1,
        help="sequences in flight on the whole deployment; each of the dp copies takes ceil(batch/dp)" + d)
    add("--images", metavar="N", type=at_least(0), default=1, help="images per prompt, 0 for text only" + d)
    add("--image-size", metavar="WxH", type=_image_size, default="768x768",
        help="WIDTHxHEIGHT in pixels of each image; it sets the tiling (real variants: 421 to 2101 tokens per "
             "image)" + d)
    add("--context", metavar="TOKENS", type=_context, default="4096",
        help="tokens per sequence the KV cache and activations are sized for (a server's --max-model-len), or "
             "'request' for the request's own length (default: %(default)s, the trained length)")
    add("--text-tokens", metavar="N", type=at_least(0), default=64, help="prompt text tokens per request" + d)
    add("--new-tokens", metavar="N", type=at_least(0), default=512, help="generated tokens per request" + d)
    add("--moe-modes", metavar="MODES", type=_moe_modes, default="tp,ep",
        help="expert splits to consider: tp (every expert split by width), ep (whole experts per GPU) or tp,ep" + d)
    add("--vision", default="replicated", choices=("replicated", "dp", "tp"),
        help="the ViT: replicated on every rank, dp (tiles split over the ranks) or tp (its MLP split)" + d)
    add("--margin", metavar="FRACTION", type=_margin, default=0.10, help="share of each GPU kept free, in [0, 1)" + d)
    add("--gpus-per-node", metavar="N", type=at_least(1), default=8,
        help="GPUs per machine; more --gpus than this adds per-node commands" + d)
    add("--tp", metavar="N", type=at_least(1), default=None,
        help="print the commands of the layout with this tensor-parallel size (default: the pick's)")
    add("--moe", choices=("tp", "ep"), default="tp", help="with --tp: how that layout splits the experts" + d)
    add("--ep", metavar="N", type=at_least(1), default=None,
        help="with --tp and --moe ep: the expert-parallel size, --tp or --gpus (default: the first in the table)")
    add("--model-path", metavar="FOLDER", default=None,
        help="--model of the vl2lab command (default: vl2-micro and random-* as such; for the real variants "
             "/path/to/<variant>, standing for the folder downloaded from the Hugging Face Hub)")
    add("--json", action="store_true",
        help="print JSON (settings, GB figures of every layout, the pick, commands) instead of text (default: text)")
    return ap


def _error(message: str) -> int:
    print(PREFIX + message, file=sys.stderr)
    return EXIT["bad_arguments"]


def main(argv=None) -> int:
    """Parse ``argv``, plan, print; return the exit status (``EXIT``). Never raises SystemExit (--help returns 0)."""
    try:
        a = parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT["bad_arguments"]
    if a.tp is None and (a.ep is not None or a.moe != "tp"):
        return _error("--moe and --ep choose the layout of --tp; give --tp too")
    try:
        p = plan(a.variant, a.dtype, a.gpu_gb, a.gpus, a.batch, a.images, a.image_size, a.context, a.moe_modes,
                 a.vision, a.margin, text_tokens=a.text_tokens, new_tokens=a.new_tokens,
                 gpus_per_node=a.gpus_per_node)
    except PlanError as e:
        msg = str(e)
        if e.arg in OPTIONS and msg.startswith(e.arg):
            msg = OPTIONS[e.arg] + msg[len(e.arg):]
        return _error(msg)
    lay = p.recommended
    if a.tp is not None:
        try:
            lay = p.layout(a.tp, a.moe, a.ep)
        except PlanError:
            legal = ", ".join(f"--tp {t} --moe tp" if not ep_mode else f"--tp {t} --moe ep --ep {e}"
                              for t, ep_mode, e in sorted({(r["tp"], r["moe"] != "tp", r["ep"]) for r in p.layouts}))
            return _error(f"--tp {a.tp} --moe {a.moe}{f' --ep {a.ep}' if a.ep else ''} is not a legal layout of "
                          f"{p.cfg.name} on {a.gpus} GPUs; legal: {legal}")
    if a.json:
        d = p.to_dict()
        d["commands"] = p.commands(lay, a.model_path) if lay else None
        d["exit_status"] = EXIT["fits" if lay and lay["fits"] else "no_fit"]
        print(json.dumps(d, indent=1, sort_keys=True))
    else:
        note = "" if lay is None or lay["fits"] else (
            f"note: tp={lay['tp']} ep={lay['ep']} dp={lay['dp']} moe={lay['moe']} does not fit: "
            f"{gb(lay['total']):.2f} GB per GPU > {gb(p.usable):.2f} GB usable; its commands anyway:\n")
        print(p.table() + "\n\n" + note + p.commands_text(lay, model_path=a.model_path))
    return EXIT["fits" if lay and lay["fits"] else "no_fit"]
