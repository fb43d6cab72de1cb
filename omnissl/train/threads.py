"""torch's CPU threads fitted to the cores other processes leave free, at the start of a command.

torch starts one intra-op thread per core, and each parallel region waits for its slowest thread. When another
process holds a core, the thread that shares it runs half the time and every step waits for it: on the 2-core VM,
next to one busy single-thread process, a step of the recipes' tiny speech encoder took 0.25 s with torch's 2
threads and 0.14 s with 1 (bench/oversubscription.py, README "Benchmarks"); `make demo` beside a one-thread
learning run was ~20x slower than alone. So every `omnissl` command but `data` counts the processes running right
now and, when they hold cores, lowers torch's threads to the free cores (at least 1), saying so in one line.

Never when the user chose (OMP_NUM_THREADS set); never above the count torch had (a count set lower in this process
stays). Linux only (the running-task count of /proc/loadavg); elsewhere nothing changes.
"""

from __future__ import annotations

import os
import sys
import time

import torch


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> int | None:
    """Tasks running now besides this one: /proc/loadavg's running count (which counts the reader) less one, the
    least of `samples` readings `interval_s` apart (a process that only blinked is not counted). None where there
    is no /proc/loadavg."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return min(counts)


# (torch's count before this module lowered it, the count it set), while a lowered count of ours is in force
_LOWERED: tuple[int, int] | None = None


def fit_threads_to_free_cores(command: str) -> int | None:
    """Sets torch's intra-op threads to the cores not busy with other processes, never above the count it found
    (a script that calls commands one after another gets its count back once the other processes are gone);
    returns the new count, or None when nothing changed. Prints one line to stderr when it acts."""
    global _LOWERED
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    have = torch.get_num_threads()
    if _LOWERED and have != _LOWERED[1]:  # changed since by someone else: theirs now
        _LOWERED = None
    ceiling = _LOWERED[0] if _LOWERED else have
    busy, n = busy_cores(), cores()
    if busy is None:
        return None
    want = max(1, min(ceiling, n - busy))
    if want == have:
        return None
    torch.set_num_threads(want)
    _LOWERED = (ceiling, want) if want < ceiling else None
    change = (f"not {have} (threads waiting on a shared core make a step ~2x slower; set OMP_NUM_THREADS to choose)"
              if want < have else "again")
    print(f"omnissl {command}: {busy} other process(es) running on the {n} cores: torch uses {want} thread(s), "
          f"{change}", file=sys.stderr)
    return want
