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
        .venv/bin/python bench/trunk_vs_hf.py [--configs 8x128,2x512] [--warmup 1 --rounds 5] [--threads 2] [--bf16]

--bf16: both sides' steps under `torch.autocast(bfloat16)` with fp32 weights (Lightning's bf16-mixed, the
precision of the GPU recipes). This CPU has AMX: its bf16 GEMMs are ~2.7x faster than fp32 ones, so, as on a
GPU, the elementwise work around the GEMMs (dropout, LayerNorm, GELU, copies) is a larger share of the step.

Ends with: RESULT name=trunk_vs_hf[_bf16] ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import os
import time

from sidebyside import add_worker_args, memory_table, result_line, round_line, run_workers, serve, totals

VOCAB, DIM, DEPTH, HEADS, FFN = 50265, 768, 12, 12, 3072


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
    import importlib

    import torch

    # both workers import the same libraries: equal baselines
    for lib in ("transformers", "omnissl.backbones.builders"):
        importlib.import_module(lib)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))

    def build():
        model, forward = (build_ours if a.worker == "ours" else build_peer)()

        def step():
            loss = forward(ids).pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        return model, step

    serve(build, bf16=a.bf16)


def run_config(batch: int, seq: int, a) -> dict:
    def argv(name: str) -> list[str]:
        return [os.path.abspath(__file__), "--worker", name, "--batch", str(batch), "--seq", str(seq),
                "--threads", str(a.threads)] + (["--bf16"] if a.bf16 else [])

    return run_workers(argv, a.warmup, a.rounds, after_round=round_line(f"{batch}x{seq}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="8x128,2x512", help="comma-separated BATCHxSEQ")
    add_worker_args(p)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    print(f"RoBERTa-base dims ({DIM}d x {DEPTH} layers x {HEADS} heads, FFN {FFN}, vocab {VOCAB}), train mode "
          f"(dropout 0.1), fwd+bwd, CPU {'bf16 autocast' if a.bf16 else 'fp32'}, {a.threads} threads, peer attn_implementation=sdpa; "
          f"warm-up {a.warmup}, {a.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    t0 = time.perf_counter()
    results = {(b, n): run_config(b, n, a) for b, n in configs}

    print()
    memory_table({f"{b} x {n}": r for (b, n), r in results.items()}, "batch x seq")
    ms, delta = totals(results, "median"), totals(results, "delta")
    print(f"\n(ms: median (min-max) per step; peak: VmHWM of the worker, in parentheses minus its RSS before the "
          f"model was built; saved for backward: tensors autograd kept in the warm-up step, parameters excluded.) "
          f"Wall time {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}.")
    print(result_line("trunk_vs_hf" + ("_bf16" if a.bf16 else ""), ms["ours"], ms["peer"],
                      mem_ratio=delta["ours"] / delta["peer"]))


if __name__ == "__main__":
    main()
