"""Has a masked LM learned context? For each MaskedLM checkpoint (e.g. the `epoch=*-step=*.ckpt` of one run):

- masked-token loss on the valid blocks of the embedded text (fixed masks: 15 % of the ordinary tokens, 80/10/10,
  seed 0; the same masks for every checkpoint) against the unigram entropy of the train tokens: the loss of a
  model that predicts every masked token from token frequencies alone (the "unigram plateau"); below it the
  encoder uses context;
- PLL (Salazar et al. 2020; omnissl.eval.pll) of six docstring-like sentences against the mean over 5 random
  word shuffles of each: wins and the mean margin (nats).

    python bench/mlm_context.py /tmp/runs/mlm_small/checkpoints/epoch=*-step=*.ckpt [--size small] [--block 64]

The DataModule reads the tokenizer each checkpoint carries, so the blocks are those the run trained on. One line
per checkpoint: `RESULT name=mlm_context step=... valid_loss=... unigram=... valid_acc=... pll_wins=.../6
pll_margin=...`; the machine's load average is printed (numbers here do not depend on it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path

import torch



def step_of(path: Path) -> int:
    m = re.search(r"step=(\d+)", path.name)
    if m:
        return int(m.group(1))
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


@torch.no_grad()
def evaluate(path: Path, a) -> dict:
    from omnissl.checkpoints import read_tokenizer
    from omnissl.datamodules.text import TextDataModule
    from omnissl.eval.pll import DOCSTRING_SENTENCES as SENTENCES, load_masked_lm, shuffle_margins
    from omnissl.ssl.masking import mlm_corrupt, mlm_select

    scorer = load_masked_lm(path)
    enc, head, info = scorer.encoder, scorer.head, scorer.info
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_text(read_tokenizer(path))
        dm = TextDataModule(embedded_size=a.size, tokenizer=str(tok), block_size=a.block, batch_size=32,
                            num_workers=0, progress=False)
        dm.prepare_data()
        dm.setup("fit")
        vocab = enc.frontend.embed.num_embeddings
        special = torch.zeros(vocab, dtype=torch.bool)
        special[info.special_ids] = True
        special[info.num_tokens:] = True
        counts = torch.zeros(vocab)
        for b in dm.train_dataloader():
            ids = b.inputs["text"]
            counts += torch.bincount(ids[~special[ids]], minlength=vocab).float()
        p = counts[counts > 0] / counts.sum()
        unigram = float(-(p * p.log()).sum())
        g = torch.Generator().manual_seed(0)
        random_ids = (~special).nonzero().flatten()
        total = n = hits = 0
        for b in dm.val_dataloader():
            ids, lengths = b.inputs["text"], b.lengths["text"]
            cand = ~special[ids] & (torch.arange(ids.shape[1])[None] < lengths[:, None])
            sel = mlm_select(cand, mask_prob=0.15, generator=g)
            cor = mlm_corrupt(ids, sel, mask_id=info.mask_id, random_ids=random_ids, generator=g)
            logits = head(enc.encode(enc.embed(cor, lengths)).last[sel], enc.frontend.embed.weight).double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[sel], reduction="sum"))
            n += int(sel.sum())
            hits += int((logits.argmax(-1) == ids[sel]).sum())
    margins = shuffle_margins(scorer, SENTENCES)
    wins = sum(m > 0 for m in margins)
    return {"step": step_of(path), "valid_loss": total / n, "unigram": unigram, "valid_acc": hits / n,
            "valid_tokens": n, "pll_wins": wins, "pll_margin": sum(margins) / len(margins),
            "pll_margins": margins}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--size", default="small", help="embedded text corpus size the run trained on")
    p.add_argument("--block", type=int, default=64, help="the run's block_size")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for path in sorted(a.checkpoints, key=step_of):
        r = evaluate(path, a)
        print(f"RESULT name=mlm_context ckpt={path} step={r['step']} valid_loss={r['valid_loss']:.3f} "
              f"unigram={r['unigram']:.3f} valid_acc={r['valid_acc']:.3f} valid_tokens={r['valid_tokens']} "
              f"pll_wins={r['pll_wins']}/{len(r['pll_margins'])} pll_margin={r['pll_margin']:.2f} "
              f"margins={','.join(f'{m:.1f}' for m in r['pll_margins'])}", flush=True)
    if not math.isfinite(r["valid_loss"]):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()
