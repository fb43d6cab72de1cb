"""torch's threads fitted to the free cores (omnissl/train/threads.py), with real competing processes: busy
Python loops hold the cores while a fresh interpreter (its own torch, its own environment) makes the decision."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnissl.train.threads import busy_cores, cores

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/loadavg").exists() or cores() < 2,
                                reason="needs Linux's /proc/loadavg and at least 2 cores")

DECIDE = """
import sys, torch
from omnissl.train.threads import fit_threads_to_free_cores
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
before = torch.get_num_threads()
print(before, fit_threads_to_free_cores("probe"), torch.get_num_threads())
"""


def decide(*argv: str, **env: str) -> tuple[list[str], str]:
    full = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)} | env
    out = subprocess.run([sys.executable, "-c", DECIDE, *argv], env=full, capture_output=True, text=True, check=True)
    return out.stdout.split(), out.stderr


@pytest.fixture
def every_core_busy():
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores())]
    try:
        deadline = time.monotonic() + 10
        while (busy_cores() or 0) < cores() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert busy_cores() >= cores(), f"the {cores()} busy loops never showed in /proc/loadavg"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_busy_cores_leave_one_thread_and_say_so(every_core_busy):
    (before, chosen, after), err = decide()
    assert int(before) > 1, before  # torch's default: one thread per core
    assert (chosen, after) == ("1", "1")
    assert "omnissl probe:" in err and "torch uses 1 thread(s)" in err and "OMP_NUM_THREADS" in err


def test_the_users_choice_is_kept(every_core_busy):
    (before, chosen, after), err = decide(OMP_NUM_THREADS=str(cores()))
    assert (before, chosen, after) == (str(cores()), "None", str(cores()))
    assert err == ""


def test_a_lower_count_set_in_the_process_is_never_raised(every_core_busy):
    (before, chosen, after), _ = decide("1")
    assert (before, chosen, after) == ("1", "None", "1")


def test_a_long_script_gets_its_threads_back_once_the_others_are_gone(monkeypatch):
    """A script that runs commands one after another (bench/learning_curve.py trains point after point in one
    process): a count lowered while others ran is raised back to torch's count when they are gone, and a count
    the script set itself in between is its ceiling from then on. The core and busy counts are given here (4 cores,
    so that the script's own choice differs from ours and from torch's); the tests above measure them."""
    import torch

    from omnissl.train import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_LOWERED", None)
    monkeypatch.setattr(threads, "cores", lambda: 4)
    busy = {"n": 3}
    monkeypatch.setattr(threads, "busy_cores", lambda: busy["n"])
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert threads.fit_threads_to_free_cores("fit") == 1 and torch.get_num_threads() == 1
        busy["n"] = 1
        assert threads.fit_threads_to_free_cores("fit") == 3
        busy["n"] = 0
        assert threads.fit_threads_to_free_cores("fit") == 4 and torch.get_num_threads() == 4
        assert threads.fit_threads_to_free_cores("fit") is None  # nothing to change
        busy["n"] = 3
        assert threads.fit_threads_to_free_cores("fit") == 1
        torch.set_num_threads(2)  # the script's own choice, made after ours
        busy["n"] = 0
        assert threads.fit_threads_to_free_cores("fit") is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(start)
