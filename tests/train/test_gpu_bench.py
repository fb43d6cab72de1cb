"""bench/gpu.py (the GPU check, issue 15) on this GPU-less machine: its --cpu-smoke mode runs the same code path
at tiny sizes, and its FLOPs accounting (PaLM's formula plus the conv frontend) against hand counts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_accounting_matches_hand_counts():
    gpu = load_bench()
    # wav2vec 2.0's extractor on 1 s: 3199, 1599, 799, 399, 199, 99, 49 frames; layer 1 (1 -> C, kernel 10) counts
    # forward + weight gradient, the others forward + both gradients
    flops, frames = gpu.conv_flops(512, 16000)
    per = [(10, 1, 3199, 2), (3, 512, 1599, 3), (3, 512, 799, 3), (3, 512, 399, 3), (3, 512, 199, 3), (2, 512, 99, 3),
           (2, 512, 49, 3)]
    assert frames == 49
    assert flops == sum(m * 2 * c_in * 512 * k * t for k, c_in, t, m in per)
    # PaLM (Chowdhery et al. 2022, app. B): 6N per token + 12 L H Q T per token (H Q = D)
    assert gpu.trunk_flops(1000, 2, 8, [3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)
    assert math.isnan(gpu.peak_flops(torch.device("cpu"), None))  # no peak for a CPU unless given
    assert gpu.peak_flops(torch.device("cpu"), 100.0) == 1e14


@pytest.mark.slow
def test_cpu_smoke_runs_every_objective_and_the_three_comparisons(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--no-compile", "--peak-tflops", "1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["mode"] == "cpu-smoke"
    assert set(result["smoke"]) == {"wav2vec2", "hubert", "data2vec", "data2vec2", "mae", "mlm"}
    for name, r in result["smoke"].items():
        assert r["ok"] and r["param"] == "DTensor" and len(r["losses"]) == 3, (name, r)
    assert set(result["throughput"]) == {"wav2vec2_base", "mae_vitb16", "mlm_base"}
    for name, row in result["throughput"].items():
        ours, peer = row["ours"], row["peer"]
        assert ours["flops_per_step"] == peer["flops_per_step"] > 0  # one FLOPs count for both sides
        for side in (ours, peer):
            assert side["samples_per_s"] > 0 and math.isfinite(side["loss"])
            assert side["mfu"] == pytest.approx(side["flops_per_step"] / side["step_s"] / 1e12)
        assert row["ratio"] == pytest.approx(ours["samples_per_s"] / peer["samples_per_s"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT name=gpu_")]
    assert len(lines) == 6 + 3
