"""The two CPU kernel choices of the trunk, each against the torch op it replaces, fwd + bwd, medians of rounds:

1. dropout: `omnissl.ops.dropout` (16 random bits per value from one 64-bit draw of torch's generator, one
   saved multiplier) vs `F.dropout` (torch's CPU dropout: a float Bernoulli draw per value, a division and a
   product), p = 0.1, on the trunk's largest dropout input (attention probabilities, 8 x 12 x 128 x 128);
2. the attention core: the explicit math of `Attention` (softmax(q·kᵀ/√d) · v: two GEMMs and a softmax) vs
   `F.scaled_dot_product_attention` (its CPU flash kernel; no dropout), at the shapes of the benches: the trunk
   (8 x 128, 2 x 512), wav2vec 2.0 BASE (4 x 249 frames), MAE ViT-B/16 (encoder 32 x 50 tokens, decoder 32 x
   197 at 16 heads of 32).

Both in fp32 and bf16 (inputs in bf16, as autocast makes them; this CPU has AMX, so bf16 GEMMs are fast and the
rest of the work shows). The rounds alternate the two variants; the ratio is torch's time / ours (> 1: ours
faster). These numbers decided `ops.fast_cpu_dropout` (on for every CPU dropout) and `Attention.explicit_cpu`
(the explicit core on the CPU with attention dropout, or in bf16 / fp16 with gradients; SDPA otherwise, since in
fp32 without dropout the flash kernel wins at long sequences). CUDA takes torch's fused kernels regardless.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        python bench/cpu_kernels.py [--threads 2] [--rounds 9]

Ends with: RESULT name=cpu_kernels dropout_fp32=<F.dropout / ours> dropout_bf16=... attention_bf16=<geometric
mean over the shapes of SDPA / explicit> attention_fp32=...
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

SHAPES = {  # (B, H, N, d)
    "trunk 8 x 128": (8, 12, 128, 64),
    "trunk 2 x 512": (2, 12, 512, 64),
    "wav2vec 2.0 4 x 249": (4, 12, 249, 64),
    "MAE encoder 32 x 50": (32, 12, 50, 64),
    "MAE decoder 32 x 197": (32, 16, 197, 32),
}


def timed(fns: dict, rounds: int) -> dict[str, float]:
    """fns: name -> zero-argument callable; 2 warm-up calls each, then `rounds` alternating rounds -> medians ms."""
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F

    from omnissl.ops import dropout

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{a.threads} threads, {a.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f}", flush=True)
    result = {}

    print("\n| dropout p = 0.1, fwd+bwd, 8 x 12 x 128 x 128 | F.dropout ms | ops.dropout ms | ratio |")
    print("|---|---:|---:|---:|")
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x = torch.randn(8, 12, 128, 128, dtype=dt, requires_grad=True)
        g = torch.randn_like(x)
        ms = timed({"torch": lambda: F.dropout(x, 0.1, training=True).backward(g),
                    "ours": lambda: dropout(x, 0.1).backward(g)}, a.rounds)
        result[f"dropout_{tag}"] = ms["torch"] / ms["ours"]
        print(f"| {tag} | {ms['torch']:.1f} | {ms['ours']:.1f} | {result[f'dropout_{tag}']:.2f} |", flush=True)

    def explicit(q, k, v):  # Attention's explicit CPU core without dropout
        return torch.matmul(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).softmax(-1), v)

    print("\n| attention core, fwd+bwd | dtype | SDPA ms | explicit ms | ratio |\n|---|---|---:|---:|---:|")
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ratios = []
        for name, shape in SHAPES.items():
            q, k, v = (torch.randn(shape, dtype=dt, requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)
            ms = timed({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v).backward(g),
                        "explicit": lambda: explicit(q, k, v).backward(g)}, a.rounds)
            ratios.append(ms["sdpa"] / ms["explicit"])
            print(f"| {name} | {tag} | {ms['sdpa']:.1f} | {ms['explicit']:.1f} | {ratios[-1]:.2f} |", flush=True)
        result[f"attention_{tag}"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("RESULT name=cpu_kernels " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
