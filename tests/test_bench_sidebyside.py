"""bench/sidebyside.py, the machinery of the side-by-side benches (bench/*_vs_hf.py): the order of the interleaved
rounds, real worker subprocesses stepped over their pipes (order, medians, min / max, CPU time, peak RSS, a third
side, untimed preparation), the worker loop's count of the bytes saved for backward and its bf16 autocast, the
table, the finite-loss check and the RESULT line; and bench/mlm_vs_hf.py and bench/clap_vs_hf.py run end to end
at tiny sizes, each side in its own worker, with a finite memory ratio from the workers' peak RSS."""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
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


def run_order(sbs, warmup: int, rounds: int, sides=("ours", "peer")) -> list[tuple[str, bool]]:
    seen = []

    def step(name, is_warmup):
        seen.append((name, is_warmup))
        return {"ms": len(seen)}

    warm, timed = sbs.interleave(step, warmup, rounds, sides=sides)
    assert [len(v) for v in warm.values()] == [warmup] * len(sides)
    assert [len(v) for v in timed.values()] == [rounds] * len(sides)
    return seen


def test_interleave_alternates_the_timed_rounds(sidebyside):
    o, p, k = "ours", "peer", "packed"
    # each warm-up round ours first, the timed rounds alternate from round 0
    assert run_order(sidebyside, 2, 3) == [(o, True), (p, True), (o, True), (p, True),
                                          (o, False), (p, False), (p, False), (o, False), (o, False), (p, False)]
    # three sides: odd rounds reversed
    assert run_order(sidebyside, 1, 2, (o, p, k)) == [(o, True), (p, True), (k, True), (o, False), (p, False),
                                                      (k, False), (k, False), (p, False), (o, False)]


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
        assert r["hwm"] > r["delta"] >= 0 and r["params"] is None and r["saved"] == 0 and r["memory"] == "rss"
        assert r["prep"] < 5 and r["all_losses"] == [r["loss"], *r["losses"]]  # no preparation here
    # the sleeps 60 ms (ours' round 2) and 150 ms (the peer's round 0) are the medians
    assert res["ours"]["median"] == rounds[2]["ours"]["ms"] and res["peer"]["median"] == rounds[0]["peer"]["ms"]
    line = sidebyside.result_line("x", res["ours"]["median"], res["peer"]["median"], mem_ratio=0.5)
    assert line == (f"RESULT name=x ours_ms={res['ours']['median']:.0f} peer_ms={res['peer']['median']:.0f} "
                    f"ratio={res['peer']['median'] / res['ours']['median']:.3f} mem_ratio=0.500")
    assert 2.0 < float(line.split("ratio=")[1].split()[0]) < 2.6  # ~150 / 60


PREP_WORKER = """
import sys, time
sys.path.insert(0, {bench!r})
from sidebyside import serve

name, log = sys.argv[1], sys.argv[2]


def prepare():  # slow, untimed
    time.sleep(0.5)


def step():
    time.sleep(0.01)
    with open(log, "a") as f:
        f.write(name + "\\n")
    return float("nan") if name == "packed" else 1.0


serve(lambda: (None, step, prepare))
"""


def test_three_worker_sides_with_untimed_preparation(sidebyside, tmp_path):
    """A third side runs in its own worker in the interleaved order; each step's prepare() is timed apart ("prep")
    and not in its step time; a non-finite loss of any side stops the bench, naming the side."""
    script, log = tmp_path / "worker.py", tmp_path / "steps.log"
    script.write_text(PREP_WORKER.format(bench=str(BENCH)))
    sides = ("ours", "peer", "packed")
    res = sidebyside.run_workers(lambda name: [str(script), name, str(log)], 1, 2, sides=sides)
    assert log.read_text().split() == ["ours", "peer", "packed", "ours", "peer", "packed", "packed", "peer", "ours"]
    for name in sides:
        assert res[name]["prep"] >= 500 > res[name]["max"] >= 10
    with pytest.raises(SystemExit, match=r"non-finite losses.*'packed': \[nan, nan, nan\]"):
        sidebyside.check_finite(res)
    sidebyside.check_finite({k: res[k] for k in ("ours", "peer")})


def test_worker_loop_counts_what_autograd_saves(sidebyside, monkeypatch, capsys):
    """serve() on a tiny torch model: a "warmup" step records the bytes saved for backward (Linear's input and
    pow's input, 8 x 64 fp32 each; Linear's weight, a parameter, is excluded), a plain "step" does not; with
    bf16=True the step runs under bf16 autocast."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(64, 64), torch.randn(8, 64, requires_grad=True)  # x's gradient needs the weight

    def step():
        loss = model(x).pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def run(commands: str, bf16: bool = False) -> list[dict]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(commands))
        sidebyside.serve(lambda: (model, step), bf16=bf16)
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    ready, warm, timed, end = run("warmup\nstep\nquit\n")
    fp32 = float(model(x).pow(2).mean().detach())
    assert ready["ready"] and end["base"] == ready["base"] and end["hwm"] >= end["base"] and end["memory"] == "rss"
    assert warm["loss"] == timed["loss"] == pytest.approx(fp32)
    assert end["params"] == 64 * 64 + 64 and end["saved"] == 2 * 8 * 64 * 4
    assert run("step\nquit\n")[-1]["saved"] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = float(model(x).pow(2).mean().detach())
    assert bf16 != fp32 and run("step\nquit\n", bf16=True)[1]["loss"] == bf16


def test_memory_table_rows(sidebyside, capsys):
    side = {"median": 60.4, "min": 40.0, "max": 90.0, "hwm": 500.0, "delta": 10.0, "saved": 1.0, "params": 2e6,
            "loss": 1.25}
    sidebyside.memory_table({"8 x 64": {"ours": side, "peer": {**side, "median": 151.0, "delta": 20.0}}}, "batch x seq",
                            loss=True)
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.startswith("| batch x seq | ours ms (median) |") and header.endswith("| loss ours / peer |")
    assert header.count("|") == rule.count("|") == row.count("|") == 11
    assert row == ("| 8 x 64 | 60 (40-90) | 151 (40-90) | 2.500 | 500 (10) | 500 (20) | 0.500 | 1.0 / 1.0 "
                   "| 2.00M / 2.00M | 1.250 / 1.250 |")
    totals = sidebyside.totals({1: {"ours": side, "peer": side}, 2: {"ours": side, "peer": side}}, "delta")
    assert totals == {"ours": 20.0, "peer": 20.0}


def bench_env() -> dict[str, str]:
    """The README's GLIBC_TUNABLES, one thread, offline, this checkout first on the path."""
    tunables = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
    return {**os.environ, "GLIBC_TUNABLES": tunables, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}


def run_bench(script: str, *args: str, device: bool = True) -> str:
    """Run bench/<script> (its workers inherit the environment) -> stdout; device: pass --device cpu."""
    out = subprocess.run([sys.executable, str(BENCH / script), *args, *(["--device", "cpu"] if device else []),
                          "--threads", "1", "--warmup", "1", "--rounds", "1"], env=bench_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def result(stdout: str, name: str) -> dict[str, str]:
    line = next(line for line in stdout.splitlines() if line.startswith(f"RESULT name={name} "))
    return dict(field.split("=", 1) for field in line.split()[1:])


def table_rows(stdout: str) -> list[list[str]]:
    """The memory table's data rows, split into cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ours' layout") and not line.startswith("| step ")]


def check_sides(row: list[str], loss: float) -> None:
    """A memory-table row: both sides have a positive peak above baseline and saved tensors, matched parameter
    counts (within 10 %), and warm-up losses near `loss` (the objective's value at init)."""
    peaks = [float(re.fullmatch(r"\d+ \((\d+)\)", row[i]).group(1)) for i in (4, 5)]
    saved = [float(v) for v in row[7].split(" / ")]
    params = [float(v.rstrip("M")) for v in row[8].split(" / ")]
    losses = [float(v) for v in row[9].split(" / ")]
    assert min(peaks) > 0 and min(saved) > 0, row
    assert abs(params[0] / params[1] - 1) < 0.1, row
    assert all(abs(v - loss) < 0.15 * loss for v in losses), row


def test_mlm_bench_workers_end_to_end():
    """bench/mlm_vs_hf.py at tiny sizes: ours, the peer and the packed variant each in its own worker; memory
    measured on the CPU (finite mem_ratio > 0 from the workers' VmHWM), the RESULT lines parse."""
    out = run_bench("mlm_vs_hf.py", "--dim", "64", "--layers", "1", "--heads", "2", "--ffn", "256", "--vocab", "1024",
                    "--batch", "8", "--seq", "64")  # each side saves >= 1 MiB for backward (the table's unit)
    r = result(out, "mlm_vs_hf")
    ours, peer, mem, cpu = (float(r[k]) for k in ("ours_ms", "peer_ms", "mem_ratio", "cpu_ratio"))
    assert ours > 0 and peer > 0 and float(r["ratio"]) == pytest.approx(peer / ours, rel=2e-3)  # from the rounded ms
    assert math.isfinite(mem) and mem > 0 and math.isfinite(cpu) and cpu > 0 and float(r["load"]) >= 0
    k = result(out, "mlm_packed")
    assert float(k["padded_ms"]) == ours and float(k["peer_ms"]) == peer and k["lengths"] == "uniform"
    assert math.isfinite(float(k["mem_ratio"])) and float(k["mem_ratio"]) > 0 and float(k["mem_gain"]) > 0
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["padded", "packed"]
    for row in rows:
        check_sides(row, math.log(1024))  # masked-token cross-entropy at init: ~ln(vocab)
    assert float(rows[0][6]) == mem and float(rows[1][6]) == float(k["mem_ratio"])  # the table's ours/peer mem
    assert re.search(r"Peer: \+ \d+\.\d ms of CPU masking per step .* not counted", out)


def test_clap_bench_workers_end_to_end():
    """bench/clap_vs_hf.py at tiny sizes (1 s of audio, 1-layer towers): ours and the peer each in its own
    worker, memory measured on the CPU, the RESULT line parses."""
    out = run_bench("clap_vs_hf.py", "--dim", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "256",
                    "--tokens", "20", "--batch", "4", "--seconds", "1", "--audio-dim", "32", "--audio-layers", "1",
                    "--audio-heads", "2", "--hf-width", "16", "--hf-depths", "1", "1", "1", "1", "--hf-heads", "1",
                    "2", "4", "8")
    r = result(out, "clap_vs_hf")
    ours, peer, mem = (float(r[k]) for k in ("ours_ms", "peer_ms", "mem_ratio"))
    assert ours > 0 and peer > 0 and float(r["ratio"]) == pytest.approx(peer / ours, rel=2e-3)  # from the rounded ms
    assert math.isfinite(mem) and mem > 0 and float(r["cpu_ratio"]) > 0
    (row,) = table_rows(out)
    # symmetric InfoNCE over 4 pairs at init: ~ln 4 (random towers, logit scale 1/0.07)
    assert row[0] == "batch 4" and float(row[6]) == mem
    peaks = [float(re.fullmatch(r"\d+ \((\d+)\)", row[i]).group(1)) for i in (4, 5)]
    assert min(peaks) > 0 and min(float(v) for v in row[7].split(" / ")) > 0, row
    assert all(abs(float(v) - math.log(4)) < 0.5 for v in row[9].split(" / ")), row


def test_mae_bench_bf16_end_to_end():
    """bench/mae_vs_hf.py --small --bf16: both sides' steps under bf16 autocast in their workers (our attention
    then takes its explicit CPU core), finite losses, the RESULT line is the bf16 one."""
    out = run_bench("mae_vs_hf.py", "--small", "--bf16", "--batches", "2", device=False)
    assert "CPU bf16 autocast" in out
    r = result(out, "mae_vs_hf_bf16")
    assert float(r["ours_ms"]) > 0 and float(r["peer_ms"]) > 0 and float(r["mem_ratio"]) > 0


def test_cpu_kernels_bench_runs():
    """bench/cpu_kernels.py (the dropout and attention-core choices) prints every ratio it decides on."""
    out = subprocess.run([sys.executable, str(BENCH / "cpu_kernels.py"), "--threads", "1", "--rounds", "1"],
                         check=True, capture_output=True, text=True, env=bench_env()).stdout
    r = result(out, "cpu_kernels")
    r.pop("name")
    assert set(r) == {"dropout_fp32", "dropout_bf16", "attention_fp32", "attention_bf16"}
    assert all(float(v) > 0 for v in r.values())
