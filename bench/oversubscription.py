"""CPU thread oversubscription: the step time of the recipes' tiny speech encoder (4 x 128, log-mel, batch 8 x 4 s,
forward + backward) on an idle machine and next to busy processes, with torch's default threads (one per core),
with libgomp's spin-wait shortened (GOMP_SPINCOUNT=10000) and with one thread.

Why omnissl fits torch's threads to the free cores (omnissl/train/threads.py): each parallel region waits for
its slowest thread, and a thread sharing its core with another process runs half the time. Between regions an
idle libgomp thread also spins (300,000 iterations by default) before it sleeps, taking time slices a working
thread needs: a shorter spin helps only when every core is busy, fewer threads help in both busy cases.

Each setting runs in its own process (libgomp reads its environment when torch loads it; OMP_NUM_THREADS set, so
omnissl's own fitting stays out); the rounds interleave the settings; figures are medians of rounds. "busy1"
starts one single-thread competitor (matrix products in a loop: a learning run beside `make demo`), "busyN" one
per core. Run on an otherwise idle machine:

    python bench/oversubscription.py [--rounds 5] [--steps 8]

Ends with one line per load:
    RESULT name=oversubscription load=idle|busy1|busyN default_s=... spin10k_s=... threads1_s=... default_over_...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# GOMP_SPINCOUNT (300,000: libgomp's own default) and OMP_NUM_THREADS per setting
SETTINGS = {"default": ("300000", str(os.cpu_count() or 1)), "spin10k": ("10000", str(os.cpu_count() or 1)),
            "threads1": ("300000", "1")}

STEP = r"""
import json, sys, time
import torch
from omnissl.backbones.builders import tiny
torch.manual_seed(0)
enc = tiny("audio", dim=128, depth=4, heads=4, audio_frontend="logmel")
wav = torch.randn(8, 64000)
def step():
    enc(wav).last.pow(2).mean().backward()
for _ in range(3):
    step()
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "step_s": sorted(times)[len(times) // 2]}))
"""

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a = (a @ a).tanh()\n"


def measure(setting: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    env["GOMP_SPINCOUNT"], env["OMP_NUM_THREADS"] = SETTINGS[setting]
    out = subprocess.run([sys.executable, "-c", STEP, str(steps)], env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (median taken)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    print(f"cores {cores}, load average at start {os.getloadavg()[0]:.2f}")
    results = {}
    for load, competitors in (("idle", 0), ("busy1", 1), (f"busy{cores}", cores)):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
        if procs:
            time.sleep(2)
        try:
            times = {s: [] for s in SETTINGS}
            for r in range(args.rounds):
                for s in SETTINGS:
                    res = measure(s, args.steps)
                    times[s].append(res["step_s"])
                print(f"{load} round {r}: " + "  ".join(f"{s} {times[s][-1]:.4f} s" for s in SETTINGS), flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        results[load] = {s: statistics.median(v) for s, v in times.items()}
    for load, med in results.items():
        print(f"RESULT name=oversubscription load={load} " + " ".join(f"{s}_s={v:.4f}" for s, v in med.items())
              + " " + " ".join(f"default_over_{s}={med['default'] / med[s]:.2f}" for s in med if s != "default"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
