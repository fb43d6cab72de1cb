"""What the side-by-side benches (bench/*_vs_hf.py: ours vs a Hugging Face peer) share: the interleaved rounds,
the worker subprocesses that run the sides, and the summary lines. Each bench keeps how it builds its sides and
their step, its table and its docstring (what it measures).

Rounds (`interleave`): warm-up steps, then `rounds` rounds of one step per side, alternating which side goes
first (ours first in round 0) so that load drift on a shared machine hits both; medians are reported.

Each side runs in its own fresh worker process (`Side` here, `serve` in the worker), driven step by step over a
pipe, so that its peak memory is its own: each warm-up round runs the sides in order, the timed rounds
alternate from round 0. The worker reads its memory before building the model (the baseline; the bench imports
its libraries and makes its inputs first) and reports the peak at the end: on the CPU the resident set (VmRSS,
then the high-water mark VmHWM from /proc/self/status; under the GLIBC_TUNABLES the README prescribes glibc
returns no freed memory, so VmHWM - baseline is the largest the model, optimizer state and step's temporaries
got), on CUDA torch.cuda.memory_allocated, then torch.cuda.max_memory_allocated (parameters, optimizer state,
gradients, activations: the allocator's own count, cache excluded). A "warmup" step also records the bytes
autograd saves for backward (each storage once, parameters excluded), an allocator-independent cross-check.
Optionally each step runs under bf16 autocast and, on CUDA, is synchronized before and after; an optional
`prepare` runs before each step untimed (the share of a DataLoader worker, e.g. HF's collator masking), its wall
time reported apart.

Run from a checkout: the benches import it as `sidebyside` (their own folder is on sys.path).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable

SIDES = ("ours", "peer")


def interleave(step: Callable[[str, bool], dict], warmup: int, rounds: int, *,
               after_round: Callable[[int, dict], None] | None = None,
               sides: tuple[str, ...] = SIDES) -> tuple[dict, dict]:
    """Run `warmup` warm-up rounds, then `rounds` timed rounds of `step(side, is_warmup) -> dict`, each round one
    step per side. sides: the side names in round-0 order. Each warm-up round runs them in that order; timed round
    r in that order when r is even, reversed when odd. after_round(r, {side: its step's dict}) follows each timed
    round. Returns ({side: warm-up dicts}, {side: timed dicts})."""
    warm: dict[str, list[dict]] = {name: [] for name in sides}
    timed: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(warmup + rounds):
        is_warmup = r < warmup
        k = max(r - warmup, 0)
        last = {name: step(name, is_warmup) for name in (sides if k % 2 == 0 else sides[::-1])}
        for name, out in last.items():
            (warm if is_warmup else timed)[name].append(out)
        if not is_warmup and after_round is not None:
            after_round(r - warmup, last)
    return warm, timed


def result_line(name: str, ours_ms: float, peer_ms: float, *, ms: str = ".0f", ratios: str = ".3f",
                load: bool = False, **more: float) -> str:
    """`RESULT name=... ours_ms=... peer_ms=... ratio=<peer/ours>`, then `more` (mem_ratio=..., cpu_ratio=...) in
    the given order, all ratios in the format `ratios`; load: the 1-min load average last."""
    fields = {"ours_ms": f"{ours_ms:{ms}}", "peer_ms": f"{peer_ms:{ms}}", "ratio": f"{peer_ms / ours_ms:{ratios}}"}
    fields.update({k: f"{v:{ratios}}" for k, v in more.items()})
    if load:
        fields["load"] = f"{os.getloadavg()[0]:.1f}"
    return f"RESULT name={name} " + " ".join(f"{k}={v}" for k, v in fields.items())


def add_worker_args(p, warmup: int = 1, rounds: int = 5, threads: int = 2, sides: tuple[str, ...] = SIDES) -> None:
    """The flags the worker-subprocess benches share: --warmup, --rounds, --threads (0: torch's default, i.e.
    OMP_NUM_THREADS), --bf16 (each side's step under bf16 autocast, `serve(bf16=)`) and the internal --worker (one
    of `sides`)."""
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=threads, help="torch threads per worker (0: torch's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on every side's step (fp32 weights: bf16-mixed)")
    p.add_argument("--worker", choices=sides)


def optimizer_step(loss_of: Callable, opt) -> Callable[[], float]:
    """A training step: loss_of() -> loss, backward, opt.step(), opt.zero_grad(set_to_none=True); -> the loss."""
    def step() -> float:
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# --- each side in its own worker subprocess -----------------------------------------------------------------------

def status(key: str) -> int:
    """VmHWM / VmRSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def device_memory(device) -> tuple[Callable[[], int], Callable[[], int]]:
    """(now, peak) in bytes for the memory a step on `device` uses: on the CPU this process's VmRSS and VmHWM, on
    CUDA torch.cuda.memory_allocated and max_memory_allocated (the latter reset when this is called)."""
    if device is None or getattr(device, "type", device) == "cpu":
        return (lambda: status("VmRSS")), (lambda: status("VmHWM"))
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return (lambda: torch.cuda.memory_allocated(device)), (lambda: torch.cuda.max_memory_allocated(device))


def serve(build: Callable[[], tuple], device=None, bf16: bool = False) -> None:
    """A worker's loop. Reads its memory (the baseline: `device_memory`), then `build() -> (model or None, step)`
    or `(model or None, step, prepare)`, where step() runs one whole step and returns its loss (a float or a 0-dim
    tensor) and prepare() (untimed) readies the next step's inputs; then answers one JSON line per command on
    stdin: "step" / "warmup" -> {ms, cpu, loss, prep} (wall and process CPU milliseconds of step(), wall ms of
    prepare(); a "warmup" step records the storages autograd saves for backward, parameters of `model` excluded;
    without a model it is a plain step), "quit" -> {hwm, base, memory, params, saved} and returns. device: a
    torch.device; on CUDA each step is synchronized before and after and the memory is CUDA's. bf16: each step
    under bf16 autocast on the device's type."""
    cuda = device is not None and getattr(device, "type", device) == "cuda"
    now, peak = device_memory(device)
    base = now()
    model, step, *rest = build()
    prepare = rest[0] if rest else None
    parameters = list(model.parameters()) if model is not None else []
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(t):  # what autograd keeps for backward (activations), each storage once, parameters excluded
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def recording():
        if model is None:
            return nullcontext()
        from torch.autograd.graph import saved_tensors_hooks

        return saved_tensors_hooks(pack, lambda t: t)

    def sync():
        if cuda:
            import torch

            torch.cuda.synchronize(device)

    def autocast():
        if not bf16:
            return nullcontext()
        import torch

        return torch.autocast(getattr(device, "type", device or "cpu"), dtype=torch.bfloat16)

    print(json.dumps({"ready": True, "base": base}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("step", "warmup"):
            if cmd == "warmup":
                saved.clear()
            t0 = time.perf_counter()
            if prepare is not None:
                prepare()
            sync()
            prep = (time.perf_counter() - t0) * 1e3
            t0, c0 = time.perf_counter(), time.process_time()
            with recording() if cmd == "warmup" else nullcontext(), autocast():
                loss = step()
            sync()
            ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
            print(json.dumps({"ms": ms, "cpu": cpu, "loss": float(loss), "prep": prep}), flush=True)
        elif cmd == "quit":
            params = sum(p.numel() for p in parameters) if model is not None else None
            print(json.dumps({"hwm": peak(), "base": base, "memory": "cuda" if cuda else "rss", "params": params,
                              "saved": sum(saved.values())}), flush=True)
            return


class Side:
    """A worker subprocess holding one model, stepped over a pipe; argv: the worker's command line after the
    Python interpreter (its script, then its flags)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.p = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (exit {self.p.wait()})")
        return json.loads(line)

    def send(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def quit(self) -> dict:
        out = self.send("quit")
        self.p.wait()
        return out


def run_workers(argv: Callable[[str], list[str]], warmup: int, rounds: int, *, warmup_cmd: str = "warmup",
                after_round: Callable[[int, dict], None] | None = None,
                sides: tuple[str, ...] = SIDES) -> dict[str, dict]:
    """Each side of `sides` in a fresh worker (`argv(side)`), `interleave`d: warm-up steps send `warmup_cmd`, timed
    ones "step". Per side: median / min / max wall ms, median CPU ms ("cpu"), median untimed preparation wall ms
    ("prep"), the timed losses, the last warm-up loss ("loss", nan without warm-up), every loss ("all_losses"),
    peak memory ("hwm") and peak minus the pre-model baseline ("delta") in MiB (which memory: "memory", "rss" or
    "cuda"), the parameter count, the MiB saved for backward in the last "warmup" step."""
    workers = {name: Side(name, argv(name)) for name in sides}
    warm, timed = interleave(lambda name, w: workers[name].send(warmup_cmd if w else "step"), warmup, rounds,
                             after_round=after_round, sides=sides)
    mem = {name: s.quit() for name, s in workers.items()}
    out = {}
    for name in sides:
        times, m = [s["ms"] for s in timed[name]], mem[name]
        out[name] = {
            "median": statistics.median(times), "min": min(times), "max": max(times),
            "cpu": statistics.median(s["cpu"] for s in timed[name]),
            "prep": statistics.median(s["prep"] for s in timed[name]), "losses": [s["loss"] for s in timed[name]],
            "loss": warm[name][-1]["loss"] if warm[name] else math.nan,
            "all_losses": [s["loss"] for s in warm[name] + timed[name]],
            "hwm": m["hwm"] / 2**20, "delta": (m["hwm"] - m["base"]) / 2**20, "memory": m["memory"],
            "params": m["params"], "saved": m["saved"] / 2**20,
        }
    return out


def check_finite(results: dict) -> None:
    """Exit naming the side(s) whose warm-up or timed losses (`run_workers`' all_losses) are not all finite: their
    timings would not be comparable."""
    bad = {name: r["all_losses"] for name, r in results.items() if not all(math.isfinite(x) for x in r["all_losses"])}
    if bad:
        raise SystemExit(f"non-finite losses, timings are not comparable: {bad}")


def round_line(label: str) -> Callable[[int, dict], None]:
    """after_round: `  <label> round r: ours X ms, peer Y ms`."""
    return lambda r, last: print(f"  {label} round {r}: ours {last['ours']['ms']:.0f} ms, peer "
                                 f"{last['peer']['ms']:.0f} ms", flush=True)


def step_legend(ours: dict, peer: dict, note: str = "") -> None:
    """The legend under a one-process-per-side bench's memory table (what its columns mean, `note`, the load
    average) and the sides' median process CPU time per step."""
    memory = "CUDA allocator (max_memory_allocated)" if ours["memory"] == "cuda" else "resident set (VmHWM)"
    print(f"\n(ms: median (min-max) per step; peak: the worker's {memory} peak, in parentheses minus the baseline "
          f"before its model was built (model, optimizer state, gradients, activations); saved for backward: tensors "
          f"autograd kept in the warm-up step, parameters excluded; loss: the last warm-up step's.) {note}"
          f"{'load' if note else 'Load'} average {os.getloadavg()[0]:.1f}.")
    print(f"CPU time (worker process, median; meaningful on the CPU device): ours {ours['cpu']:.1f} ms, peer "
          f"{peer['cpu']:.1f} ms, ratio {peer['cpu'] / ours['cpu']:.3f}")


def memory_table(results: dict, first: str, loss: bool = False) -> None:
    """The markdown table of `run_workers` results per config ({config label: {side: summary}}): wall ms median
    (min-max), speed ratio, peak RSS (minus baseline), memory ratio, saved for backward, parameters, and with
    `loss` the warm-up losses."""
    print(f"| {first} | ours ms (median) | peer ms (median) | peer/ours | ours peak MiB (step) | peer peak MiB (step) "
          "| ours/peer mem (step) | saved for backward MiB ours / peer | params ours / peer |"
          + (" loss ours / peer |" if loss else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if loss else ""))
    for label, r in results.items():
        o, q = r["ours"], r["peer"]
        print(f"| {label} | {o['median']:.0f} ({o['min']:.0f}-{o['max']:.0f}) | {q['median']:.0f} "
              f"({q['min']:.0f}-{q['max']:.0f}) | {q['median'] / o['median']:.3f} | {o['hwm']:.0f} ({o['delta']:.0f}) "
              f"| {q['hwm']:.0f} ({q['delta']:.0f}) | {o['delta'] / q['delta']:.3f} "
              f"| {o['saved']:.1f} / {q['saved']:.1f} | {o['params'] / 1e6:.2f}M / {q['params'] / 1e6:.2f}M |"
              + (f" {o['loss']:.3f} / {q['loss']:.3f} |" if loss else ""))


def totals(results: dict, key: str) -> dict[str, float]:
    """{side: sum over the configs of its summary's `key`}."""
    return {name: sum(r[name][key] for r in results.values()) for name in SIDES}


def device_line(device, threads: int) -> str:
    """`device D (name), threads N, load average L1 L5 L15` (threads: the workers' torch threads, 0: torch's
    default)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"device {device} ({name}), threads {threads or torch.get_num_threads()}, load average {load}"
