"""Pseudo-log-likelihood scoring of sentences with a masked LM (Salazar et al. 2020, "Masked Language Model
Scoring", eq. 1-2): PLL(W) = Σ_t log P(w_t | W with w_t masked), one forward pass per scored token (batched),
every ordinary token scored, special tokens (<s>, </s>, ...) only as context. PPPL = exp(-PLL / #scored tokens)
is the pseudo-perplexity. `omnissl pll` (omnissl/commands/pll.py) scores texts from the command line.

    scorer = load_masked_lm("runs/.../last.ckpt")        # a MaskedLM checkpoint, or a package with heads
    scorer.score("The cat sat on the mat.")              # -> PLLScore(pll, tokens, pppl)

The LM head is the MaskedLM objective's `lm_head` (a checkpoint holds it; a package holds it when exported with
--heads); the tokenizer is the one that travels with the encoder (checkpoints.read_tokenizer) or a given file.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnissl.backbones.encoder import Encoder
from omnissl.checkpoints import load_backbone, load_head_weights, read_checkpoint, read_tokenizer
from omnissl.datamodules.tokenizers import load_tokenizer, tokenizer_info
from omnissl.eval.export import masked_lm_head
from omnissl.ssl.heads import MaskedLMHead

__all__ = ["pseudo_log_likelihood", "load_masked_lm", "MaskedLMScorer", "PLLScore"]


@torch.no_grad()
def pseudo_log_likelihood(encoder: Encoder, head: MaskedLMHead, ids: Tensor, *, mask_id: int,
                          special_ids: list[int] | Tensor, batch_size: int = 64) -> Tensor:
    """Per-token log P(w_t | rest) of one sequence `ids` (N,) int64: (N,) float64, 0 at special tokens (not
    scored). Copies of the sequence with one ordinary token replaced by `mask_id` go through the encoder
    `batch_size` at a time; the head reads only the masked position of each copy. Sum it for the PLL."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be one sequence (N,), got {tuple(ids.shape)}")
    device = head.bias.device
    ids = ids.to(device)
    special = torch.as_tensor(special_ids, device=device)
    positions = (~torch.isin(ids, special)).nonzero().flatten()
    out = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
    weight = encoder.frontend.embed.weight
    for chunk in positions.split(batch_size):
        k = chunk.shape[0]
        rows = torch.arange(k, device=device)
        copies = ids.expand(k, -1).clone()
        copies[rows, chunk] = mask_id
        hidden = encoder.encode(encoder.embed(copies)).last[rows, chunk]  # (k, D)
        logp = torch.log_softmax(head(hidden, weight).double(), dim=-1)
        out[chunk] = logp[rows, ids[chunk]]
    return out


@dataclass(frozen=True)
class PLLScore:
    """pll: Σ log P (nats); tokens: how many were scored; pppl: exp(-pll / tokens)."""

    text: str
    pll: float
    tokens: int

    @property
    def pppl(self) -> float:
        return math.exp(-self.pll / self.tokens) if self.tokens else math.nan


class MaskedLMScorer:
    """An encoder, its tied LM head and its tokenizer, in eval mode: `score(text) -> PLLScore`."""

    def __init__(self, encoder: Encoder, head: MaskedLMHead, tokenizer, *, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        info = tokenizer_info(tokenizer)
        vocab = encoder.frontend.embed.num_embeddings
        if info.num_tokens > vocab:
            raise ValueError(f"the tokenizer has {info.num_tokens} tokens but the encoder embeds only {vocab}: not "
                             "its pretraining tokenizer")
        if encoder.frontend.pad_id != info.pad_id:
            raise ValueError(f"the encoder pads with id {encoder.frontend.pad_id}, the tokenizer with {info.pad_id}: "
                             "not its pretraining tokenizer")
        self.encoder, self.head = encoder.to(device).eval(), head.to(device).eval()
        self.tokenizer, self.info, self.batch_size = tokenizer, info, batch_size
        self.max_len = getattr(encoder.positions, "max_len", None)

    def token_ids(self, text: str) -> Tensor:
        ids = self.tokenizer.encode(text).ids  # with <s> ... </s> / [CLS] ... [SEP], as training blocks
        if self.max_len is not None and len(ids) > self.max_len:
            raise ValueError(f"text of {len(ids)} tokens is longer than the encoder's {self.max_len} positions")
        return torch.tensor(ids, dtype=torch.long)

    def token_scores(self, text: str) -> Tensor:
        return pseudo_log_likelihood(self.encoder, self.head, self.token_ids(text), mask_id=self.info.mask_id,
                                     special_ids=self.info.special_ids, batch_size=self.batch_size)

    def score(self, text: str) -> PLLScore:
        ids = self.token_ids(text)
        scored = int((~torch.isin(ids, torch.tensor(self.info.special_ids))).sum())
        pll = pseudo_log_likelihood(self.encoder, self.head, ids, mask_id=self.info.mask_id,
                                    special_ids=self.info.special_ids, batch_size=self.batch_size)
        return PLLScore(text, float(pll.sum()), scored)


def load_masked_lm(path: str | Path, *, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 64) -> MaskedLMScorer:
    """A MaskedLM Lightning checkpoint, or an omnissl package exported with --heads, -> MaskedLMScorer.
    tokenizer: a tokenizer.json (or its folder); default the one that travels with the encoder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no encoder package or checkpoint at {path}")
    if path.is_dir():
        encoder = load_backbone(path)
        heads = load_head_weights(path)
        source = f"{path} (package heads)"
    else:
        ckpt = read_checkpoint(path)
        encoder, heads, source = ckpt.encoder, ckpt.heads, f"{path} (checkpoint)"
    if "lm_head" not in heads:
        raise ValueError(f"{source} holds no masked-LM head (lm_head): scoring needs a MaskedLM checkpoint, or a "
                         "package exported from one with --heads")
    head = masked_lm_head(heads["lm_head"], encoder, f"{source} lm_head")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        text = read_tokenizer(path)
        if text is None:
            raise ValueError(f"{path} carries no tokenizer (tokenizer.json / checkpoint['omnissl']['tokenizer']): "
                             "pass --tokenizer")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(text)
    return MaskedLMScorer(encoder, head, tok, device=device, batch_size=batch_size)


# docstring-like sentences for the grammatical-vs-shuffled check on the embedded text (bench and tests)
DOCSTRING_SENTENCES = [
    "Return the sum of the two numbers.",
    "Open the file and return a stream.",
    "If the key is not found, return the default value.",
    "Remove all items from the list.",
    "Return a new list containing all items from the iterable in ascending order.",
    "Raise an exception if the value is not valid.",
]


def shuffle_margins(scorer: MaskedLMScorer, sentences: list[str], *, shuffles: int = 5, seed: int = 0) -> list[float]:
    """For each sentence, its PLL minus the mean PLL of `shuffles` random orders of its words (each different
    from the original): > 0 means the model prefers the sentence to its scrambled versions."""
    rng = random.Random(seed)
    margins = []
    for s in sentences:
        words = s.rstrip(".").split()
        if len(set(words)) < 2:
            raise ValueError(f"cannot shuffle the words of {s!r}: it needs two different words")
        scores = []
        for _ in range(shuffles):
            w = words[:]
            while w == words:
                rng.shuffle(w)
            scores.append(scorer.score(" ".join(w) + ".").pll)
        margins.append(scorer.score(s).pll - sum(scores) / len(scores))
    return margins
