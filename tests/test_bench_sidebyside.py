"""bench/sidebyside.py, the machinery of the side-by-side benches (bench/*_vs_hf.py): the order of the interleaved
rounds, two real worker subprocesses stepped over their pipes (order, medians, min / max, CPU time, peak RSS), the
worker loop's count of the bytes saved for backward, the table, the in-process runner and the RESULT line."""

from __future__ import annotations

import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"

# each worker's step sleeps these seconds: one warm-up step, then three timed rounds
SLEEPS = {"ours": [0.01, 0.03, 0.09, 0.06], "peer": [0.01, 0.15, 0.12, 0.18]}

WORKER = """
import sys, time
sys.path.insert(0, {bench!r})
from sidebyside import serve

name, log = sys.argv[1], sys.argv[2]
sleeps = iter({sleeps!r}[name])


def step():
    time.sleep(next(sleeps))
    with open(log, "a") as f:
        f.write(name + "\\n")
    return {{"ours": 1.5, "peer": 2.5}}[name]


serve(lambda: (None, step))
"""


@pytest.fixture
def sidebyside(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("sidebyside", None)
    import sidebyside

    return sidebyside


def run_order(sbs, warmup: int, rounds: int, alternate_warmup: bool) -> list[tuple[str, bool]]:
    seen = []

    def step(name, is_warmup):
        seen.append((name, is_warmup))
        return {"ms": len(seen)}

    warm, timed = sbs.interleave(step, warmup, rounds, alternate_warmup=alternate_warmup)
    assert [len(v) for v in warm.values()] == [warmup] * 2 and [len(v) for v in timed.values()] == [rounds] * 2
    return seen


def test_interleave_alternates_the_timed_rounds(sidebyside):
    o, p = "ours", "peer"
    # workers: each warm-up round ours first, the timed rounds alternate from round 0
    assert run_order(sidebyside, 2, 3, False) == [(o, True), (p, True), (o, True), (p, True),
                                                 (o, False), (p, False), (p, False), (o, False), (o, False), (p, False)]
    # one process: warm-up and timed rounds are one alternating sequence
    assert run_order(sidebyside, 1, 2, True) == [(o, True), (p, True), (p, False), (o, False), (o, False), (p, False)]


def test_two_worker_subprocesses_medians_and_ratio(sidebyside, tmp_path):
    script, log = tmp_path / "worker.py", tmp_path / "steps.log"
    script.write_text(WORKER.format(bench=str(BENCH), sleeps=SLEEPS))
    rounds = []
    res = sidebyside.run_workers(lambda name: [str(script), name, str(log)], 1, 3,
                                 after_round=lambda r, last: rounds.append(last))
    # the order the workers actually stepped in
    assert log.read_text().split() == ["ours", "peer", "ours", "peer", "peer", "ours", "ours", "peer"]
    for name in ("ours", "peer"):
        ms = [last[name]["ms"] for last in rounds]
        assert all(m >= 1e3 * s for m, s in zip(ms, SLEEPS[name][1:]))  # each step at least its sleep
        r = res[name]
        assert (r["median"], r["min"], r["max"]) == (statistics.median(ms), min(ms), max(ms))
        assert r["cpu"] < r["median"]  # sleeping is not process CPU time
        assert r["loss"] == r["losses"][0] == {"ours": 1.5, "peer": 2.5}[name] and len(r["losses"]) == 3
        assert r["hwm"] > r["delta"] >= 0 and r["params"] is None and r["saved"] == 0
    # the sleeps 60 ms (ours' round 2) and 150 ms (the peer's round 0) are the medians
    assert res["ours"]["median"] == rounds[2]["ours"]["ms"] and res["peer"]["median"] == rounds[0]["peer"]["ms"]
    line = sidebyside.result_line("x", res["ours"]["median"], res["peer"]["median"], mem_ratio=0.5)
    assert line == (f"RESULT name=x ours_ms={res['ours']['median']:.0f} peer_ms={res['peer']['median']:.0f} "
                    f"ratio={res['peer']['median'] / res['ours']['median']:.3f} mem_ratio=0.500")
    assert 2.0 < float(line.split("ratio=")[1].split()[0]) < 2.6  # ~150 / 60


def test_worker_loop_counts_what_autograd_saves(sidebyside, monkeypatch, capsys):
    """serve() on a tiny torch model: a "warmup" step records the bytes saved for backward (Linear's input and
    pow's input, 8 x 64 fp32 each; Linear's weight, a parameter, is excluded), a plain "step" does not."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(64, 64), torch.randn(8, 64, requires_grad=True)  # x's gradient needs the weight

    def step():
        loss = model(x).pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def run(commands: str) -> list[dict]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(commands))
        sidebyside.serve(lambda: (model, step))
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    ready, warm, timed, end = run("warmup\nstep\nquit\n")
    assert ready["ready"] and end["base"] == ready["base"] and end["hwm"] >= end["base"]
    assert warm["loss"] == timed["loss"] == pytest.approx(float(model(x).pow(2).mean().detach()))
    assert end["params"] == 64 * 64 + 64 and end["saved"] == 2 * 8 * 64 * 4
    assert run("step\nquit\n")[-1]["saved"] == 0


def test_memory_table_rows(sidebyside, capsys):
    side = {"median": 60.4, "min": 40.0, "max": 90.0, "hwm": 500.0, "delta": 10.0, "saved": 1.0, "params": 2e6,
            "loss": 1.25}
    sidebyside.memory_table({"8 x 64": {"ours": side, "peer": {**side, "median": 151.0, "delta": 20.0}}}, "batch x seq",
                            loss=True)
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.startswith("| batch x seq | ours ms (median) |") and header.endswith("| loss ours / peer |")
    assert header.count("|") == rule.count("|") == row.count("|") == 11
    assert row == ("| 8 x 64 | 60 (40-90) | 151 (40-90) | 2.500 | 500 (10) | 500 (20) | 0.500 | 1 / 1 "
                   "| 2.00M / 2.00M | 1.250 / 1.250 |")
    totals = sidebyside.totals({1: {"ours": side, "peer": side}, 2: {"ours": side, "peer": side}}, "delta")
    assert totals == {"ours": 20.0, "peer": 20.0}


def test_in_process_steps_and_result_line(sidebyside):
    sleeps = {"ours": iter([0.0, 0.02, 0.06, 0.04]), "peer": iter([0.0, 0.1, 0.08, 0.12])}

    def sleeper(name):
        def step():
            time.sleep(next(sleeps[name]))
            return 1.0
        return step

    warm, timed = sidebyside.in_process({n: sleeper(n) for n in ("ours", "peer")}, torch.device("cpu"), False, 1, 3)
    ms = sidebyside.medians(timed)
    assert ms == {n: statistics.median(s["ms"] for s in timed[n]) for n in ("ours", "peer")}
    assert ms["ours"] == timed["ours"][2]["ms"] and ms["peer"] == timed["peer"][0]["ms"]  # the 40 / 100 ms steps
    assert all(s["peak"] == s["start"] == 0 for s in warm["ours"] + timed["ours"])  # no memory on the CPU
    line = sidebyside.result_line("y", ms["ours"], ms["peer"], ms=".2f", ratios=".2f", load=True,
                                  mem_ratio=float("nan"), cpu_ratio=1.0)
    assert re.fullmatch(r"RESULT name=y ours_ms=\d+\.\d\d peer_ms=\d+\.\d\d ratio=\d\.\d\d mem_ratio=nan "
                        r"cpu_ratio=1\.00 load=\d+\.\d", line), line

    with pytest.raises(RuntimeError, match="peer: non-finite loss nan"):
        sidebyside.in_process({"ours": lambda: 1.0, "peer": lambda: float("nan")}, torch.device("cpu"), False, 1, 1)
