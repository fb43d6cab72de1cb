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
import torch.nn.functional as F
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.batch import Batch
from omnissl.checkpoints import load_encoder_weights
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.masking import block_mask, span_mask
from omnissl.ssl.targets import CollapseGuard, EMATeacher, maskable_batch, top_k_targets

# Parts of the teacher's Encoder copy it never runs: it is fed the student's projected features
# (fairseq `ema_transformer_only`), so only positions and trunk take part in the average.
FRONT_KEYS = ("frontend.", "feature_norm.", "proj.", "mask_emb", "cls_token")


def compute_var(y: Tensor, module: SSLModule | None = None) -> Tensor:
    """fairseq `compute_var`: per-dimension std over all rows (global over ranks when distributed), averaged
    over dimensions. y (..., D) -> scalar, fp32, no grad."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if module is not None and module._trainer is not None and module.trainer.world_size > 1:
        reduce = module.trainer.strategy.reduce
        zc = reduce(torch.tensor(float(y.shape[0]), device=y.device), reduce_op="sum")
        zs = reduce(y.sum(0), reduce_op="sum")
        zss = reduce(y.pow(2).sum(0), reduce_op="sum")
        var = zss / (zc - 1) - zs.pow(2) / (zc * (zc - 1))
        return torch.sqrt(var + 1e-6).mean()
    if y.shape[0] < 2:
        return torch.zeros((), device=y.device)
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float) -> Tensor:
    """Summed over positions and channels, in fp32: L2 (beta 0) or Smooth-L1(beta), times `scale`."""
    p, t = pred.float(), target.float()
    if beta == 0:
        err = F.mse_loss(p, t, reduction="none")
    else:
        err = F.smooth_l1_loss(p, t, reduction="none", beta=beta)
    return err.sum() * scale


@torch.no_grad()
def loss_vs_zero(loss_sum: Tensor, target: Tensor, *, beta: float, scale: float) -> Tensor:
    """The regression loss relative to predicting zeros, the per-sample mean of normalized targets (< 1: the
    student predicts more than the trivial answer; a shrinking-prediction phase alone cannot bring it below 1)."""
    zero = regression_loss(torch.zeros_like(target), target, beta=beta, scale=scale)
    return loss_sum.detach().float() / zero.clamp(min=1e-12)


def maskable_inputs(module: SSLModule, batch: Batch) -> tuple[Tensor, Tensor | None, int]:
    """The objective's input, lengths and the number of utterances dropped as too short to mask (both data2vec
    versions: `module.modality`, `.encoder`, `.min_frames`, `.short_utterances`)."""
    batch, dropped = maskable_batch(batch, module.modality, module.encoder, module.min_frames,
                                    policy=module.short_utterances)
    return batch.inputs[module.modality], batch.lengths.get(module.modality), dropped


def monitors(module: SSLModule, *, pred: Tensor, target: Tensor, loss_sum: Tensor, beta: float, scale: float,
             masked_frac: float, dropped: int, var_target: Tensor | None = None) -> dict[str, Tensor | float]:
    """The collapse monitors both data2vec versions log, with the variance guards applied during training:
    target_var / pred_var (fairseq `compute_var`; var_target: the rows to measure the targets on, default
    `target`), ema_decay, masked_frac, loss_vs_zero and, when utterances were dropped, dropped_short."""
    target_var = compute_var(target if var_target is None else var_target, module)
    pred_var = compute_var(pred, module)
    if module.training and module._trainer is not None:
        module.guards.check(float(target_var), float(pred_var), module.global_step)
    metrics: dict[str, Tensor | float] = {
        "target_var": target_var,
        "pred_var": pred_var,
        "ema_decay": module.teacher.decay,
        "masked_frac": masked_frac,
        "loss_vs_zero": loss_vs_zero(loss_sum, target, beta=beta, scale=scale),
    }
    if dropped:
        metrics["dropped_short"] = float(dropped)
    return metrics


class VarianceGuards:
    """fairseq's data2vec collapse check: after `after_steps` updates, stop when target_var < min_target or
    pred_var < min_pred (<= 0 disables one)."""

    REMEDIES = ("lower the learning rate or lengthen the warmup (fairseq#4177: 7.5e-4 -> 5e-4), check the "
                "precision and batch size (bf16 / smaller batches have collapsed data2vec-family teachers), "
                "and keep instance-normed targets.")

    def __init__(self, *, min_target: float, min_pred: float, after_steps: int) -> None:
        self.after = after_steps
        self.target = CollapseGuard(name="target_var (std of the teacher targets)", threshold=min_target,
                                    patience=0, remedies=self.REMEDIES)
        self.pred = CollapseGuard(name="pred_var (std of the student predictions)", threshold=min_pred,
                                  patience=0, remedies=self.REMEDIES)

    def check(self, target_var: float, pred_var: float, step: int) -> None:
        if step < self.after:
            return
        self.target.update(target_var, step)
        self.pred.update(pred_var, step)


def regression_head(dim: int, layers: int) -> nn.Module:
    """data2vec's `final_proj`: Linear(D, D) (audio), or layers-1 x [Linear(d, 2d), GELU] then Linear(., D)
    (text, head_layers 2)."""
    mods: list[nn.Module] = []
    cur = dim
    for _ in range(layers - 1):
        mods += [nn.Linear(cur, 2 * cur), nn.GELU()]
        cur *= 2
    mods.append(nn.Linear(cur, dim))
    return nn.Sequential(*mods) if len(mods) > 1 else mods[0]


def check_teacher_in_checkpoint(checkpoint: dict, name: str) -> None:
    state = checkpoint.get("state_dict", {})
    if not any(k.startswith("teacher.") for k in state):
        raise ValueError(
            f"this checkpoint has no EMA teacher ('teacher.*' weights), so {name} cannot resume from it (it "
            "was probably written by another objective). To start from its encoder instead, pass it as "
            "--model.init_args.init_from <ckpt> and train without ckpt_path."
        )


class Data2Vec(SSLModule):
    """data2vec v1 on an injected `Encoder` of any modality (masking by `mask=`, i.e. a learned mask embedding).

    Defaults: audio BASE (Baevski et al. 2022, sec. 4.2; fairseq
    `examples/data2vec/config/audio/pretraining/base_librispeech.yaml`, REFERENCE §B.4): span mask p 0.65,
    length 10; top-8 FFN outputs (before the last residual), instance-normed; Linear head; L2 / √D;
    EMA 0.999 -> 0.9999 over 30 k updates; guards target_var >= 0.1, pred_var >= 0.01 after 5 k updates.
    Text base: mask_prob 0.35, mask_length 4, top_k 10, target_source "layers", target_norm "layer",
    head_layers 2, loss_beta 4, loss_scale 1, anneal 300 k.

    The teacher is an EMA copy of the encoder fed the student's unmasked tokens (fairseq
    `ema_transformer_only`: the conv frontend, feature norm and projection are the student's, run once);
    ema_layers_only copies the positional conv from the student instead of averaging it (fairseq default).
    init_from: a checkpoint whose `encoder.*` weights start the student; the teacher starts as its copy.

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
        min_spans: int = 2,
        top_k: int = 8,  # audio K = 8; text K = 10
        target_source: str = "ffn",  # audio: FFN output before the last residual; text/vision: "layers"
        target_norm: str | None = "instance",  # audio/vision instance norm; text "layer"
        final_target_norm: str | None = None,
        head_layers: int = 1,  # audio 1 (final_proj); text 2
        loss_beta: float = 0.0,  # 0: L2; text: Smooth-L1 with beta 4
        loss_scale: float | None = None,  # None: 1 / sqrt(D) (audio); text 1
        ema_decay: float = 0.999,  # audio: 0.999 -> 0.9999 over 30 k updates; text: over 300 k
        ema_end_decay: float = 0.9999,
        ema_anneal_steps: int = 30_000,
        ema_layers_only: bool = True,  # copy (not average) the positional conv (fairseq default)
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
        if not 0.0 < mask_prob < 1.0 or mask_length < 1:
            raise ValueError(f"need 0 < mask_prob < 1 and mask_length >= 1, got {mask_prob}, {mask_length}")
        if short_utterances not in ("drop", "raise"):
            raise ValueError(f"short_utterances must be 'drop' or 'raise', got {short_utterances!r}")
        if init_from:
            load_encoder_weights(encoder, init_from)
        self.encoder, self.modality = encoder, modality
        self.mask_prob, self.mask_length, self.min_spans = mask_prob, mask_length, min_spans
        self.top_k, self.target_source = top_k, target_source
        self.target_norm, self.final_target_norm = target_norm, final_target_norm
        self.loss_beta = loss_beta
        self.loss_scale = 1.0 / math.sqrt(encoder.dim) if loss_scale is None else loss_scale
        self.short_utterances, self.dropped_short = short_utterances, 0
        self.min_frames = max(min_spans + 1, mask_length)
        self.head = regression_head(encoder.dim, head_layers)
        self.teacher = EMATeacher(encoder, decay_start=ema_decay, decay_end=ema_end_decay,
                                  anneal_steps=ema_anneal_steps, skip=FRONT_KEYS,
                                  copy=("positions.",) if ema_layers_only else ())
        self.guards = VarianceGuards(min_target=min_target_var, min_pred=min_pred_var,
                                     after_steps=var_guard_after_steps)

    # --- the objective ------------------------------------------------------------------------------------

    @torch.no_grad()
    def targets(self, tokens) -> Tensor:
        """Teacher targets (B, N, D) fp32 from the student's unmasked tokens.

        NOTE(ref): fairseq (`ema_transformer_only`) feeds the teacher the projected features before the
        student's `dropout_input`; `Encoder.embed` applies that dropout inside, so our teacher sees the
        student's tokens after it (p 0.1 in audio_base; 0 in `tiny`). Re-projecting `tokens.features` would
        undo it but calls a submodule outside the sharded entry points (FSDP2), so we accept the difference.
        """
        tokens = tokens._replace(x=tokens.x.detach())
        out = self.teacher.module.encode(tokens, return_layers="ffn" if self.target_source == "ffn" else True)
        layers = out.ffn if self.target_source == "ffn" else out.layers[1:]  # block outputs, not the input
        p = self.encoder.num_prefix
        layers = [h[:, p:] for h in layers]
        return top_k_targets(layers, self.top_k, norm=self.target_norm, final_norm=self.final_target_norm,
                             padding_mask=tokens.padding_mask)

    def step(self, batch: Batch) -> StepOutput:
        x, lengths, dropped = maskable_inputs(self, batch)
        self.dropped_short += dropped
        tokens = self.encoder.embed(x, lengths)
        b, n, _ = tokens.x.shape
        gen = self.generator(x.device)
        if tokens.grid is not None:  # patch grids (images): block-wise masks of mask_length x mask_length squares
            mask = block_mask(tokens.grid, b, mask_prob=self.mask_prob, block=self.mask_length, generator=gen,
                              device=x.device)  # over the patches; the CLS token is added later, never masked
        else:
            mask = span_mask((b, n), padding_mask=tokens.padding_mask, mask_prob=self.mask_prob,
                             span=self.mask_length, min_spans=self.min_spans, same_count=True, generator=gen,
                             device=x.device)
        out = self.encoder.encode(tokens, mask=mask)
        target = self.targets(tokens)[mask]  # (B·M, D)
        pred = self.head(out.last[:, self.encoder.num_prefix:][mask])  # (B·M, D)
        count = mask.sum()
        loss_sum = regression_loss(pred, target, beta=self.loss_beta, scale=self.loss_scale)

        valid = n * b if tokens.padding_mask is None else int((~tokens.padding_mask).sum())
        metrics = monitors(self, pred=pred, target=target, loss_sum=loss_sum, beta=self.loss_beta,
                           scale=self.loss_scale, masked_frac=float(count) / max(valid, 1), dropped=dropped)
        return StepOutput(self.normalize(loss_sum, count), metrics, b)

    # --- checkpoints and sharding ---------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_teacher_in_checkpoint(checkpoint, type(self).__name__)

    def configure_model(self) -> None:
        """As SSLModule, then shard the teacher's copy like the student (its parameters do not require
        grad, so the base class leaves it whole), so the EMA update runs shard by shard."""
        super().configure_model()
        shard_teacher(self)


def shard_teacher(module: SSLModule) -> None:
    if module._trainer is None or type(module.trainer.strategy).__name__ != "ModelParallelStrategy":
        return
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(module.teacher.module, mesh=module.device_mesh["data_parallel"])
    for method in ("embed", "encode"):
        register_fsdp_forward_method(module.teacher.module, method)
