"""Our text trunk vs Hugging Face `RobertaModel`: one forward + backward step, CPU fp32, train mode.

ours: `omnissl.backbones.builders.text_base()` (token embedding + 512 learned positions, post-LN trunk
      768 wide, 12 layers, 12 heads, FFN 3072, dropout 0.1 / attention dropout 0.1 as RoBERTa base).
peer: `transformers.RobertaModel` with the same dims (vocab 50265, 514 positions, one token type, no pooler,
      layer_norm_eps 1e-5 as roberta-base ships), `attn_implementation="sdpa"`: the fastest attention HF
      offers on CPU ("eager" is matmul + softmax by hand; flash-attention 2 needs CUDA). With attention
      dropout in train mode, torch's CPU SDPA runs its math kernel on both sides.

One step = `embed + encode` (ours) / `model(input_ids)` (peer) on a full-length batch of random token ids (no
padding, so neither side builds an attention mask), loss = mean(last hidden state ** 2), backward, then
`zero_grad(set_to_none=True)`. No optimizer: this measures the trunk, not AdamW.

Timing: for each (batch, seq) config, both sides run in their own fresh worker subprocess, driven step by step
from this process: `--warmup` steps each, then `--rounds` rounds of one step each, alternating which side goes
first (ABBA) so load drift on a shared machine hits both; the median step time is reported.

Memory: torch's CPU allocator is plain malloc (no caching), which tracemalloc does not see, so we read the
kernel's high-water mark of the worker's resident set (VmHWM in /proc/self/status) after all its steps. Both
workers import the same libraries (torch, transformers, omnissl) and create their inputs before the model, so
their baseline RSS is the same; we report the peak (VmHWM) and the peak minus that baseline (= parameters +
gradients + activations + temporaries of the step + allocator fragmentation). Run with the GLIBC_TUNABLES
below: glibc then never returns freed memory to the kernel and serves big blocks from its heap instead of fresh
mmaps, so the high-water mark covers every transient peak and step times are not dominated by page faults.
As a cross-check that does not depend on the allocator, the table also lists the bytes autograd saves for
backward in the warm-up step (saved_tensors_hooks, each storage once, parameters excluded).

Aggregate (the RESULT line): ours_ms / peer_ms are the SUM over the configs of each side's median step time;
ratio = peer_ms / ours_ms (> 1: ours is faster); mem_ratio = sum over configs of ours' (peak - baseline) /
the same sum for the peer (< 1: ours uses less memory).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        .venv/bin/python bench/trunk_vs_hf.py [--configs 8x128,2x512] [--warmup 1 --rounds 5] [--threads 2]

Ends with: RESULT name=trunk_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

VOCAB, DIM, DEPTH, HEADS, FFN = 50265, 768, 12, 12, 3072


def _status(key: str) -> int:
    """VmHWM / VmRSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def build_ours():
    from omnissl.backbones.builders import text_base

    model = text_base(vocab_size=VOCAB).train()

    def forward(ids):
        return model.encode(model.embed(ids)).last

    return model, forward


def build_peer():
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")
    model = RobertaModel(cfg, add_pooling_layer=False).train()
    assert model.config._attn_implementation == "sdpa"

    def forward(ids):
        return model(input_ids=ids).last_hidden_state

    return model, forward


def worker(a) -> None:
    import torch
    import transformers  # noqa: F401  both workers import the same libraries: equal baselines

    import omnissl.backbones.builders  # noqa: F401

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    base = _status("VmRSS")
    model, forward = (build_ours if a.worker == "ours" else build_peer)()
    params = sum(p.numel() for p in model.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):  # what autograd keeps for backward (activations), each storage once, parameters excluded
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("step", "warmup"):
            if cmd == "warmup":
                saved.clear()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if cmd == "warmup" else nullcontext():
                loss = forward(ids).pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            ms = (time.perf_counter() - t0) * 1e3
            print(json.dumps({"ms": ms}), flush=True)
        elif cmd == "quit":
            print(json.dumps({"hwm": _status("VmHWM"), "base": base, "params": params,
                              "saved": sum(saved.values())}), flush=True)
            return


class Side:
    """A worker subprocess holding one model, stepped over a pipe."""

    def __init__(self, name: str, batch: int, seq: int, threads: int) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--batch", str(batch), "--seq", str(seq),
               "--threads", str(threads)]
        self.name = name
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

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


def run_config(batch: int, seq: int, a) -> dict:
    sides = {name: Side(name, batch, seq, a.threads) for name in ("ours", "peer")}
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(a.warmup):
        for s in sides.values():
            s.send("warmup")
    for r in range(a.rounds):
        for name in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            times[name].append(sides[name].send("step")["ms"])
        print(f"  {batch}x{seq} round {r}: ours {times['ours'][-1]:.0f} ms, peer {times['peer'][-1]:.0f} ms",
              flush=True)
    mem = {name: s.quit() for name, s in sides.items()}
    return {
        name: {
            "median": statistics.median(times[name]), "min": min(times[name]), "max": max(times[name]),
            "hwm": mem[name]["hwm"] / 2**20, "delta": (mem[name]["hwm"] - mem[name]["base"]) / 2**20,
            "params": mem[name]["params"], "saved": mem[name]["saved"] / 2**20,
        }
        for name in sides
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="8x128,2x512", help="comma-separated BATCHxSEQ")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=("ours", "peer"))
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    print(f"RoBERTa-base dims ({DIM}d x {DEPTH} layers x {HEADS} heads, FFN {FFN}, vocab {VOCAB}), train mode "
          f"(dropout 0.1), fwd+bwd, CPU fp32, {a.threads} threads, peer attn_implementation=sdpa; "
          f"warm-up {a.warmup}, {a.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    t0 = time.perf_counter()
    results = {(b, n): run_config(b, n, a) for b, n in configs}

    print()
    print("| batch x seq | ours ms (median) | peer ms (median) | peer/ours | ours peak MiB (step) "
          "| peer peak MiB (step) | ours/peer mem (step) | saved for backward MiB ours / peer | params ours / peer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (b, n), r in results.items():
        o, q = r["ours"], r["peer"]
        print(f"| {b} x {n} | {o['median']:.0f} ({o['min']:.0f}-{o['max']:.0f}) | {q['median']:.0f} "
              f"({q['min']:.0f}-{q['max']:.0f}) | {q['median'] / o['median']:.3f} | {o['hwm']:.0f} ({o['delta']:.0f}) "
              f"| {q['hwm']:.0f} ({q['delta']:.0f}) | {o['delta'] / q['delta']:.3f} "
              f"| {o['saved']:.0f} / {q['saved']:.0f} | {o['params'] / 1e6:.2f}M / {q['params'] / 1e6:.2f}M |")
    ours_ms = sum(r["ours"]["median"] for r in results.values())
    peer_ms = sum(r["peer"]["median"] for r in results.values())
    mem_ratio = sum(r["ours"]["delta"] for r in results.values()) / sum(r["peer"]["delta"] for r in results.values())
    print(f"\n(ms: median (min-max) per step; peak: VmHWM of the worker, in parentheses minus its RSS before the "
          f"model was built; saved for backward: tensors autograd kept in the warm-up step, parameters excluded.) "
          f"Wall time {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}.")
    print(f"RESULT name=trunk_vs_hf ours_ms={ours_ms:.0f} peer_ms={peer_ms:.0f} ratio={peer_ms / ours_ms:.3f} "
          f"mem_ratio={mem_ratio:.3f}")


if __name__ == "__main__":
    main()
