"""Target makers shared by objectives: the Gumbel vector quantizer (wav2vec 2.0), frame-level unit
targets (HuBERT's k-means units), and the frame bookkeeping and collapse watch of frame-level audio
objectives.

Legend: B batch, N frames, C input width, G codebook groups, V entries per group, F unit frames.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from omnissl.backbones.frontends import conv_output_lengths
from omnissl.batch import IGNORE_INDEX, Batch
from omnissl.ops import masked_instance_norm


def perplexity(probs: Tensor, valid: Tensor | None = None) -> Tensor:
    """Sum over groups of exp(entropy of the frame-averaged distribution).

    probs (P, G, V) per-frame distributions (soft or one-hot), valid (P,) bool or None -> scalar in [G, G·V].
    Uniform use of all entries gives G·V; one entry per group gives G (collapse).
    """
    if valid is None:
        avg = probs.mean(0)
    else:
        w = valid.to(probs.dtype)[:, None, None]
        avg = (probs * w).sum(0) / w.sum().clamp(min=1.0)
    return torch.exp(-(avg * torch.log(avg + 1e-7)).sum(-1)).sum()


class QuantizerOutput(NamedTuple):
    """quantized (B, N, vq_dim); codes (B, N, G) int64 selected entries; code_perplexity from hard (argmax)
    counts and prob_perplexity from the averaged softmax, both over valid frames; temperature in use."""

    quantized: Tensor
    codes: Tensor
    code_perplexity: Tensor
    prob_perplexity: Tensor
    temperature: float


class GumbelQuantizer(nn.Module):
    """Product quantizer with a straight-through Gumbel softmax (Baevski et al. 2020, sec. 2; fairseq
    `GumbelVectorQuantizer`).

    Each frame picks one of V entries in each of G codebooks through logits `weight_proj(x)` (Linear C->G·V,
    N(0, 1) weights, zero bias); the selected entries (dim vq_dim / G each, uniform init) are concatenated.
    Training: hard Gumbel-softmax sample at temperature τ, gradients through the soft sample; eval: argmax.
    τ(n) = max(max_temp · decay^n, min_temp), set per optimizer step by `set_num_updates(n)`.
    All of it runs in fp32 with autocast disabled, whatever the surrounding precision.

    Defaults: wav2vec 2.0 BASE (G=2, V=320, vq_dim = final_dim = 256, latent_temp (2, 0.5, 0.999995);
    paper sec. 4.2 / fairseq `wav2vec2_base_librispeech.yaml`). LARGE uses (2, 0.1, 0.999995).
    """

    def __init__(
        self,
        *,
        in_dim: int = 512,
        vq_dim: int = 256,
        groups: int = 2,
        entries: int = 320,
        max_temp: float = 2.0,
        min_temp: float = 0.5,
        temp_decay: float = 0.999995,
    ) -> None:
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by the number of groups {groups}")
        if not 0.0 < min_temp <= max_temp:
            raise ValueError(f"need 0 < min_temp ({min_temp}) <= max_temp ({max_temp})")
        self.groups, self.entries, self.vq_dim = groups, entries, vq_dim
        self.max_temp, self.min_temp, self.temp_decay = max_temp, min_temp, temp_decay
        self.weight_proj = nn.Linear(in_dim, groups * entries)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codebook = nn.Parameter(torch.empty(groups, entries, vq_dim // groups).uniform_())
        self.temperature = max_temp

    @property
    def num_codes(self) -> int:
        """G·V: the largest possible perplexity."""
        return self.groups * self.entries

    def temperature_at(self, num_updates: int) -> float:
        return max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def set_num_updates(self, num_updates: int) -> None:
        """Called once per optimizer step (SSLModule.on_train_batch_start): anneals τ."""
        self.temperature = self.temperature_at(num_updates)

    def logits(self, x: Tensor) -> Tensor:
        """x (B, N, C) -> fp32 logits (B·N, G, V)."""
        w, b = self.weight_proj.weight.float(), self.weight_proj.bias.float()
        return rearrange(F.linear(x.float(), w, b), "b n (g v) -> (b n) g v", g=self.groups)

    def gumbel_hard(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Straight-through hard Gumbel-softmax sample (P, G, V) of fp32 logits (Jang et al. 2017)."""
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        # u = 0 would give log(0) = -inf and NaNs downstream (optimum-graphcore#81); torch.rand < 1 already.
        gumbels = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
        soft = ((logits + gumbels) / self.temperature).softmax(-1)
        hard = F.one_hot(soft.argmax(-1), self.entries).to(soft.dtype)
        return hard - soft.detach() + soft

    def forward(
        self, x: Tensor, valid: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> QuantizerOutput:
        """x (B, N, C) features, valid (B, N) bool (True = a real frame) or None -> QuantizerOutput.

        Perplexities average over valid frames only; quantized frames at invalid positions are computed but
        meaningless. The output has x's dtype.
        """
        if x.dim() != 3:
            raise ValueError(f"quantizer input must be (B, N, C), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        if b * n == 0:
            raise ValueError("quantizer got no frames to quantize")
        flat_valid = None if valid is None else valid.reshape(-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.logits(x)  # (P, G, V) fp32
            probs = logits.softmax(-1)
            prob_ppl = perplexity(probs, flat_valid)
            argmax = logits.argmax(-1)
            with torch.no_grad():
                code_ppl = perplexity(F.one_hot(argmax, self.entries).float(), flat_valid)
            if self.training:
                onehot = self.gumbel_hard(logits, generator)
                codes = onehot.argmax(-1)
            else:
                onehot = F.one_hot(argmax, self.entries).float()
                codes = argmax
            q = torch.einsum("pgv,gvd->pgd", onehot, self.codebook.float())
        quantized = rearrange(q, "(b n) g d -> b n (g d)", b=b).to(x.dtype)
        codes = rearrange(codes, "(b n) g -> b n g", b=b)
        return QuantizerOutput(quantized, codes, code_ppl, prob_ppl, self.temperature)


# ---------------------------------------------------------------------------------------------------------
# Frame-level unit targets (HuBERT)


def unit_lengths(units: Tensor) -> Tensor:
    """(B, F) units padded with IGNORE_INDEX -> (B,) number of labelled frames per row."""
    return (units != IGNORE_INDEX).sum(1)


def align_units(
    units: Tensor,
    frames: Tensor,
    num_frames: int,
    *,
    tolerance: int = 2,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Align frame-level units to encoder frames (HuBERT, Hsu et al. 2021; fairseq `forward_targets`).

    units (B, F) int64 at the encoder frame rate, padded with IGNORE_INDEX; frames (B,) valid encoder frames
    per row; num_frames the padded encoder length N. Each row keeps min(frames, units) frames: frames past
    the last unit get IGNORE_INDEX (the caller treats them as padding, as fairseq trims them), units past
    the last frame are dropped. Rows whose counts differ by more than `tolerance` frames are an error
    naming the sample ids: the units were made for other audio or another frame rate.

    Returns (labels (B, N) int64 with IGNORE_INDEX where nothing is predicted, aligned lengths (B,)).
    """
    if units.dim() != 2:
        raise ValueError(f"units must be (B, F), got shape {tuple(units.shape)}")
    have = unit_lengths(units)
    diff = (have - frames).abs()
    bad = diff > tolerance
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        names = rows.tolist() if ids is None else ids[rows].tolist()
        raise ValueError(
            f"units and encoder frames disagree by more than {tolerance} frames for samples {names}: "
            f"{have[rows].tolist()} units vs {frames[rows].tolist()} frames; the unit file was made for other "
            "audio or another frame rate (units must be at the encoder's samples_per_token)"
        )
    keep = torch.minimum(have, frames)
    f = units.shape[1]
    labels = units[:, :num_frames] if f >= num_frames else F.pad(units, (0, num_frames - f), value=IGNORE_INDEX)
    pos = torch.arange(num_frames, device=units.device)[None]
    labels = labels.masked_fill(pos >= keep[:, None], IGNORE_INDEX)
    return labels, keep


# ---------------------------------------------------------------------------------------------------------
# Frame bookkeeping and collapse watch for frame-level audio objectives (wav2vec 2.0, HuBERT)


class CollapseError(RuntimeError):
    """A watched collapse metric stayed past its threshold for longer than the configured patience."""


def encoder_frames(encoder: nn.Module, lengths: Tensor) -> Tensor:
    """(B,) audio samples -> (B,) valid encoder frames, without running the encoder."""
    layers = getattr(encoder.frontend, "layers", None)
    if layers is not None:
        return conv_output_lengths(lengths, layers)
    if not encoder.samples_per_token:
        raise ValueError(f"{type(encoder.frontend).__name__} is not a time-based audio frontend")
    return torch.div(lengths, encoder.samples_per_token, rounding_mode="floor")


def maskable_batch(batch: Batch, modality: str, encoder: nn.Module, min_frames: int, *, policy: str,
                   what: str = "span masking") -> tuple[Batch, int]:
    """Audio batches: fill in missing lengths and drop (or reject, naming the ids) utterances with fewer than
    `min_frames` encoder frames, before they reach masking or the quantizer. Other modalities pass through.
    Returns (batch, rows dropped)."""
    if modality != "audio":
        return batch, 0
    x, lengths = batch.inputs["audio"], batch.lengths.get("audio")
    if lengths is None:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        batch = Batch(batch.inputs, {**batch.lengths, "audio": lengths}, batch.targets, batch.ids)
    return drop_short(batch, encoder_frames(encoder, lengths), min_frames, policy=policy, what=what)


def drop_short(batch: Batch, frames: Tensor, min_frames: int, *, policy: str, what: str) -> tuple[Batch, int]:
    """Remove rows with fewer than `min_frames` encoder frames (policy "drop") or raise a ValueError naming
    their sample ids (policy "raise", or when every row is too short). Returns (batch, rows dropped)."""
    short = frames < min_frames
    if not bool(short.any()):
        return batch, 0
    ids = batch.ids if batch.ids is not None else torch.arange(batch.batch_size)
    names = ids[short.to(ids.device)].tolist()
    if policy == "raise" or bool(short.all()):
        raise ValueError(
            f"samples {names} give {frames[short].tolist()} encoder frames, fewer than the {min_frames} that "
            f"{what} needs; raise the data module's min_samples or set short_utterances: drop"
        )
    keep = ~short
    audio, lengths = batch.inputs["audio"][keep], batch.lengths["audio"][keep]
    audio = audio[:, : int(lengths.max())]
    targets = {k: v[keep] for k, v in batch.targets.items()}
    kept = Batch({"audio": audio}, {"audio": lengths}, targets, None if batch.ids is None else batch.ids[keep])
    return kept, int(short.sum())


class CollapseGuard:
    """Counts consecutive optimizer steps a metric stays below `threshold`; raises after `patience` steps.
    threshold <= 0 disables it."""

    def __init__(self, *, name: str, threshold: float, patience: int, remedies: str) -> None:
        self.name, self.threshold, self.patience, self.remedies = name, threshold, patience, remedies
        self.since: int | None = None

    def update(self, value: float, step: int) -> None:
        if self.threshold <= 0:
            return
        if value >= self.threshold:
            self.since = None
            return
        if self.since is None:
            self.since = step
        if step - self.since >= self.patience:
            raise CollapseError(
                f"{self.name} has stayed below {self.threshold} since step {self.since} (now {value:.3g} at "
                f"step {step}): the run has collapsed. Usual remedies: {self.remedies}"
            )


def temperature_steps_to_floor(max_temp: float, min_temp: float, decay: float) -> int:
    """Updates until τ reaches its floor (277k for (2, 0.5, 0.999995)): for docs and sanity checks."""
    return math.ceil(math.log(min_temp / max_temp) / math.log(decay))


# ---------------------------------------------------------------------------------------------------------
# Self-distillation targets (data2vec v1 / 2.0): the EMA teacher and top-K layer averaging.


def annealed_decay(start: float, end: float, step: int, anneal_steps: int) -> float:
    """Linear EMA decay schedule: `start` at step 0, `end` from `anneal_steps` on (fairseq
    `get_annealed_rate`, data2vec_audio.py)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


class EMATeacher(nn.Module):
    """An exponential moving average of a student module (data2vec v1 / 2.0, Baevski et al. 2022 / 2023).

    Holds a deep copy of the student with `requires_grad=False` (so it never enters an optimizer's groups)
    kept in eval mode whatever the parent's mode. Per optimizer step, `set_num_updates(n)` (called by
    SSLModule once per micro-batch with the optimizer-step count) anneals the decay linearly from
    `decay_start` to `decay_end` over `anneal_steps` and, the first time it sees a new n, applies one update
    `teacher = decay·teacher + (1 - decay)·student` from the bound student; accumulated micro-batches see the
    same n and do not update again. `num_updates` is a persistent buffer, so the schedule resumes from a
    checkpoint (the teacher weights are ordinary submodule state).

    skip: parameter-name prefixes left out of the average entirely (parts of the copy the teacher never
    runs, e.g. the frontend when it is fed the student's features). copy: prefixes copied from the student
    instead of averaged (fairseq `ema_layers_only`: the positional conv). Buffers are always copied.

    FSDP2: when both parameters are DTensors with the same placement the update runs on the local shards
    (`to_local()`), no gather. Arithmetic runs in fp32; if the teacher's parameters are not fp32 (a
    "-true" precision cast the module), fp32 master copies are kept on the side.
    NOTE(ref): fairseq saves its fp32 master copy under `_ema`; ours lives in the teacher parameters
    themselves (fp32 under "*-mixed" precision, the usual case), and side masters are not checkpointed.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        decay_start: float = 0.999,  # data2vec audio base: 0.999 -> 0.9999 over 30 k updates (REFERENCE §B.4)
        decay_end: float = 0.9999,
        anneal_steps: int = 30_000,
        skip: tuple[str, ...] = (),
        copy: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        import copy as _copy

        if not (0.0 <= decay_start <= 1.0 and 0.0 <= decay_end <= 1.0):
            raise ValueError(f"EMA decays must be in [0, 1], got {decay_start}, {decay_end}")
        self.module = _copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.decay_start, self.decay_end, self.anneal_steps = decay_start, decay_end, anneal_steps
        self.skip, self.copy = tuple(skip), tuple(copy)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._student = [student]  # a plain list: not a submodule, not in state_dict, not in parameters()
        self._master: dict[str, Tensor] = {}

    @property
    def decay(self) -> float:
        return annealed_decay(self.decay_start, self.decay_end, int(self.num_updates), self.anneal_steps)

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.module.eval()  # the teacher never trains (no dropout, no layerdrop)
        return self

    def bind(self, student: nn.Module) -> None:
        """Point the teacher at the student module it averages (after init or a re-wrap)."""
        self._student = [student]

    def set_num_updates(self, num_updates: int) -> None:
        """Once per new optimizer-step count: set the decay for that step and average the student in."""
        if num_updates <= int(self.num_updates):
            return
        self.num_updates.fill_(num_updates)
        if self.training:
            self.update(self._student[0])

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float | None = None) -> None:
        """teacher = decay·teacher + (1 - decay)·student on every averaged parameter; buffers copied."""
        decay = self.decay if decay is None else decay
        # FSDP2 keeps a root's parameters unsharded after its forward (and the teacher has no backward to
        # reshard it): writes into those views would be lost at the next all-gather, so reshard first and
        # update the sharded parameters, which are the source of truth (pytorch#117742).
        for tree in (self.module, student):
            for sub in tree.modules():
                if callable(getattr(sub, "reshard", None)) and callable(getattr(sub, "unshard", None)):
                    sub.reshard()
        theirs = dict(student.named_parameters())
        for name, t in self.module.named_parameters():
            if name.startswith(self.skip):
                continue
            if name not in theirs:
                raise KeyError(f"EMA teacher parameter {name!r} has no counterpart in the student")
            s = theirs[name]
            t_is_d, s_is_d = hasattr(t, "to_local"), hasattr(s, "to_local")
            if t_is_d != s_is_d:
                if s_is_d and not t_is_d:  # teacher left unsharded: gather the student's (correct, not shard-local)
                    s_loc = s.full_tensor()
                else:
                    raise RuntimeError(f"EMA teacher parameter {name!r} is sharded but the student's is not")
            else:
                s_loc = self._local(s)
            t_loc = self._local(t)
            if t_loc.shape != s_loc.shape:
                raise RuntimeError(f"EMA shapes differ for {name!r}: {tuple(t_loc.shape)} vs {tuple(s_loc.shape)}")
            s32 = s_loc.detach().float()
            if name.startswith(self.copy):
                new = s32
            else:
                master = t_loc
                if t_loc.dtype != torch.float32:
                    if name not in self._master:
                        self._master[name] = t_loc.float()
                    master = self._master[name]
                new = master.mul_(decay).add_(s32, alpha=1.0 - decay)
            if new is not t_loc:
                t_loc.copy_(new)
        theirs_b = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            if name in theirs_b and not name.startswith(self.skip):
                self._local(b).copy_(self._local(theirs_b[name]))


def _normalize(x: Tensor, how: str | None, valid: Tensor | None) -> Tensor:
    if how is None or how == "none":
        return x
    if how == "instance":
        return masked_instance_norm(x, valid)
    if how == "layer":
        return F.layer_norm(x, x.shape[-1:])
    raise ValueError(f"target norm must be 'instance', 'layer' or None, got {how!r}")


def top_k_targets(
    layers: list[Tensor],
    k: int,
    *,
    norm: str | None = "instance",
    final_norm: str | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """data2vec targets: the average of the last `k` of `layers` (each (B, N, D)), each normalized first.

    norm: "instance" (over time per channel, fairseq `instance_norm_target_layer`, audio and images),
    "layer" (over channels per position, data2vec text) or None. final_norm: the same options applied to
    the average (`instance_norm_targets` / `layer_norm_targets`). padding_mask (B, N) True at padding:
    excluded from the instance statistics and zeroed in the output. Runs in fp32 with autocast off.
    Returns (B, N, D) fp32.
    """
    if not 1 <= k <= len(layers):
        raise ValueError(f"top_k must be in [1, {len(layers)}], got {k}")
    valid = None if padding_mask is None else ~padding_mask
    with torch.autocast(device_type=layers[0].device.type, enabled=False):
        acc = None
        for layer in layers[-k:]:
            y = _normalize(layer.float(), norm, valid)
            acc = y if acc is None else acc + y
        out = _normalize(acc / k, final_norm, valid)
        if valid is not None:
            out = out * valid[..., None].to(out.dtype)
    return out
