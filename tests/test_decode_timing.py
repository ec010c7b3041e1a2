"""Decode is timed step by step (vl2lab.perf.workload.time_steps, marked by the generation loops' step hook), never
as a difference of two noisy totals; so it cannot come out negative."""
import re
from pathlib import Path

import pytest
import torch

from vl2lab.model import graph_decode
from vl2lab.model.generation import generate, step_hook
from vl2lab.model.vl2 import build_model
from vl2lab.perf import ladder, report, rungs, workload

ROOT = Path(__file__).resolve().parent.parent


def fake_run(n_marks):
    def run(mark):
        for _ in range(n_marks):
            mark()
        return "tokens"
    return run


def test_time_steps_on_a_fixed_clock():
    """Clock readings per run: start, first token, then one per step. A warm-up run's (huge) gaps are dropped;
    the decode median pools every step of every timed run; prefill and end to end are per run."""
    readings = iter([0, 100, 200, 300,                 # warm-up: prefill 100, steps 100, 100
                     1000, 1010, 1011, 1014, 1016,     # prefill 10, steps 1, 3, 2
                     2000, 2012, 2014, 2018, 2020])    # prefill 12, steps 2, 4, 2
    runs = iter([fake_run(3), fake_run(4), fake_run(4)])
    t, result = workload.time_steps(lambda mark: next(runs)(mark), "cpu", repeats=2, warmup=1,
                                    clock=lambda: next(readings))
    assert result == "tokens"
    assert t["decode_step_s"]["median"] == 2 and t["decode_step_s"]["n"] == 6        # median of 1,3,2,2,4,2
    assert t["decode_step_s"]["p10"] <= 2 <= t["decode_step_s"]["p90"]
    assert t["prefill_s"]["median"] == 11 and t["prefill_s"]["n"] == 2
    assert t["e2e_s"]["median"] == 18                                               # 16 and 20


def test_a_run_without_marks_is_an_error():
    with pytest.raises(RuntimeError, match="no mark"):
        workload.time_steps(fake_run(0), "cpu", repeats=1, warmup=0)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_the_step_hook_sees_every_token_once(path):
    """Both generation loops call the hook once per chosen token: after the prefill, then after each step."""
    model = build_model("random-tiny", seed=1)
    lm = model.language
    embeds = torch.randn(2, 7, lm.config.hidden_size) * 0.02
    seen = []
    with step_hook(lambda tok: seen.append(tok.clone())):
        if path == "eager":
            out = generate(lm, embeds, None, 5, ignore_eos=True)
        else:
            out = graph_decode.decoder_for(lm, 2, 12, "cpu", ignore_eos=True).generate(embeds, None, 5)
    assert len(seen) == 5 and torch.equal(torch.stack(seen, 1), out)
    generate(lm, embeds, None, 2, ignore_eos=True)                 # outside the block: no hook left behind
    assert len(seen) == 5


def test_ladder_decode_is_positive_at_every_rung(monkeypatch):
    """All eight rungs on random-tiny (the compile rungs' torch.compile replaced by the identity: it would take
    minutes on a CPU and times the same way): decode per step positive, p10 ≤ median ≤ p90, every step counted,
    and the steps with the prefill make up the whole generation."""
    monkeypatch.setattr(graph_decode, "compile_regions", list)
    monkeypatch.setattr(rungs, "compile_regions", list)
    res = ladder.run("random-tiny", "cpu", (1,), repeats=2, warmup=1, new_tokens=4, log=lambda *_: None)
    assert [r["rung"][0] for r in res["runs"]] == list("12345678")
    for r in res["runs"]:
        d = r["decode_step_s"]
        assert "error" not in r and "decode_ms_per_step" not in r
        assert 0 < d["p10"] <= d["median"] <= d["p90"] and d["n"] == 2 * 3
        assert r["e2e_s"]["median"] > r["prefill_s"]["median"] > 0
    merged = {"runs": {(r["rung"], r["batch"]): r for r in res["runs"]}, "floor": res["floor"]}
    assert all(row["decode_ms_per_step"] > 0 and row["decode_speedup"] > 0 and row["decode_timing"] == "per step"
               for row in report.rows(merged))


def test_report_reads_old_files_as_what_they_are():
    """A run recorded before the step timer (only ``decode_ms_per_step``) is read, with no spread, and labelled."""
    old = {"decode_ms_per_step": 2.5}
    new = {"decode_step_s": {"median": 0.002, "p10": 0.0015, "p90": 0.003, "n": 63}}
    assert report.decode_step_ms(old)["timing"] == "difference of totals"
    assert report.decode_step_ms(old)["median"] == 2.5 and report.decode_step_ms(old)["p10"] != 2.5
    assert report.decode_step_ms(new) == {"median": 2.0, "p10": 1.5, "p90": 3.0, "n": 63, "timing": "per step"}


OLD_FORMULA = re.compile(r"e2e\w*\[\"median\"\]\s*-\s*pre\w*\[\"median\"\]|/\s*\((?:new_tokens|NEW_TOKENS)\s*-\s*1\)")


@pytest.mark.parametrize("name", ["bench", "rungs", "peer", "workload", "ladder"])
def test_the_difference_of_totals_is_gone(name):
    src = (ROOT / "vl2lab" / "perf" / f"{name}.py").read_text()
    assert not OLD_FORMULA.search(src), OLD_FORMULA.search(src).group(0)
