"""Masked language modelling (BERT, Devlin et al. 2019; RoBERTa, Liu et al. 2019; MosaicBERT, Portes et al. 2023).

    ids (B, N) -> select ~mask_prob of the ordinary tokens (tokens or whole words, optional spans)
               -> corrupt the selected: 80 % <mask>, 10 % a random ordinary token, 10 % unchanged
               -> encoder -> hidden states at the M selected positions only (M, D)
               -> tied LM head (Linear, GELU, LayerNorm, · Eᵀ + b) -> logits (M, V) in fp32
    loss = Σ_selected CE(logits, original id), divided by the global number of selected tokens (fairseq
    `masked_lm` criterion); specials and padding are never selected, never inserted as random tokens.

Masks are drawn per batch on the batch's device from the objective's seeded generator (dynamic masking,
RoBERTa sec. 4.1), so every epoch sees new masks and a resumed run the same ones. Packed rows
(`TextDataModule(break_mode="documents")`, `Batch.segments`): several whole documents per row, each with its
own `<s>` / `</s>` (never selected), positions restarting and attention within the document; the exact
selection count is drawn per row (fairseq: per block), so per document it varies more. Legend: B batch, N tokens,
M selected tokens, D width, V vocabulary (padded to a multiple of 64; ids past the tokenizer's size never occur).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.batch import Batch
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.heads import MaskedLMHead
from omnissl.ssl.masking import mlm_corrupt, mlm_select, word_starts


class MaskedLM(SSLModule):
    """Masked-LM pretraining of a text `Encoder` (TokenEmbedding frontend) with a tied `MaskedLMHead`.

    mask_prob: fraction of ordinary tokens (or words) predicted: RoBERTa / BERT 0.15, MosaicBERT 0.30.
    mask_frac / random_frac: of the selected tokens, the share replaced by <mask> / by a random ordinary token
    (the rest stay unchanged): 0.8 / 0.1 (BERT, RoBERTa, fairseq `leave_unmasked_prob` = `random_token_prob`
    = 0.1). whole_word: select whole words (word boundaries from the tokenizer, `set_word_boundaries`).
    span: select runs of `span` consecutive units (tokens or words; fairseq `mask_multiple_length`).

    The tokenizer's roles: mask_id, special_ids (never selected, never drawn as random replacements) and
    num_tokens (its own size; random replacements are drawn below it). Left as None, they are read from the
    DataModule in `setup()` (TextDataModule's `mask_id`, `special_ids`, `info.num_tokens`,
    `word_boundaries()`); given, they must agree with it. The encoder's padding id must be among the specials.

    Metrics: accuracy (argmax = original id at the selected positions), perplexity (exp of this batch's mean
    loss), masked_frac (selected / non-padding tokens), replaced_mask / replaced_random (shares of the selected
    tokens that became <mask> / another token).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        mask_prob: float = 0.15,  # RoBERTa (sec. 2.3, BERT's 15 %); MosaicBERT trains with 0.30
        mask_frac: float = 0.8,
        random_frac: float = 0.1,
        whole_word: bool = False,
        span: int = 1,
        mask_id: int | None = None,
        special_ids: Sequence[int] | None = None,
        num_tokens: int | None = None,
        **base,
    ) -> None:
        super().__init__(**base)
        if not isinstance(encoder.frontend, TokenEmbedding):
            raise ValueError(f"MaskedLM needs a text encoder (TokenEmbedding frontend), got "
                             f"{type(encoder.frontend).__name__}")
        if not 0.0 < mask_prob < 1.0 or span < 1:
            raise ValueError(f"need 0 < mask_prob < 1 and span >= 1, got mask_prob={mask_prob}, span={span}")
        if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
            raise ValueError(f"need mask_frac, random_frac >= 0 with a sum <= 1, got {mask_frac}, {random_frac}")
        self.encoder = encoder
        # our MLM corrupts token ids: the encoder's learned mask embedding is never used, and a parameter
        # without a gradient would stop DDP (find_unused_parameters False)
        encoder.mask_emb.requires_grad_(False)
        self.vocab_size = encoder.frontend.embed.num_embeddings
        self.pad_id = encoder.frontend.pad_id
        self.mask_prob, self.mask_frac, self.random_frac = mask_prob, mask_frac, random_frac
        self.whole_word, self.span = whole_word, span
        self.lm_head = MaskedLMHead(dim=encoder.dim, vocab_size=self.vocab_size, eps=encoder.trunk.norm.eps)
        self.mask_id: int | None = None
        self.special_ids: list[int] = []
        self.num_tokens: int | None = None
        self._roles_given = (mask_id, special_ids, num_tokens)
        if mask_id is not None or special_ids is not None or num_tokens is not None:
            if mask_id is None or special_ids is None:
                raise ValueError("give mask_id and special_ids together (or neither: read from the DataModule)")
            self.set_vocabulary(mask_id=mask_id, special_ids=special_ids, num_tokens=num_tokens)

    # --- the tokenizer's roles -------------------------------------------------------------------------

    def set_vocabulary(self, *, mask_id: int, special_ids: Sequence[int], num_tokens: int | None = None) -> None:
        """Set the special-token roles: `special` (V,) bool buffer (specials, and ids past num_tokens) and
        `random_ids`, the ordinary ids random replacements are drawn from."""
        v = self.vocab_size
        num_tokens = v if num_tokens is None else int(num_tokens)
        specials = sorted({int(i) for i in special_ids} | {self.pad_id, int(mask_id)})
        bad = [i for i in specials if not 0 <= i < v]
        if bad or not 0 < num_tokens <= v:
            raise ValueError(f"special ids {bad or specials} / num_tokens {num_tokens} do not fit the encoder's "
                             f"vocabulary of {v}")
        special = torch.zeros(v, dtype=torch.bool, device=self.lm_head.bias.device)
        special[specials] = True
        special[num_tokens:] = True
        self.mask_id, self.special_ids, self.num_tokens = int(mask_id), specials, num_tokens
        self.register_buffer("special", special, persistent=False)
        self.register_buffer("random_ids", (~special).nonzero().flatten(), persistent=False)
        if self.random_frac > 0 and self.random_ids.numel() == 0:
            raise ValueError("no ordinary token id is left for random replacement")

    def set_word_boundaries(self, starts: Sequence[bool] | Tensor) -> None:
        """Which token ids begin a word, for whole-word masking (datamodules.tokenizers.word_boundaries)."""
        s = torch.as_tensor(starts, dtype=torch.bool, device=self.lm_head.bias.device)
        if s.shape != (self.vocab_size,):
            raise ValueError(f"the word boundary table must have the encoder's vocabulary size {self.vocab_size}, "
                             f"got {tuple(s.shape)}")
        self.register_buffer("word_start", s, persistent=False)

    def setup(self, stage: str) -> None:
        """Read the tokenizer's roles (and word boundaries) from a text DataModule, or check given ones."""
        dm = self.trainer.datamodule if self.attached else None
        if dm is None or not hasattr(dm, "mask_id"):
            return
        info = getattr(dm, "info", None)
        found = (dm.mask_id, list(dm.special_ids), getattr(info, "num_tokens", None))
        if getattr(dm, "pad_id", self.pad_id) != self.pad_id:
            raise ValueError(f"the encoder pads with id {self.pad_id} but the DataModule's tokenizer with "
                             f"{dm.pad_id}: build the encoder with pad_id={dm.pad_id}")
        if getattr(dm, "vocab_size", self.vocab_size) > self.vocab_size:
            raise ValueError(f"the DataModule's vocabulary ({dm.vocab_size}) is larger than the encoder's "
                             f"({self.vocab_size})")
        given = self._roles_given
        for name, mine, theirs in zip(("mask_id", "special_ids", "num_tokens"), given, found):
            same = mine is None or theirs is None or (sorted(mine) == sorted(theirs) if name == "special_ids"
                                                      else mine == theirs)
            if not same:
                raise ValueError(f"MaskedLM {name}={mine} disagrees with the DataModule's tokenizer ({theirs})")
        self.set_vocabulary(mask_id=found[0], special_ids=found[1], num_tokens=found[2])
        if self.whole_word:
            if not callable(getattr(dm, "word_boundaries", None)):
                raise ValueError(f"whole_word masking needs word boundaries; {type(dm).__name__} has no "
                                 "word_boundaries()")
            self.set_word_boundaries(dm.word_boundaries())

    def checkpoint_metadata(self) -> dict:
        """The tokenizer's roles and the masking settings (pseudo-log-likelihood scoring and exports read them)."""
        meta: dict = {"mask_prob": self.mask_prob, "mask_frac": self.mask_frac, "random_frac": self.random_frac,
                      "whole_word": self.whole_word, "span": self.span}
        if self.mask_id is not None:
            meta.update(mask_id=self.mask_id, special_ids=self.special_ids, num_tokens=self.num_tokens)
        return meta

    # --- the objective ------------------------------------------------------------------------------------

    def corrupt(self, ids: Tensor, lengths: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """ids (B, N) -> (corrupted ids, selected (B, N) bool), drawn from `generator` (default: the objective's
        seeded one)."""
        if self.mask_id is None:
            raise ValueError("MaskedLM does not know the tokenizer's mask_id / special_ids: pass them, or train "
                             "with a text DataModule (TextDataModule) that provides them")
        g = self.generator(ids.device) if generator is None else generator
        b, n = ids.shape
        candidates = ~self.special[ids]
        if lengths is not None:
            candidates &= torch.arange(n, device=ids.device)[None] < lengths[:, None]
        units = None
        if self.whole_word:
            if not hasattr(self, "word_start"):
                raise ValueError("whole_word masking needs word boundaries: call set_word_boundaries() or train "
                                 "with a TextDataModule")
            units = word_starts(ids, starts=self.word_start, special=self.special)
        selected = mlm_select(candidates, mask_prob=self.mask_prob, unit_starts=units, span=self.span, generator=g)
        corrupted = mlm_corrupt(ids, selected, mask_id=self.mask_id, random_ids=self.random_ids,
                                mask_frac=self.mask_frac, random_frac=self.random_frac, generator=g)
        return corrupted, selected

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (..., D) -> vocabulary logits (..., V) through the head tied to the token embedding."""
        return self.lm_head(hidden, self.encoder.frontend.embed.weight)

    reads_segments = True  # packed rows: Batch.segments go to the encoder

    def step(self, batch: Batch) -> StepOutput:
        ids = batch.inputs["text"]
        lengths = batch.lengths.get("text")
        corrupted, selected = self.corrupt(ids, lengths)
        return self.masked_step(ids, corrupted, selected, lengths, batch.segments.get("text"))

    def masked_step(self, ids: Tensor, corrupted: Tensor, selected: Tensor, lengths: Tensor | None = None,
                    segments: Tensor | None = None) -> StepOutput:
        """The loss and metrics of given masks: ids, corrupted (B, N), selected (B, N) bool (`corrupt`);
        segments (B, N): packed rows' document ids (`Batch.segments`), each document attended on its own."""
        # the head reads the selected positions only, so the trunk's last block computes only those rows (the
        # same values; they still attend to every token): each row's selected positions first, in order,
        # padded to the longest row's count Q (positions past a row's count are computed and dropped)
        counts = selected.sum(1)
        q = max(int(counts.max()), 1)
        queries = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :q]  # (B, Q)
        out = self.encoder.encode(self.encoder.embed(corrupted, lengths), queries=queries, segments=segments)
        hidden = out.last[torch.arange(q, device=ids.device)[None] < counts[:, None]]  # (M, D), = last[selected]
        target = ids[selected]
        logits = self.logits(hidden)
        with torch.autocast(device_type=ids.device.type, enabled=False):
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        count = target.numel()
        with torch.no_grad():
            m = max(count, 1)
            valid = lengths.sum() if lengths is not None else ids.numel()
            kept_mask = (corrupted[selected] == self.mask_id).sum()
            changed = (corrupted[selected] != target).sum()
            metrics: dict[str, Tensor | float] = {
                "accuracy": (logits.argmax(-1) == target).sum().float() / m,
                "perplexity": torch.exp(loss_sum.detach() / m),
                "masked_frac": count / valid,
                "replaced_mask": kept_mask.float() / m,
                "replaced_random": (changed - kept_mask).float() / m,
            }
        return StepOutput(self.normalize(loss_sum, count), metrics, ids.shape[0])
