"""HuBERT: masked prediction of offline cluster units (Hsu et al. 2021).

    audio -> conv features -> LayerNorm -> proj -> span mask -> trunk -> final_proj (one slice per label set)
    logits_t = cos(final_proj(h_t), e_c) / 0.1 for every cluster embedding e_c, CE with the frame's unit
    loss = 1.0·Σ_masked CE + 0.0·Σ_unmasked CE + 10·mean(z²)·S,   S = #frames in the weighted sums

divided by the global S (fairseq `hubert_criterion`). Units are data: `batch.targets["units"]` (B, F) int64
at the encoder frame rate (`samples_per_token`, 20 ms), padded with -100, made by `omnissl hubert-units`.
Legend: B batch, N frames, D trunk width, E final_dim, K clusters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.batch import IGNORE_INDEX, Batch
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.frames import ShortUtteranceFilter
from omnissl.ssl.heads import LabelEmbeddings
from omnissl.ssl.losses import cosine_cross_entropy, feature_penalty
from omnissl.ssl.masking import check_span_args, span_mask
from omnissl.ssl.targets import align_units


class HuBERT(SSLModule):
    """HuBERT pretraining on an injected audio `Encoder`.

    label_keys / num_classes: the `batch.targets` entries to predict and their cluster counts (one
    final_proj slice and one set of label embeddings each, fairseq `untie_final_proj: true`). Defaults are
    HuBERT BASE iteration 1 (Hsu et al. 2021, sec. 4.2; fairseq `hubert_base_librispeech.yaml`): K = 100
    MFCC clusters; iteration 2 uses K = 500 clusters of layer-6 features.

    align_tolerance: units and encoder frames of an utterance may differ by this many frames (conv edge
    effects); more is an error naming the sample ids. The unit files themselves are checked against the
    audio by the data module (AudioDataModule: one line per manifest line, units per item within 0.1 s).

    Metrics: loss_m / loss_u (cross-entropy per masked / unmasked frame, nats), acc_m / acc_u (masked and
    unmasked accuracy; the model sees unmasked frames, so acc_u should lead acc_m: the reverse signalled an
    initialization bug in torchaudio's reproduction, pytorch/audio#2716), feature_pen, masked_frac,
    dropped_short (when any). With several label sets each key gets a `_<label key>` suffix.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        num_classes: int | list[int] = 100,  # iteration 1: 100 MFCC clusters; iteration 2: 500 (sec. 4.2)
        label_keys: list[str] | None = None,  # None: ["units"]
        final_dim: int = 256,  # base final_dim 256 (large 768, x-large 1024)
        mask_prob: float = 0.8,  # sec. 4.2: p = 8 % of frames start a span of 10
        mask_length: int = 10,
        min_spans: int = 2,  # fairseq apply_mask: min_masks=2
        same_count: bool = True,  # fairseq compute_mask_indices(require_same_masks=True)
        logit_temp: float = 0.1,  # τ of the cosine logits
        masked_weight: float = 1.0,  # α = 1: masked frames only (sec. 3.2, pred_masked_weight)
        unmasked_weight: float = 0.0,  # pred_nomask_weight
        feature_penalty_weight: float = 10.0,  # fairseq base loss_weights [10]
        feature_grad_mult: float = 0.1,  # base 0.1
        align_tolerance: int = 2,
        min_frames: int | None = None,  # None: mask_length
        short_utterances: str = "drop",
        **base,
    ) -> None:
        super().__init__(**base)
        keys = list(label_keys) if label_keys is not None else ["units"]
        classes = [num_classes] * len(keys) if isinstance(num_classes, int) else list(num_classes)
        if len(classes) != len(keys):
            raise ValueError(f"num_classes {classes} must give one count per label key {keys}")
        if masked_weight <= 0 and unmasked_weight <= 0:
            raise ValueError("at least one of masked_weight and unmasked_weight must be positive")
        self.short = ShortUtteranceFilter(check_span_args(mask_prob, mask_length, min_spans, min_frames=min_frames),
                                          short_utterances)
        self.encoder, self.label_keys, self.num_classes = encoder, keys, classes
        self.final_dim = final_dim
        self.mask_prob, self.mask_length, self.min_spans = mask_prob, mask_length, min_spans
        self.same_count = same_count
        self.logit_temp = logit_temp
        self.masked_weight, self.unmasked_weight = masked_weight, unmasked_weight
        self.feature_penalty_weight, self.feature_grad_mult = feature_penalty_weight, feature_grad_mult
        self.align_tolerance = align_tolerance
        self.final_proj = nn.Linear(encoder.dim, final_dim * len(keys))
        # NOTE(ref): fairseq sizes `label_embs_concat` by len(Dictionary), which also counts the 4 special symbols
        # (<s>, <pad>, </s>, <unk>) that are never targets, so its softmax runs over K + 4 entries; ours over the K
        # clusters. Measured on audio_base at init (4 x 2 s, uniform label embeddings): the cross-entropy is
        # 0.039 nats higher with the 4 extra rows for K = 100 and 0.008 for K = 500 (log(1 + 4/K)); the extra rows
        # only ever get pushed away from the predictions, so the gap shrinks with training, and the K-row table
        # exports without rows that name no cluster.
        self.label_embs = LabelEmbeddings(classes, final_dim)  # fairseq `label_embs_concat`, uniform init

    # --- the objective -----------------------------------------------------------------------------------

    def _labels(self, batch: Batch, frames: Tensor, n: int) -> tuple[list[Tensor], Tensor]:
        labels, keep = [], frames
        for key, k in zip(self.label_keys, self.num_classes):
            if key not in batch.targets:
                raise KeyError(f"HuBERT needs batch.targets[{key!r}] (frame-level units); the data module gave "
                               f"{sorted(batch.targets)}: point it at the unit files (omnissl hubert-units)")
            lab, kept = align_units(batch.targets[key].to(frames.device), frames, n,
                                    tolerance=self.align_tolerance, ids=batch.ids)
            bad = ((lab >= k) | ((lab < 0) & (lab != IGNORE_INDEX))).any(1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().cpu()
                names = rows.tolist() if batch.ids is None else batch.ids.cpu()[rows].tolist()
                raise ValueError(f"batch.targets[{key!r}] holds unit ids outside [0, {k}) (num_classes) for "
                                 f"samples {names}")
            labels.append(lab)
            keep = torch.minimum(keep, kept)
        return labels, keep

    def step(self, batch: Batch) -> StepOutput:
        batch, dropped = self.short(batch, "audio", self.encoder)
        x, lengths = batch.inputs["audio"], batch.lengths["audio"]

        tokens = self.encoder.embed(x, lengths, grad_scale=self.feature_grad_mult)
        b, n, _ = tokens.x.shape
        frames = n - tokens.padding_mask.sum(1) if tokens.padding_mask is not None else torch.full(
            (b,), n, dtype=torch.long, device=x.device)
        labels, keep = self._labels(batch, frames, n)
        # frames past the last unit (of any label set) are padding from here on (fairseq trims features to
        # the labels)
        pad = torch.arange(n, device=x.device)[None] >= keep[:, None]
        labels = [lab.masked_fill(pad, IGNORE_INDEX) for lab in labels]
        tokens = tokens._replace(padding_mask=pad if bool(pad.any()) else None)

        mask = span_mask((b, n), padding_mask=tokens.padding_mask, mask_prob=self.mask_prob, span=self.mask_length,
                         min_spans=self.min_spans, same_count=self.same_count, generator=self.generator(x.device),
                         device=x.device)
        out = self.encoder.encode(tokens, mask=mask)
        valid = ~pad
        masked, unmasked = mask & valid, ~mask & valid

        total = torch.zeros((), device=x.device)
        sample_size = torch.zeros((), device=x.device)
        metrics: dict[str, Tensor | float] = {}
        sets = len(self.label_keys)
        for name, sel, weight in (("m", masked, self.masked_weight), ("u", unmasked, self.unmasked_weight)):
            # frames with weight 0 are only scored for the accuracy metrics: no graph for them
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                preds = self.final_proj(out.last[sel]).chunk(sets, dim=-1)  # per label set (P, E)
                embs = self.label_embs()
                for i, key in enumerate(self.label_keys):
                    loss_sum, count, correct = cosine_cross_entropy(preds[i], embs[i], labels[i][sel],
                                                                    temperature=self.logit_temp)
                    if weight > 0:
                        total = total + weight * loss_sum
                        if i == 0:  # fairseq: sample_size counts the frames once, not per label set
                            sample_size = sample_size + count
                    suffix = "" if sets == 1 else f"_{key}"
                    metrics[f"loss_{name}{suffix}"] = loss_sum.detach() / count.clamp(min=1)
                    metrics[f"acc_{name}{suffix}"] = correct.float() / count.clamp(min=1)

        pen = None
        if tokens.raw is not None:
            pen = feature_penalty(tokens.raw, tokens.padding_mask)  # over the frames kept above
            if self.feature_penalty_weight:
                total = total + self.feature_penalty_weight * pen * sample_size
        elif self.feature_penalty_weight:
            raise ValueError("feature_penalty_weight > 0 needs an encoder whose embed() returns Tokens.raw")

        metrics["masked_frac"] = masked.sum() / valid.sum().clamp(min=1)
        if pen is not None:
            metrics["feature_pen"] = pen.detach()
        if dropped:
            metrics["dropped_short"] = float(dropped)
        return StepOutput(self.normalize(total, sample_size), metrics, b)
