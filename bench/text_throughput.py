"""Text pre-tokenization throughput: our pipeline next to HF `tokenizers` alone.

Ours (`omnissl.datamodules.text.pretokenize`): read every document file, check UTF-8, encode in batches of
1024 with `Tokenizer.encode_batch_fast` (no offsets) in a thread while the next batch of files is read, append
uint16 ids to the memmap and write the offsets.
Peer: `Tokenizer.encode_batch` on the same texts already in memory (what a user of `tokenizers` alone would
run; it also computes offsets), and `encode_batch_fast` for reference. Same tokenizer (byte-level BPE
trained on the corpus), same machine; a warm-up round, then the median of `--rounds` interleaved rounds.
MB = 10^6 bytes of UTF-8 text.

    python bench/text_throughput.py [--size default] [--vocab-size 32768] [--rounds 3]

Prints a table, then:  RESULT name=text_pretokenize mb_s=<ours> peer_mb_s=<encode_batch> ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.documents import list_documents, read_documents
from omnissl.datamodules.token_cache import pretokenize
from omnissl.datamodules.tokenizers import train_tokenizer


def measure_text(rounds: int = 3, warmup: int = 1, size: str = "default", vocab_size: int = 32_768) -> None:
    """Print the table and the RESULT line (same keyword style as `bench/data_throughput.py`'s measurements,
    so it can be registered there as MEASUREMENTS["text"])."""
    files = list_documents(embedded_corpus("embedded:text", size=size, seed=0)["train"])
    texts = list(read_documents(files))
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="text-throughput-"))
    try:
        tok = train_tokenizer(iter(texts), kind="bpe", vocab_size=vocab_size)
        tok_file = work / "tokenizer.json"
        tok.save(str(tok_file))

        def ours() -> None:
            out = work / "cache"
            shutil.rmtree(out, ignore_errors=True)
            pretokenize(files, tok_file, out, progress=False)

        fns = {"ours": ours,
               "peer": lambda: tok.encode_batch(texts, add_special_tokens=False),
               "fast": lambda: tok.encode_batch_fast(texts, add_special_tokens=False)}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():  # interleaved, so load from other processes hits all alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        t = {k: statistics.median(v) for k, v in times.items()}
        n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"corpus: embedded:text size={size}, {len(files)} files, {mb:.2f} MB, {n_tokens} tokens, "
          f"vocab {tok.get_vocab_size()}, {os.cpu_count()} CPUs, median of {rounds} rounds")
    print(f"{'pipeline':<52} {'seconds':>8} {'MB/s':>8}")
    for key, name in (("ours", "ours: files -> memmap (encode_batch_fast)"),
                      ("peer", "peer: tokenizers encode_batch (in memory)"),
                      ("fast", "ref:  tokenizers encode_batch_fast (in memory)")):
        print(f"{name:<52} {t[key]:8.3f} {mb / t[key]:8.2f}")
    print(f"RESULT name=text_pretokenize mb_s={mb / t['ours']:.2f} peer_mb_s={mb / t['peer']:.2f} "
          f"ratio={t['peer'] / t['ours']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--vocab-size", type=int, default=32_768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    measure_text(rounds=args.rounds, warmup=args.warmup, size=args.size, vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
