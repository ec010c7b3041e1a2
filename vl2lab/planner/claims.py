"""The source article's claims: its size and memory figures (checked with the planner's maths) and its speed figures
(quoted as data, for notebook 04 to set beside what the measured ceilings allow).

Lesson: notebook 01, section "6. The source article's size claims"; notebook 04, section "7. The article checked".
"""
from __future__ import annotations

from vl2lab.model.config import REAL_PRESETS, get_config
from vl2lab.planner import layouts
from vl2lab.planner import sizing as S

__all__ = ["ClaimsTable", "article_claims", "ARTICLE_SPEEDUP", "ARTICLE_TUNING", "tuning_rows"]

# Section 1 of the article: "某自动驾驶企业通过4卡A100部署Deepseek VL2，将单图推理延迟从12.7秒降至3.2秒"
ARTICLE_SPEEDUP = {"gpus": 4, "hardware": "4 × A100", "one_image_s": (12.7, 3.2)}
# Its tuning table "调优前后对比": (row, latency ms, images/s)
ARTICLE_TUNING = (("baseline", 127, 7.8), ("mixed precision", 92, 10.9), ("tensor parallel", 85, 11.7),
                  ("NCCL tuning", 78, 12.8))


class ClaimsTable(list):
    """Rows {claim, reality, verdict}; ``table()`` (and ``str``) is the plain-text form."""

    def table(self) -> str:
        return "\n\n".join(f"claim:   {r['claim']}\nreality: {r['reality']}\nverdict: {r['verdict']}" for r in self)

    __str__ = table


def article_claims() -> ClaimsTable:
    """The source article's size and memory claims, checked with :mod:`vl2lab.planner.sizing`."""
    cfgs = [get_config(n) for n in REAL_PRESETS]
    c = [S.param_counts(x) for x in cfgs]
    wb = [S.gb(S.weight_bytes(x, "bfloat16")) for x in cfgs]
    tiny, small, base = cfgs
    u80, u40 = layouts.usable_bytes(80e9), layouts.usable_bytes(40e9)
    work = dict(batch=1, seq_len=4096, tiles=10, dtype="bfloat16")
    b80 = layouts.layout_bytes(base, **work)
    s40 = layouts.layout_bytes(small, **work)
    s40_hf = layouts.layout_bytes(small, attn="eager", logits="all", **work)
    # a verdict is "right" only if the claim is within 10 % of what the maths gives
    near_13b = any(abs(x["total"] - 13e9) <= 0.1 * 13e9 for x in c)
    near_260 = any(abs(b - 260e9) <= 0.1 * 260e9 for b in [13e9 * 2] + [S.weight_bytes(x, "float16") for x in cfgs])
    rows = [
        {"claim": "13B parameters",
         "reality": "no 13B variant: tiny / small / base have " + " / ".join(f"{x['total'] / 1e9:.2f}B" for x in c)
                    + " parameters (published 3.37B / 16.1B / 27.5B), "
                    + " / ".join(f"{x['activated'] / 1e9:.2f}B" for x in c) + " activated per token",
         "verdict": "right" if near_13b else "wrong"},
        {"claim": "about 260 GB at FP16",
         "reality": f"13e9 x 2 B = {13e9 * 2 / 1e9:.0f} GB, 10x less than claimed; the real 16-bit weights are "
                    + " / ".join(f"{x:.2f}" for x in wb) + " GB (tiny / small / base)",
         "verdict": "right" if near_260 else f"wrong ({260e9 / (13e9 * 2):.0f}x off even for its own count)"},
        {"claim": "one A100 80GB can only hold part of the parameters",
         "reality": f"base weights {wb[2]:.2f} GB < {S.gb(u80):.1f} GB usable; with batch 1 at 4096 tokens "
                    f"(KV {S.gb(b80['kv_cache']):.2f} + activations {S.gb(b80['activations']):.2f} GB) "
                    f"{S.gb(b80['total']):.2f} GB: the whole largest model fits one 80 GB GPU. Small on a 40 GB "
                    f"card ({S.gb(u40):.1f} GB usable): weights {wb[1]:.2f} GB; vl2lab's path (SDPA, last-token "
                    f"logits) needs {S.gb(s40['total']):.2f} GB, the official HF path (eager attention, logits for "
                    f"every position) {S.gb(s40_hf['total']):.2f} GB, which is why the official README fits small "
                    f"on 40 GB only with chunked prefill (chunk_size=512); tiny ({wb[0]:.2f} GB) fits easily",
         "verdict": ("wrong (base fits one 80 GB GPU; small fits 40 GB only with chunked prefill)"
                     if b80["total"] <= u80 else "right (base does not fit one 80 GB GPU)")},
    ]
    return ClaimsTable(rows)


def tuning_rows() -> list[dict]:
    """The article's tuning table with what follows from its own numbers: 1000 / latency (the images/s of one
    request at a time) and each row's speed-up over the row before it."""
    rows, prev = [], None
    for name, ms, ips in ARTICLE_TUNING:
        rows.append({"row": name, "latency ms": ms, "img/s": ips, "1000 / latency": round(1000 / ms, 2),
                     "speed-up over the row before": round(prev / ms, 2) if prev else "-"})
        prev = ms
    return rows
