"""data2vec 2.0: efficient self-distillation (Baevski et al. 2023, "Efficient Self-supervised Learning with
Contextualized Target Representations for Vision, Speech and Language", fairseq `data2vec_multi`).

    x -> student embed -> tokens (B, N, D) --(no grad)--> EMA teacher (once per sample, unmasked)
                             |                              -> top-K FFN outputs, instance-normed, averaged
                             |                              -> target (B, N, D), repeated M times
                             \\-> M clones (B·M) -> mask -> student trunk on visible tokens only (keep=)
                                 -> dropout -> scatter into N(0, 0.01²) noise at masked slots -> conv decoder = pred
    loss = Σ_masked Σ_D (pred - target)² · scale         (scale 1/√D audio, 1 text)

divided by the global number of masked positions (fairseq `d2v_loss`). Legend: B batch, M clones, N steps,
K kept steps, D trunk width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.protocol import Tokens
from omnissl.batch import Batch
from omnissl.checkpoints import load_encoder_weights
from omnissl.ops import dropout
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.frames import ShortUtteranceFilter
from omnissl.ssl.heads import ConvDecoder1d
from omnissl.ssl.losses import loss_vs_zero, regression_loss
from omnissl.ssl.masking import block_mask_1d, check_span_args, equal_keep, inverse_block_mask
from omnissl.ssl.monitors import VarianceGuards, monitors
from omnissl.ssl.teacher import FRONT_KEYS, STUDENT_KEYS, EMATeacher, TeacherHooks, check_teacher_input


class Data2Vec2(TeacherHooks, SSLModule):
    """data2vec 2.0 on an injected sequence `Encoder` (audio; text through the recipe).

    decoder: the module that fills in the masked tokens, called `decoder(x (B·M, N, D), padding_mask, grid)`
    -> (B·M, N, D) (`ConvDecoder1d` for sequences, `ConvDecoder2d` for patch grids; its in_dim is the
    encoder's width); None builds the audio base `ConvDecoder1d`.

    Defaults: audio BASE (`examples/data2vec/config/v2/base_audio_only_task.yaml`, REFERENCE §B.5):
    M = 8 clones, 1-D block masks (p 0.5, length 5, adjust 0.05: exactly 50 % of the frames), targets = the
    average of the top-8 blocks' FFN outputs before the last residual (fairseq `end_of_block_targets: false`,
    `AltBlock(ffn_targets=True)`, every modality), each instance-normed; the student's visible outputs go
    through dropout 0.1 (`decoder.input_dropout`, audio and text; image 0) before the conv decoder
    4 x 384 kernel 7 groups 16; L2 / √D; EMA 0.999 -> 0.99999 over 75 k updates, mask noise std 0.01. The
    teacher is fed the student's features (`ema_local_encoder: false`); set teacher_embeds for a teacher
    that embeds on its own (`ema_local_encoder: true`, images), or ema_blocks_only for fairseq's
    `ema_encoder_only` (text): only the trunk's blocks are averaged, the positions and the trunk's input
    LayerNorm are copied from the student at every update, so the teacher embeds with the student's
    current weights.

    Sequences are masked with `block_mask_1d` (fairseq `compute_block_mask_1d`; span 1 is a uniform random
    subset, fairseq's `random_masking` for text); block_adjust is fairseq's `mask_prob_adjust`.
    Patch-grid encoders (images; tokens with a grid) take inverse block masks (`inverse_block_mask`: keep
    `mask_length` x `mask_length` blocks, then exactly (1 - mask_prob)·N kept, `block_adjust` extra centres)
    and the 2-D decoder (`ConvDecoder2d`); image base: mask_prob 0.8, mask_length 3, block_adjust 0.07, M 16,
    top_k 10 of 10, final_target_norm "layer", decoder 6 x 768 kernel 3, decoder_input_dropout 0,
    teacher_embeds true.
    NOTE(ref): as in Data2Vec.targets, the teacher is fed the student's tokens; fairseq's input dropout is 0.0
    (the recipes set it so; the constructor warns otherwise).
    NOTE(ref): fairseq's image model adds `cls_loss 0.01` (the CLS token regresses the mean target); not here.
    NOTE(ref): the encoder's CLS token starts at zero; fairseq's image model draws it from N(0, 1)
    (`init_extra_token_zero: false`). No loss here reads the CLS output, so it acts only through attention:
    measured on vit_base16 (post-LN) at init, the teacher targets change by 0.45 % (relative L2) between the
    two inits.

    Metrics: loss, target_var, pred_var, ema_decay, masked_frac, loss_vs_zero, dropped_short.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        modality: str = "audio",
        mask_prob: float = 0.5,  # audio base: exactly 50 % of the frames masked
        mask_length: int = 5,  # audio base: mask_length 5
        clone_batch: int = 8,  # audio base M = 8 (text 8, image 16)
        top_k: int = 8,  # audio: top 8 of 12 blocks
        target_source: str = "ffn",  # fairseq end_of_block_targets false: FFN outputs; "layers": block outputs
        target_norm: str | None = "instance",
        final_target_norm: str | None = None,
        decoder: nn.Module | None = None,  # None: ConvDecoder1d audio base (4 x 384, kernel 7, 16 groups)
        block_adjust: float = 0.05,  # fairseq mask_prob_adjust: audio 0.05, image 0.07, text 0
        mask_noise_std: float = 0.01,
        decoder_input_dropout: float = 0.1,  # fairseq decoder.input_dropout: audio and text 0.1, image 0
        loss_scale: float | None = None,  # None: 1 / sqrt(D) (audio); text 1
        ema_decay: float = 0.999,  # audio: 0.999 -> 0.99999 over 75 k updates
        ema_end_decay: float = 0.99999,
        ema_anneal_steps: int = 75_000,
        teacher_embeds: bool = False,  # fairseq ema_local_encoder (audio false; image true)
        ema_blocks_only: bool = False,  # fairseq ema_encoder_only (text): positions and input LN copied
        min_target_var: float = 0.1,
        min_pred_var: float = 0.01,
        var_guard_after_steps: int = 5_000,
        short_utterances: str = "drop",
        init_from: str | None = None,
        **base,
    ) -> None:
        super().__init__(**base)
        if clone_batch < 1:
            raise ValueError(f"clone_batch must be >= 1, got {clone_batch}")
        if target_source not in ("ffn", "layers"):
            raise ValueError(f"target_source must be 'ffn' or 'layers', got {target_source!r}")
        if not 0.0 <= decoder_input_dropout < 1.0:
            raise ValueError(f"decoder_input_dropout must be in [0, 1), got {decoder_input_dropout}")
        if teacher_embeds and ema_blocks_only:
            raise ValueError("teacher_embeds (the teacher embeds with its own averaged weights) and ema_blocks_only "
                             "(it embeds with the student's) exclude each other")
        if not 1 <= top_k <= encoder.num_layers:
            raise ValueError(f"top_k must be in [1, {encoder.num_layers}] for this encoder, got {top_k}")
        min_frames = check_span_args(mask_prob, mask_length, 0, min_frames=2 * mask_length)
        self.short = ShortUtteranceFilter(min_frames, short_utterances)
        if init_from:
            load_encoder_weights(encoder, init_from)
        # the student sees visible tokens only, so the mask embedding is never used: frozen, so that no
        # unused parameter reaches DDP's reducer (and the optimizer)
        encoder.mask_emb.requires_grad_(False)
        self.encoder, self.modality = encoder, modality
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.clone_batch, self.top_k, self.target_source = clone_batch, top_k, target_source
        self.decoder_input_dropout = decoder_input_dropout
        self.target_norm, self.final_target_norm = target_norm, final_target_norm
        self.mask_noise_std, self.teacher_embeds = mask_noise_std, teacher_embeds
        self.loss_scale = 1.0 / math.sqrt(encoder.dim) if loss_scale is None else loss_scale
        self.block_adjust = block_adjust
        self.decoder = ConvDecoder1d(in_dim=encoder.dim) if decoder is None else decoder
        if not teacher_embeds:
            check_teacher_input(encoder)
        copy = () if teacher_embeds else STUDENT_KEYS
        if ema_blocks_only:  # the trunk's input LayerNorm (post-LN: the embedding LayerNorm) and the positions
            copy += ("positions.",) + (() if encoder.trunk.pre_norm else ("trunk.norm.",))
        self.teacher = EMATeacher(encoder, decay_start=ema_decay, decay_end=ema_end_decay,
                                  anneal_steps=ema_anneal_steps, skip=() if teacher_embeds else FRONT_KEYS,
                                  copy=copy)
        self.guards = VarianceGuards(min_target=min_target_var, min_pred=min_pred_var,
                                     after_steps=var_guard_after_steps)

    @torch.no_grad()
    def targets(self, tokens: Tokens, x: Tensor, lengths: Tensor | None) -> Tensor:
        """One teacher pass over the B unmasked samples -> targets (B, N, D) fp32 (top-K FFN or block outputs)."""
        if self.teacher_embeds:
            tokens = self.teacher.module.embed(x, lengths)
        else:
            tokens = tokens._replace(x=tokens.x.detach())
        return self.teacher.targets(tokens, top_k=self.top_k, norm=self.target_norm, final_norm=self.final_target_norm,
                                    num_prefix=self.encoder.num_prefix, source=self.target_source)

    def step(self, batch: Batch) -> StepOutput:
        batch, dropped = self.short(batch, self.modality, self.encoder)
        x, lengths = batch.inputs[self.modality], batch.lengths.get(self.modality)
        tokens = self.encoder.embed(x, lengths)
        b, n, d = tokens.x.shape
        m = self.clone_batch
        target = self.targets(tokens, x, lengths).repeat_interleave(m, 0)  # (B·M, N, D)

        xs = tokens.x.repeat_interleave(m, 0)
        pad = None if tokens.padding_mask is None else tokens.padding_mask.repeat_interleave(m, 0)
        clones = Tokens(xs, pad, xs, tokens.grid, None)
        g = self.generator(x.device)
        if tokens.grid is not None:
            # the same kept count in every row; grid masks may keep or mask padded patches
            keep = inverse_block_mask(tokens.grid, b * m, mask_prob=self.mask_prob, block=self.mask_length,
                                      adjust=self.block_adjust, generator=g, device=x.device)
            mask = ~keep
        else:  # int(T·p) of each row's valid frames masked; padding kept to equalize the kept counts
            mask = block_mask_1d((b * m, n), padding_mask=pad, mask_prob=self.mask_prob, span=self.mask_length,
                                 adjust=self.block_adjust, generator=g, device=x.device)
            keep = equal_keep(mask, pad)
        # kept padding stays padding; masked (or dropped) padding is never regressed
        if pad is not None:
            mask = mask & ~pad
        out = self.encoder.encode(clones, keep=keep)
        visible = out.last[:, self.encoder.num_prefix:]  # (B·M, K, D)
        if self.decoder_input_dropout > 0:
            visible = dropout(visible, self.decoder_input_dropout, self.training)
        full = torch.randn(b * m, n, d, device=x.device, dtype=visible.dtype,
                           generator=g) * self.mask_noise_std
        full = full.masked_scatter(keep[..., None], visible)
        pred = self.decoder(full, pad, tokens.grid)  # (B·M, N, D)

        pred_m, target_m = pred[mask], target[mask]
        count = mask.sum()
        loss_sum = regression_loss(pred_m, target_m, beta=0.0, scale=self.loss_scale)
        valid = n * b if tokens.padding_mask is None else int((~tokens.padding_mask).sum())
        metrics = monitors(pred=pred_m, target=target_m,
                           loss_vs_zero=loss_vs_zero(loss_sum, target_m, beta=0.0, scale=self.loss_scale),
                           ema_decay=self.teacher.decay, masked_frac=float(count) / max(valid * m, 1), dropped=dropped,
                           guards=self.guards if self.training and self.attached else None, step=self.global_step,
                           reduce=self.reducer(),
                           var_target=target[::m][mask[::m]])  # target_var over each sample's targets once
        return StepOutput(self.normalize(loss_sum, count), metrics, b)
