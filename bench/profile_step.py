"""Where one training step spends its time: torch.profiler over one step (after warm-up) of the text trunk
at RoBERTa-base dims (`bench/trunk_vs_hf.py`'s models and inputs) and of the wav2vec 2.0 step at BASE dims
(`bench/wav2vec2_vs_hf.py`'s), MAE at ViT-B/16 (`bench/mae_vs_hf.py`'s) and the MLM step
(`bench/mlm_vs_hf.py`'s), CPU fp32.

Prints per step: the top operators by self CPU time; forward / backward / optimizer totals (the steps are
labelled with `record_function`); time in layout copies (aten::copy_, clone, contiguous, and the reshape /
permute / transpose calls that materialize: their self time is ~0, the copy they trigger is counted in
copy_) and in allocation / zeroing (aten::empty*, zero_, fill_, zeros*, new_zeros). `--peer` profiles the
Hugging Face models of the same benches too, so the two columns can be compared op by op. Self times on a
shared machine are inflated by other jobs about as much as wall times, but the op mix and the counts are not.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        OMP_NUM_THREADS=2 python bench/profile_step.py [--which trunk,wav2vec2] [--peer] [--markdown] [--top 12]

Each (model, side) runs in a fresh subprocess so one's allocator state does not leak into the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from argparse import Namespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_unsafe_view")
ALLOC_OPS = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zero_", "aten::fill_", "aten::zeros",
             "aten::zeros_like", "aten::new_zeros", "aten::new_empty", "aten::new_empty_strided", "aten::resize_")
PHASES = ("forward", "backward", "optimizer")
W2V = Namespace(dim=768, layers=12, heads=12, ffn=3072, conv=512, batch=4, seconds=5.0)


def trunk_step(side: str, batch: int, seq: int):
    """One fwd+bwd step of bench/trunk_vs_hf.py's model (same inputs), labelled by phase."""
    import torch
    from torch.profiler import record_function

    import trunk_vs_hf as bench

    ids = torch.randint(3, bench.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    model, forward = (bench.build_ours if side == "ours" else bench.build_peer)()

    def step() -> None:
        with record_function("forward"):
            loss = forward(ids).pow(2).mean()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):  # no optimizer in this bench: only zero_grad
            model.zero_grad(set_to_none=True)

    return step


def wav2vec2_step(side: str):
    import wav2vec2_vs_hf as bench

    return (bench.build_ours if side == "ours" else bench.build_peer)(W2V)


def mae_step(side: str, batch: int):
    """One fwd+bwd step of bench/mae_vs_hf.py's models (ViT-B/16, mask 0.75, decoder 512 x 8), same images."""
    import torch
    from torch.profiler import record_function

    import mae_vs_hf as bench

    images = torch.randn(batch, 3, bench.BASE["image"], bench.BASE["image"], generator=torch.Generator().manual_seed(0))
    model, loss_of = (bench.build_ours if side == "ours" else bench.build_peer)(bench.BASE)

    def step() -> None:
        with record_function("forward"):
            loss = loss_of(images)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):  # no optimizer in this bench: only zero_grad
            model.zero_grad(set_to_none=True)

    return step


def mlm_step(side: str, batch: int):
    """One training step (fwd, bwd, AdamW) of bench/mlm_vs_hf.py's models and padded batch (RoBERTa-base dims,
    vocabulary 32 768, 128 tokens, row lengths drawn from [64, 128]), labelled by phase."""
    from torch.profiler import record_function

    import mlm_vs_hf as bench

    a = Namespace(dim=768, layers=12, heads=12, ffn=3072, vocab=32768, batch=batch, seq=128, lengths="uniform",
                  pack_len=0)
    data = bench.side_inputs(a, side, bench.make_inputs(a), "cpu")
    _, model_step, prepare = bench.build_side(a, side, data, "cpu")

    def step() -> None:
        if prepare is not None:  # HF's collator masking: a DataLoader's work, not the step's
            prepare()
        with record_function("forward"):  # the whole step: mlm_vs_hf's step functions are not split by phase
            model_step()

    return step


def profile(which: str, side: str, warmup: int, threads: int, bf16: bool = False) -> dict:
    """Profile one step in this process (bf16: under bf16 autocast, as the benches' --bf16) -> the summary."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if which == "trunk":
        step = trunk_step(side, 8, 128)
    elif which == "trunk512":
        step = trunk_step(side, 2, 512)
    elif which == "mae":
        step = mae_step(side, 8)
    elif which == "mlm":
        step = mlm_step(side, 8)
    else:
        step = wav2vec2_step(side)
    if bf16:
        plain = step

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain()
    for _ in range(warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        c0, t0 = time.process_time(), time.perf_counter()  # inside: the profiler's start / stop is not the step's
        step()
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    events = prof.key_averages()
    ops = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "total_ms": e.cpu_time_total / 1e3,
            "count": e.count} for e in events]
    phases = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in PHASES}
    return {"which": which, "side": side, "wall_ms": wall, "cpu_ms": cpu, "ops": ops, "phases": phases}


def summarize(r: dict, top: int) -> dict:
    ops = [o for o in r["ops"] if o["name"] not in PHASES and not o["name"].startswith("autograd::engine")]
    ops.sort(key=lambda o: -o["self_ms"])
    self_total = sum(o["self_ms"] for o in ops)
    copy = sum(o["self_ms"] for o in ops if o["name"] in COPY_OPS)
    copy_n = sum(o["count"] for o in ops if o["name"] in ("aten::copy_",))
    alloc = sum(o["self_ms"] for o in ops if o["name"] in ALLOC_OPS)
    alloc_n = sum(o["count"] for o in ops if o["name"] in ALLOC_OPS)
    return {"top": ops[:top], "self_total": self_total, "copy": copy, "copy_n": copy_n, "alloc": alloc,
            "alloc_n": alloc_n, **{p: r["phases"].get(p, 0.0) for p in PHASES}, "wall": r["wall_ms"],
            "cpu": r["cpu_ms"]}


def print_table(which: str, runs: dict[str, dict], top: int, markdown: bool, bf16: bool = False) -> None:
    sums = {side: summarize(r, top) for side, r in runs.items()}
    sides = list(runs)
    title = {"trunk": "trunk fwd+bwd, RoBERTa-base dims, 8 x 128 (bench/trunk_vs_hf.py)",
             "trunk512": "trunk fwd+bwd, RoBERTa-base dims, 2 x 512 (bench/trunk_vs_hf.py)",
             "wav2vec2": "wav2vec 2.0 training step, BASE dims, 4 x 5 s (bench/wav2vec2_vs_hf.py)",
             "mlm": "MLM training step (fwd+bwd+AdamW as one 'forward' label), RoBERTa-base dims, 8 x 128 padded "
                    "(bench/mlm_vs_hf.py)",
             "mae": "MAE step fwd+bwd, ViT-B/16, mask 0.75, decoder 512 x 8, 8 x 224 px (bench/mae_vs_hf.py)"}[which]
    title += ", bf16 autocast" if bf16 else ", fp32"
    if markdown:
        print(f"\n**{title}**, one step after warm-up, load average {os.getloadavg()[0]:.1f}\n")
        print("| " + " | ".join(f"{s}: op | self ms (calls)" for s in sides) + " |")
        print("|" + "---|---:|" * len(sides))
        for i in range(top):
            cells = []
            for s in sides:
                t = sums[s]["top"]
                cells.append(f"{t[i]['name']} | {t[i]['self_ms']:.0f} ({t[i]['count']})" if i < len(t) else " | ")
            print("| " + " | ".join(cells) + " |")
        rows = [("**forward** (total)", "forward", None), ("**backward** (total)", "backward", None),
                ("**optimizer / zero_grad** (total)", "optimizer", None),
                ("**copies** (copy_/clone/contiguous, self; copy_ calls)", "copy", "copy_n"),
                ("**alloc / zeroing** (empty*/zero_/fill_/zeros*, self; calls)", "alloc", "alloc_n"),
                ("**step wall** (profiled)", "wall", None),
                ("**step CPU time** (process; steadier than wall under load)", "cpu", None)]
        for label, key, n in rows:
            cells = [f"{label} | {sums[s][key]:.0f}" + (f" ({sums[s][n]})" if n else "") for s in sides]
            print("| " + " | ".join(cells) + " |")
        return
    print(f"\n== {title}; load average {os.getloadavg()[0]:.1f}")
    for s in sides:
        m = sums[s]
        print(f"-- {s}: wall {m['wall']:.0f} ms, CPU {m['cpu']:.0f} ms; forward {m['forward']:.0f}, "
              f"backward {m['backward']:.0f}, optimizer {m['optimizer']:.0f} ms; self total {m['self_total']:.0f} ms; copies {m['copy']:.0f} ms "
              f"({m['copy_n']} copy_ calls); alloc/zeroing {m['alloc']:.0f} ms ({m['alloc_n']} calls)")
        print(f"   {'op':<48} {'self ms':>9} {'total ms':>9} {'calls':>6}")
        for o in m["top"]:
            print(f"   {o['name']:<48} {o['self_ms']:9.1f} {o['total_ms']:9.1f} {o['count']:6d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="trunk,wav2vec2",
                   help="comma-separated: trunk (8x128), trunk512, wav2vec2, mae (8 x 224 px), mlm (8 x 128)")
    p.add_argument("--peer", action="store_true", help="profile the Hugging Face peer of each bench too")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="each step under bf16 autocast (fp32 weights)")
    p.add_argument("--json", help="also write the raw per-op numbers here")
    p.add_argument("--worker", nargs=2, metavar=("WHICH", "SIDE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(profile(a.worker[0], a.worker[1], a.warmup, a.threads, a.bf16)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.markdown:
        print(f"{a.threads} threads, warm-up {a.warmup}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    raw = {}
    for which in a.which.split(","):
        runs = {}
        for side in ("ours", "peer") if a.peer else ("ours",):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, side, "--warmup", str(a.warmup),
                   "--threads", str(a.threads)] + (["--bf16"] if a.bf16 else [])
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            runs[side] = json.loads(out.strip().splitlines()[-1])
        raw[which] = runs
        print_table(which, runs, a.top, a.markdown, a.bf16)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
