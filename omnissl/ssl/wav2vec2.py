"""wav2vec 2.0: contrastive prediction of quantized latent speech units (Baevski et al. 2020).

    audio -> conv features z (B, N, C) -> LayerNorm -> [quantizer -> project_q]  = targets q  (masked frames)
                                        -> proj -> span mask -> trunk -> final_proj = context c (masked frames)
    loss = Σ_masked InfoNCE(c_t, q_t | K distractors) + 0.1·diversity·S + 10·mean(z²)·S,   S = #masked frames

divided by the global number of masked frames (fairseq `wav2vec_criterion`). Legend: B batch, T samples,
N frames, M masked frames per row, C conv width, D trunk width, E final_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.batch import Batch
from omnissl.ops import Dropout
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.frames import ShortUtteranceFilter
from omnissl.ssl.losses import contrastive_with_distractors, feature_penalty
from omnissl.ssl.masking import check_span_args, span_mask
from omnissl.ssl.monitors import CollapseGuard
from omnissl.ssl.quantizer import GumbelQuantizer


class Wav2Vec2(SSLModule):
    """wav2vec 2.0 pretraining on an injected audio `Encoder` (conv frontend, `samples_per_token` 320).

    Defaults are the BASE setting (Baevski et al. 2020, sec. 4.2 and Table 1; fairseq
    `examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml`); LARGE changes final_dim 768,
    min_temp 0.1, feature_penalty_weight 0, feature_grad_mult 1.0, dropout_features 0.

    short_utterances: rows with fewer than `min_frames` encoder frames (masking needs room for its spans,
    the conv stack for its 400-sample receptive field) are dropped and counted ("drop"), or stop the run
    naming their sample ids ("raise"). min_code_perplexity / collapse_patience_steps: stop the run when the
    code perplexity (how many codebook entries the frames actually select, by argmax: G when every frame of a
    group picks the same entry) stays below the threshold for that many optimizer steps (<= 0 disables).
    prob_perplexity (of the averaged softmax) is no collapse signal: on all-silent input it stayed at its
    maximum while every frame chose one code per group (reliability review, 2026-12).

    Metrics: contrastive_bits (the contrastive loss per masked frame, in bits, as fairseq reports it),
    accuracy (masked frames whose positive beats every distractor), diversity, code_perplexity,
    prob_perplexity, temp, masked_frac (masked / valid frames), feature_pen, dropped_short (when any).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        final_dim: int = 256,  # base: final_dim 256 (fairseq base config)
        mask_prob: float = 0.65,  # sec. 4.2: p = 0.065 of starts x 10 -> ~49 % of frames masked
        mask_length: int = 10,
        min_spans: int = 2,  # fairseq apply_mask: min_masks=2
        num_distractors: int = 100,  # sec. 4.2: K = 100
        logit_temp: float = 0.1,  # κ
        codebook_groups: int = 2,  # sec. 4.2: G = 2, V = 320
        codebook_entries: int = 320,
        vq_dim: int | None = None,  # None: final_dim (fairseq latent_dim 0)
        max_temp: float = 2.0,  # sec. 4.2: τ annealed 2 -> 0.5 by 0.999995 per update (large: -> 0.1)
        min_temp: float = 0.5,
        temp_decay: float = 0.999995,
        diversity_weight: float = 0.1,  # α = 0.1 (sec. 4.2)
        feature_penalty_weight: float = 10.0,  # fairseq base loss_weights [0.1, 10]; large [0.1, 0]
        feature_grad_mult: float = 0.1,  # base 0.1, large 1.0
        dropout_features: float = 0.1,  # base 0.1, large 0
        min_frames: int | None = None,  # None: mask_length
        short_utterances: str = "drop",
        min_code_perplexity: float = 4.0,  # collapse: ~G = 2 (one code per group, fairseq#1850, transformers#14387)
        collapse_patience_steps: int = 2000,
        **base,
    ) -> None:
        super().__init__(**base)
        if num_distractors < 1:
            raise ValueError(f"num_distractors must be >= 1, got {num_distractors}: without distractors the "
                             "contrastive task is trivial (accuracy 1, loss 0) and nothing is learned")
        self.short = ShortUtteranceFilter(check_span_args(mask_prob, mask_length, min_spans, min_frames=min_frames),
                                          short_utterances)
        self.encoder = encoder
        self.mask_prob, self.mask_length, self.min_spans = mask_prob, mask_length, min_spans
        self.num_distractors, self.logit_temp = num_distractors, logit_temp
        self.diversity_weight, self.feature_penalty_weight = diversity_weight, feature_penalty_weight
        self.feature_grad_mult = feature_grad_mult
        vq_dim = final_dim if vq_dim is None else vq_dim
        self.quantizer = GumbelQuantizer(
            in_dim=encoder.frontend.out_dim, vq_dim=vq_dim, groups=codebook_groups, entries=codebook_entries,
            max_temp=max_temp, min_temp=min_temp, temp_decay=temp_decay,
        )
        self.project_q = nn.Linear(vq_dim, final_dim)
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.dropout_features = Dropout(dropout_features)
        self.collapse_guard = CollapseGuard(
            name="code_perplexity (codebook entries in use, by argmax over the valid frames)",
            threshold=min_code_perplexity,
            patience=collapse_patience_steps,
            remedies="check the input (all-silent or constant audio gives one code per group); lower the "
            "learning rate or lengthen its warmup; raise diversity_weight; keep "
            "feature_grad_mult at 0.1 with the group-norm extractor (base); use a larger batch "
            "(max_tokens / accumulate_grad_batches, the paper uses ~1.6 h of audio per update).",
        )

    def checkpoint_metadata(self) -> dict:
        """What a Hugging Face Wav2Vec2ForPreTraining export needs beyond the weights (omnissl export --hf)."""
        step = self.global_step if self.attached else 0
        # τ of the next update (the one a resumed run or a continued HF run starts from)
        return {"gumbel_temperature": self.quantizer.temperature_at(step), "dropout_features": self.dropout_features.p,
                "num_distractors": self.num_distractors, "logit_temp": self.logit_temp,
                "diversity_weight": self.diversity_weight}

    def step(self, batch: Batch) -> StepOutput:
        batch, dropped = self.short(batch, "audio", self.encoder)
        x, lengths = batch.inputs["audio"], batch.lengths["audio"]

        tokens = self.encoder.embed(x, lengths, grad_scale=self.feature_grad_mult)
        b, n, _ = tokens.x.shape
        g = self.generator(x.device)
        mask = span_mask((b, n), padding_mask=tokens.padding_mask, mask_prob=self.mask_prob, span=self.mask_length,
                         min_spans=self.min_spans, same_count=True, generator=g, device=x.device)
        m = int(mask[0].sum())
        if m < 2:
            ids = [] if batch.ids is None else batch.ids.tolist()
            raise ValueError(f"only {m} masked frame(s) per row for samples {ids}: too short for distractors")
        out = self.encoder.encode(tokens, mask=mask)

        # each row's m masked positions, ascending: what x[mask] selects, but a gather needs no host sync
        # (boolean indexing waits for the device to count the selected elements, twice per step)
        pos = mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :m, None]  # (B, M, 1)
        context = self.final_proj(out.last.gather(1, pos.expand(-1, -1, out.last.shape[-1])))  # (B, M, E)
        feats = self.dropout_features(tokens.features.gather(1, pos.expand(-1, -1, tokens.features.shape[-1])))
        q = self.quantizer(feats, generator=g)
        target = self.project_q(q.quantized)  # (B, M, E)
        loss_sum, count, correct = contrastive_with_distractors(
            context, target, num_distractors=self.num_distractors, temperature=self.logit_temp, generator=g
        )
        num_codes = self.quantizer.num_codes
        diversity = (num_codes - q.prob_perplexity) / num_codes
        total = loss_sum + self.diversity_weight * diversity * count
        pen = None
        if tokens.raw is not None:
            pen = feature_penalty(tokens.raw, tokens.padding_mask)
            if self.feature_penalty_weight:
                total = total + self.feature_penalty_weight * pen * count
        elif self.feature_penalty_weight:
            raise ValueError("feature_penalty_weight > 0 needs an encoder whose embed() returns Tokens.raw")

        if self.training and self.attached:
            ppl = q.code_perplexity.detach().float()
            reduce = self.reducer()
            if reduce is not None:
                ppl = reduce(ppl, reduce_op="mean")
            self.collapse_guard.update(float(ppl), self.global_step)

        valid = n * b if tokens.padding_mask is None else int((~tokens.padding_mask).sum())
        metrics: dict[str, Tensor | float] = {
            "contrastive_bits": loss_sum.detach() / count / math.log(2),
            "accuracy": correct.float() / count,
            "diversity": diversity.detach(),
            "code_perplexity": q.code_perplexity,
            "prob_perplexity": q.prob_perplexity.detach(),
            "temp": q.temperature,
            "masked_frac": m * b / max(valid, 1),
        }
        if pen is not None:
            metrics["feature_pen"] = pen.detach()
        if dropped:
            metrics["dropped_short"] = float(dropped)
        return StepOutput(self.normalize(total, count), metrics, b)
