"""CLAP's text tower with and without queries: what `clap.pool_queries` saves (`Encoder.encode(queries=)`).

The text tower of bench/clap_vs_hf.py (RoBERTa-base: 12 x 768, 12 heads, FFN 3072, post-LN, dropout 0.1; batch 32
captions of 77 tokens padded from lengths drawn in [16, 77]), `CLAP.embed_text` + backward in train mode, "first"
pooling; "queries" is the module as it is, "full" the full-sequence path (`pool_queries` replaced by one that
returns None, as the code was before). Both in one process, interleaved (order alternating), round 0 a warm-up;
medians. The load average is printed beside the timings: numbers taken on a loaded machine are not final.

    OMP_NUM_THREADS=2 python bench/clap_text_queries.py [--rounds 5] [--pool first|mean] [--small]

Ends with: RESULT name=clap_text_queries queries_ms=... full_ms=... speedup=<full/queries>
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from omnissl.backbones import builders
from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.backbones.transformer import LearnedPositions, Transformer
from omnissl.ssl import clap as clap_module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pool", default="first", choices=["first", "mean"])
    p.add_argument("--small", action="store_true", help="smoke run: 2 x 128 text tower, 2 rounds")
    a = p.parse_args()
    dim, depth, heads, vocab, batch, tokens = (128, 2, 4, 1024, 8, 77) if a.small else (768, 12, 12, 32768, 32, 77)
    rounds = 2 if a.small else a.rounds
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, tokens + 1, (batch,), generator=g)
    ids = torch.randint(5, vocab, (batch, tokens), generator=g)
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    ids[torch.arange(tokens)[None] >= lengths[:, None]] = 1
    text = Encoder(TokenEmbedding(vocab_size=vocab, dim=dim, pad_id=1),
                   Transformer(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, dropout=0.1, attn_dropout=0.1),
                   positions=LearnedPositions(dim, max_len=512), feature_norm=False, project=False)
    model = clap_module.CLAP(builders.tiny("audio", dim=32, depth=1), text, dim=512, text_pool=a.pool).train()
    paths = {"queries": clap_module.pool_queries, "full": lambda *args: None}
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for r in range(rounds + 1):
            for name in (("queries", "full") if r % 2 == 0 else ("full", "queries")):
                clap_module.pool_queries = paths[name]
                t0 = time.perf_counter()
                model.embed_text(ids, lengths).sum().backward()
                model.zero_grad(set_to_none=True)
                if r > 0:
                    times[name].append(time.perf_counter() - t0)
    finally:
        clap_module.pool_queries = paths["queries"]
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    print(f"threads {torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"text {dim}x{depth}, batch {batch}, {tokens} tokens (mean length {float(lengths.float().mean()):.1f}), "
          f"pool {a.pool}")
    for name, v in times.items():
        print(f"{name}: median {ms[name]:.1f} ms, rounds {[round(1000 * x) for x in v]}")
    print(f"RESULT name=clap_text_queries queries_ms={ms['queries']:.2f} full_ms={ms['full']:.2f} "
          f"speedup={ms['full'] / ms['queries']:.3f}")


if __name__ == "__main__":
    main()
