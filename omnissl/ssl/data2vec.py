"""data2vec (v1): self-distillation of contextual targets (Baevski et al. 2022, "data2vec: A General
Framework for Self-supervised Learning in Speech, Vision and Language").

    x -> student embed -> tokens ----------- span mask -> student trunk -> head  = pred    (masked steps)
                            \\--(no grad)--> EMA teacher trunk (unmasked) -> top-K layers, each
                                             instance-normed, averaged                  = target  (masked steps)
    loss = Σ_masked Σ_D (pred - target)² / √D            (or Smooth-L1(β) when loss_beta > 0)

divided by the global number of masked steps (fairseq `data2vec_audio.py`). Legend: B batch, T samples,
N steps, M masked steps, D trunk width, L layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.protocol import Tokens
from omnissl.batch import Batch
from omnissl.checkpoints import load_encoder_weights
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.frames import ShortUtteranceFilter
from omnissl.ssl.heads import regression_head
from omnissl.ssl.losses import loss_vs_zero, regression_loss
from omnissl.ssl.masking import block_mask, check_span_args, mlm_select, span_mask
from omnissl.ssl.monitors import VarianceGuards, monitors
from omnissl.ssl.teacher import FRONT_KEYS, STUDENT_KEYS, EMATeacher, TeacherHooks, check_teacher_input


class Data2Vec(TeacherHooks, SSLModule):
    """data2vec v1 on an injected `Encoder` of any modality (masking by `mask=`, i.e. a learned mask embedding).

    Defaults: audio BASE (Baevski et al. 2022, sec. 4.2; fairseq
    `examples/data2vec/config/audio/pretraining/base_librispeech.yaml`, REFERENCE §B.4): span mask p 0.65,
    length 10; top-8 FFN outputs (before the last residual), instance-normed; Linear head; L2 / √D;
    EMA 0.999 -> 0.9999 over 30 k updates; guards target_var >= 0.1, pred_var >= 0.01 after 5 k updates.
    Text base: mask_prob 0.35, mask_length 4 (fairseq `masked_lm` spans, see `mask`; min_spans unused),
    top_k 10, target_source "ffn" (fairseq `fc_results`), target_norm "layer", head_layers 2, loss_beta 4,
    loss_scale 1, anneal 300 k. Vision: target_source
    "layers", the raw block outputs (for a pre-LN trunk the top one before the final LayerNorm, as fairseq's
    `data2vec_vision` appends each block's output before `norm`).

    The teacher is an EMA copy of the encoder fed the student's unmasked tokens (fairseq
    `ema_transformer_only`: the conv frontend, feature norm and projection are the student's, run once);
    ema_layers_only copies the positions from the student instead of averaging them (fairseq default), and for
    text also the embedding LayerNorm (the post-LN trunk's input norm; fairseq `ema_transformer_layers_only`
    copies `layernorm_embedding`).
    init_from: a checkpoint whose `encoder.*` weights start the student; the teacher starts as its copy.
    NOTE(ref): a CLS token (vision) starts at zero; fairseq's data2vec_vision draws `cls_emb` from a truncated
    N(0, 0.02²). Measured on vit_base16 (pre-LN) at init, the teacher targets change by 0.27 % (relative L2)
    between the two inits, and no loss reads the CLS output.

    Metrics: loss, target_var, pred_var (fairseq `compute_var`), ema_decay, masked_frac, loss_vs_zero,
    dropped_short.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        modality: str = "audio",
        mask_prob: float = 0.65,  # audio base (sec. 4.2): p 0.65, span 10; text: 0.35, 4
        mask_length: int = 10,
        min_spans: int = 1,  # fairseq data2vec_audio apply_mask: min_masks=1 (wav2vec 2.0: 2)
        top_k: int = 8,  # audio K = 8; text K = 10
        target_source: str = "ffn",  # audio, text: FFN output before the last residual; vision: "layers"
        target_norm: str | None = "instance",  # audio/vision instance norm; text "layer"
        final_target_norm: str | None = None,
        head_layers: int = 1,  # audio 1 (final_proj); text 2
        loss_beta: float = 0.0,  # 0: L2; text: Smooth-L1 with beta 4
        loss_scale: float | None = None,  # None: 1 / sqrt(D) (audio); text 1
        ema_decay: float = 0.999,  # audio: 0.999 -> 0.9999 over 30 k updates; text: over 300 k
        ema_end_decay: float = 0.9999,
        ema_anneal_steps: int = 30_000,
        ema_layers_only: bool = True,  # copy (not average) the positions (fairseq default); text: + embedding LN
        min_target_var: float = 0.1,  # fairseq guards, active after 5 k updates
        min_pred_var: float = 0.01,
        var_guard_after_steps: int = 5_000,
        short_utterances: str = "drop",
        init_from: str | None = None,
        **base,
    ) -> None:
        super().__init__(**base)
        if target_source not in ("ffn", "layers"):
            raise ValueError(f"target_source must be 'ffn' or 'layers', got {target_source!r}")
        if not 1 <= top_k <= encoder.num_layers:
            raise ValueError(f"top_k must be in [1, {encoder.num_layers}] for this encoder, got {top_k}")
        self.short = ShortUtteranceFilter(check_span_args(mask_prob, mask_length, min_spans), short_utterances)
        if init_from:
            load_encoder_weights(encoder, init_from)
        self.encoder, self.modality = encoder, modality
        self.mask_prob, self.mask_length, self.min_spans = mask_prob, mask_length, min_spans
        self.top_k, self.target_source = top_k, target_source
        self.target_norm, self.final_target_norm = target_norm, final_target_norm
        self.loss_beta = loss_beta
        self.loss_scale = 1.0 / math.sqrt(encoder.dim) if loss_scale is None else loss_scale
        self.head = regression_head(encoder.dim, head_layers)
        check_teacher_input(encoder)
        self.teacher = EMATeacher(encoder, decay_start=ema_decay, decay_end=ema_end_decay,
                                  anneal_steps=ema_anneal_steps, skip=FRONT_KEYS,
                                  copy=STUDENT_KEYS + self.copied_keys(encoder, modality, ema_layers_only))
        self.guards = VarianceGuards(min_target=min_target_var, min_pred=min_pred_var,
                                     after_steps=var_guard_after_steps)

    @staticmethod
    def copied_keys(encoder: Encoder, modality: str, ema_layers_only: bool) -> tuple[str, ...]:
        """Teacher parameters copied from the student rather than averaged: with ema_layers_only the positions
        (fairseq data2vec audio skips `pos_conv`), and for text also the post-LN trunk's input LayerNorm (the
        embedding LayerNorm that data2vec_text's `ema_transformer_layers_only` skips)."""
        if not ema_layers_only:
            return ()
        text_ln = modality == "text" and not encoder.trunk.pre_norm
        return ("positions.",) + (("trunk.norm.",) if text_ln else ())

    # --- the objective ------------------------------------------------------------------------------------

    @torch.no_grad()
    def targets(self, tokens) -> Tensor:
        """Teacher targets (B, N, D) fp32 from the student's unmasked tokens.

        NOTE(ref): fairseq (`ema_transformer_only`) feeds the teacher the projected features before the
        student's `dropout_input`, whose p is 0.0 in both data2vec audio configs; `Encoder.embed` applies that
        dropout inside, so with p > 0 our teacher would see the dropped-out tokens (re-projecting
        `tokens.features` would call a submodule outside FSDP2's sharded entry points). The recipes set
        dropout_input 0.0, as fairseq, and the constructor warns otherwise (`check_teacher_input`).
        """
        return self.teacher.targets(tokens._replace(x=tokens.x.detach()), top_k=self.top_k, norm=self.target_norm,
                                    final_norm=self.final_target_norm, num_prefix=self.encoder.num_prefix,
                                    source=self.target_source)

    def mask(self, tokens: Tokens, generator: torch.Generator) -> Tensor:
        """The student's mask (B, N) bool, True = masked, over the tokens after any CLS.

        Patch grids (images): block-wise masks of mask_length x mask_length squares (padded patches of
        shorter spectrograms are never masked nor regressed). Text: fairseq `MaskTokensDataset` (data2vec text
        runs the `masked_lm` task with mask_multiple_length 4): per row int(p·T/L + u) starts drawn from every
        valid token, each masking L tokens clipped to the row, with no same-count constraint, so the last token
        can be masked (`mlm_select`). Other sequences (audio): `span_mask` (fairseq `compute_mask_indices`).
        """
        b, n, _ = tokens.x.shape
        device = tokens.x.device
        if tokens.grid is not None:  # the CLS token is added later, never masked
            mask = block_mask(tokens.grid, b, mask_prob=self.mask_prob, block=self.mask_length, generator=generator,
                              device=device)
            if tokens.padding_mask is not None:  # squares fall uniformly, so valid patches keep the rate
                mask &= ~tokens.padding_mask
            return mask
        if self.modality == "text":
            valid = (torch.ones(b, n, dtype=torch.bool, device=device) if tokens.padding_mask is None
                     else ~tokens.padding_mask)
            return mlm_select(valid, mask_prob=self.mask_prob, span=self.mask_length, generator=generator)
        return span_mask((b, n), padding_mask=tokens.padding_mask, mask_prob=self.mask_prob, span=self.mask_length,
                         min_spans=self.min_spans, same_count=True, generator=generator, device=device)

    def step(self, batch: Batch) -> StepOutput:
        batch, dropped = self.short(batch, self.modality, self.encoder)
        x, lengths = batch.inputs[self.modality], batch.lengths.get(self.modality)
        tokens = self.encoder.embed(x, lengths)
        b, n, _ = tokens.x.shape
        mask = self.mask(tokens, self.generator(x.device))
        out = self.encoder.encode(tokens, mask=mask)
        target = self.targets(tokens)[mask]  # (B·M, D)
        pred = self.head(out.last[:, self.encoder.num_prefix:][mask])  # (B·M, D)
        count = mask.sum()
        loss_sum = regression_loss(pred, target, beta=self.loss_beta, scale=self.loss_scale)

        valid = n * b if tokens.padding_mask is None else int((~tokens.padding_mask).sum())
        metrics = monitors(pred=pred, target=target,
                           loss_vs_zero=loss_vs_zero(loss_sum, target, beta=self.loss_beta, scale=self.loss_scale),
                           ema_decay=self.teacher.decay, masked_frac=float(count) / max(valid, 1), dropped=dropped,
                           guards=self.guards if self.training and self.attached else None, step=self.global_step,
                           reduce=self.reducer())
        return StepOutput(self.normalize(loss_sum, count), metrics, b)
