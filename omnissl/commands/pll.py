"""`omnissl pll`: pseudo-log-likelihood scores of texts under a masked LM (omnissl/eval/pll.py).

    omnissl pll ENCODER_OR_CKPT --text "A sentence." [--text ...] [--file FILE] [--tokenizer PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnissl.commands import HelpFormatter, device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnissl pll", formatter_class=HelpFormatter,
        description="Score texts by pseudo-log-likelihood (Salazar et al. 2020): every ordinary token masked in "
                    "turn, PLL = sum of log P(token | the rest) in nats, PPPL = exp(-PLL / tokens). Higher PLL, "
                    "lower PPPL: the model finds the text more likely. Needs a MaskedLM checkpoint or a package "
                    "exported from one with --heads (the LM head), and its tokenizer (carried by both).",
    )  # fmt: skip
    p.add_argument("encoder", help="MaskedLM Lightning checkpoint (.ckpt) or omnissl package with heads")
    p.add_argument("--text", action="append", default=[], help="a text to score (repeatable)")
    p.add_argument("--file", type=Path, help="score every non-blank line of this UTF-8 file too")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (none: the one that travels with the encoder)")
    p.add_argument("--batch-size", type=int, default=64, help="masked copies per forward pass")
    p.add_argument("--device", default=None, help="none: cuda when available, else cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per text instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    texts = list(a.text)
    if a.file is not None:
        if not a.file.is_file():
            p.exit(2, f"omnissl pll: error: no file {a.file}\n")
        texts += [line for line in a.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        p.error("give at least one --text or a --file")
    if a.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {a.batch_size}")

    from omnissl.eval.pll import load_masked_lm

    try:
        scorer = load_masked_lm(a.encoder, tokenizer=a.tokenizer, device=device(a.device), batch_size=a.batch_size)
        scores = [scorer.score(t) for t in texts]
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"omnissl pll: error: {e}\n")
    for s in scores:
        if a.json:
            print(json.dumps({"text": s.text, "pll": s.pll, "tokens": s.tokens, "pppl": s.pppl}))
        else:
            print(f"PLL {s.pll:10.3f}  tokens {s.tokens:4d}  PPPL {s.pppl:10.3f}  {s.text}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
