"""Upstreams of a probe: the hidden states of a frozen encoder, or of a non-learned baseline, cached once.

The split follows s3prl (REFERENCE.md §3): an *upstream* gives all hidden states h_0 … h_L at a declared
downsample rate (`samples_per_token`); the featurizer (eval/featurizer.py) mixes them; a downstream head is
trained on top (eval/probe.py) while the upstream stays frozen.

    with frozen(encoder):
        train = extract(EncoderStates(encoder), loader, frames=False)   # pooled (U, S, D) states, cached
    train = extract(baseline_states("audio"), loader, frames=True)       # per-utterance (N_u, S, D) frames

Legend: U utterances, B batch, N frames/tokens, S = L + 1 hidden states, D width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from einops import rearrange
from torch import Tensor, nn

from omnissl.backbones.config import build_module, module_config
from omnissl.batch import SAMPLE_RATE, Batch
from omnissl.ops import mean_pool

# --------------------------------------------------------------------------------------------------------
# hidden states of a frozen encoder, or of a non-learned baseline


def batch_modality(batch: Batch) -> str:
    """The one input modality of a probe batch."""
    if len(batch.inputs) != 1:
        raise ValueError(f"a probe batch holds one modality, got {sorted(batch.inputs)}")
    return next(iter(batch.inputs))


@contextlib.contextmanager
def frozen(encoder: nn.Module) -> Iterator[nn.Module]:
    """Run `encoder` frozen: eval mode (no dropout, no layerdrop), parameters without requires_grad, grad
    mode off. On exit the previous mode and flags come back, and no parameter's `.grad` may have changed
    (RuntimeError naming the parameter otherwise): a probe never trains its upstream."""
    was_training = encoder.training
    params = dict(encoder.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    encoder.eval()
    for p in params.values():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            yield encoder
    finally:
        encoder.train(was_training)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    for n, p in params.items():
        if p.grad is not grads[n]:
            raise RuntimeError(f"frozen encoder parameter {n} received a gradient during probing")


class EncoderStates:
    """s3prl's upstream contract over one of our encoders: `states(batch) -> (hs (B, N, S, D), valid (B, N)
    bool)`, the S = L + 1 hidden states (trunk input, then every block) per frame, prefix (CLS) tokens left
    out. Audio encoders with 2-D patch grids (time x frequency, e.g. `LogMelPatches`) give one frame per time
    row: the row's patches are averaged, so frames stay time-ordered for CTC. `samples_per_token` is the
    downsample rate (input samples per frame; None for text and images)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.samples_per_token = getattr(encoder, "samples_per_token", None)
        self.dim = encoder.dim
        self.num_states = encoder.num_layers + 1

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        enc = self.encoder
        if enc.training or any(p.requires_grad for p in enc.parameters()):
            raise RuntimeError("EncoderStates needs a frozen encoder: call it inside `with frozen(encoder):`")
        modality = batch_modality(batch)
        tokens = enc.embed(batch.inputs[modality], batch.lengths.get(modality))
        out = enc.encode(tokens, return_layers=True)
        prefix = getattr(enc, "num_prefix", 0)
        hs = torch.stack(out.layers, dim=2)[:, prefix:]  # (B, N, S, D)
        pad = out.padding_mask
        valid = torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device) if pad is None else ~pad[:, prefix:]
        if modality == "audio" and tokens.grid is not None and tokens.grid[1] > 1:
            hs = rearrange(hs, "b (t f) s d -> b t f s d", f=tokens.grid[1]).mean(2)
            valid = rearrange(valid, "b (t f) -> b t f", f=tokens.grid[1])[:, :, 0]
        return hs.float(), valid


class LogMelStates:
    """Non-learned audio baseline: one state per frame of 25 ms window and 10 ms hop (no centring; 160 samples
    per frame), computed per utterance over its valid samples only:

      * `n_mels`-bin log-mel, log(mel + 1e-6); with `n_mfcc`, its first `n_mfcc` orthonormal DCT-II
        coefficients (MFCC) instead;
      * `deltas` = 1 or 2 appends the first (and second) time derivatives (5-frame regression,
        torchaudio.functional.compute_deltas);
      * `std=True` appends to every frame the utterance's per-channel standard deviation over its frames,
        so that mean pooling (the probe's) gives the classic mean + std statistics pooling. Frames stay
        frames for CTC; the appended half is then an utterance-level constant.

    The defaults are the strongest of the simple baselines measured with the probe of `omnissl probe`
    (bench/baseline_speech.py --compare; README "Does pretraining help?"): 64-bin log-mel, mean + std."""

    num_states, samples_per_token = 1, 160

    def __init__(self, n_mels: int = 64, *, n_mfcc: int | None = None, deltas: int = 0, std: bool = True) -> None:
        if deltas not in (0, 1, 2):
            raise ValueError(f"deltas must be 0, 1 or 2, got {deltas}")
        if n_mfcc is not None and not 0 < n_mfcc <= n_mels:
            raise ValueError(f"n_mfcc must be in 1..n_mels={n_mels}, got {n_mfcc}")
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=n_mels,
                                                        center=False)
        self.dct = None if n_mfcc is None else torchaudio.functional.create_dct(n_mfcc, n_mels, "ortho")
        self.n_mels, self.n_mfcc, self.deltas, self.std = n_mels, n_mfcc, deltas, std
        base = n_mels if n_mfcc is None else n_mfcc
        self.dim = base * (1 + deltas) * (2 if std else 1)

    def frames(self, x: Tensor) -> Tensor:
        """One utterance's samples (T,) -> its frames (N, dim), N = (T - 400) // 160 + 1."""
        feats = torch.log(self.mel.to(x.device)(x.float()) + 1e-6)  # (n_mels, N)
        if self.dct is not None:
            feats = self.dct.to(x.device).T @ feats  # (n_mfcc, N)
        parts = [feats]
        for _ in range(self.deltas):
            parts.append(torchaudio.functional.compute_deltas(parts[-1], win_length=5))
        out = torch.cat(parts).T  # (N, C)
        if self.std:
            out = torch.cat([out, out.std(0, unbiased=False).expand_as(out)], dim=1)
        return out

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if batch_modality(batch) != "audio":
            raise ValueError("LogMelStates takes audio batches")
        x = batch.inputs["audio"]
        lengths = batch.lengths.get("audio", torch.full((x.shape[0],), x.shape[1], device=x.device))
        if int(lengths.min()) < 400:
            raise ValueError(f"audio of {int(lengths.min())} samples is shorter than one 25 ms frame (400 samples)")
        per_utt = [self.frames(row[: int(n)]) for row, n in zip(x, lengths)]
        frames = torch.tensor([len(f) for f in per_utt], device=x.device)
        hs = x.new_zeros((len(per_utt), int(frames.max()), 1, self.dim), dtype=torch.float32)
        for i, f in enumerate(per_utt):
            hs[i, : len(f), 0] = f
        valid = torch.arange(hs.shape[1], device=x.device)[None] < frames[:, None]
        return hs, valid


class TokenCountStates:
    """Non-learned text baseline: one state, one "frame" per text: its bag-of-tokens frequencies (token
    counts over valid tokens / length; a unigram bag-of-words classifier). Built as counts, never as (B, N, V)
    one-hot frames, which would not fit in memory for a real vocabulary."""

    num_states, samples_per_token = 1, None

    def __init__(self, vocab_size: int) -> None:
        self.dim = vocab_size

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if batch_modality(batch) != "text":
            raise ValueError("TokenCountStates takes text batches")
        ids = batch.inputs["text"]
        if int(ids.max()) >= self.dim:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {self.dim}")
        lengths = batch.lengths.get("text", torch.full((ids.shape[0],), ids.shape[1], device=ids.device))
        valid = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).float()
        counts = ids.new_zeros((ids.shape[0], self.dim), dtype=torch.float32).scatter_add_(1, ids, valid)
        hs = (counts / lengths.clamp(min=1)[:, None].float())[:, None, None]  # (B, 1, 1, V)
        return hs, torch.ones(hs.shape[:2], dtype=torch.bool, device=ids.device)


class PixelStates:
    """Non-learned image baseline: one state, one token: the image average-pooled to `size` x `size` pixels
    per channel and flattened (raw pixels, as bench/baseline_images.py, at a size independent of the
    encoder's input resolution)."""

    num_states, samples_per_token = 1, None

    def __init__(self, size: int = 16) -> None:
        self.size, self.dim = size, 3 * size * size

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if batch_modality(batch) != "image":
            raise ValueError("PixelStates takes image batches")
        x = F.adaptive_avg_pool2d(batch.inputs["image"].float(), self.size)
        hs = rearrange(x, "b c h w -> b 1 1 (c h w)")
        return hs, torch.ones(hs.shape[:2], dtype=torch.bool, device=x.device)


def baseline_states(modality: str, *, vocab_size: int | None = None):
    """The non-learned baseline upstream of a modality (see LogMelStates, TokenCountStates, PixelStates)."""
    if modality == "audio":
        return LogMelStates()
    if modality == "text":
        if vocab_size is None:
            raise ValueError("the text baseline needs the tokenizer's vocab_size")
        return TokenCountStates(vocab_size)
    if modality == "image":
        return PixelStates()
    raise ValueError(f"unknown modality {modality!r}")



# --------------------------------------------------------------------------------------------------------
# cached features

@dataclass
class Features:
    """Frozen features of one split, ordered by dataset id.

    x:       pooled (U, S, D) float32, or per-utterance frames: U tensors (N_u, S, D).
    labels:  (U,) int64 class indices (classification), or None.
    texts:   U reference transcripts, words separated by spaces (CTC), or None.
    targets: U (M_u,) int64 character sequences of `texts` (CTC training), or None.
    ids:     (U,) int64 dataset ids.
    source:  what the features came from, for messages (a manifest path).
    """

    x: Tensor | list[Tensor]
    ids: Tensor
    labels: Tensor | None = None
    texts: list[str] | None = None
    targets: list[Tensor] | None = None
    source: str = "?"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_states(self) -> int:
        return int(self.x.shape[1] if isinstance(self.x, Tensor) else self.x[0].shape[1])


def layer_normalize(hs: Tensor) -> Tensor:
    """s3prl's `normalize` option: LayerNorm without affine parameters over the width of every state of
    every frame (..., S, D)."""
    return F.layer_norm(hs, hs.shape[-1:])


def extract(states, batches: Iterable[Batch], *, frames: bool = False, layer_norm: bool = False,
            need_labels: bool = True, source: str = "?", frame_dtype: torch.dtype = torch.float16,
            device: torch.device | str | None = None) -> Features:
    """Run the upstream once over `batches` and cache its states.

    frames=False: mean over valid frames per state -> pooled (U, S, D) float32, with `batch.targets["label"]`
    (required when `need_labels`; a ValueError naming `source` otherwise). frames=True: every utterance's
    valid frames (N_u, S, D), stored as `frame_dtype` (half the memory of fp32; the probe computes in fp32).
    layer_norm: s3prl's per-frame LayerNorm of every state, before pooling.
    """
    xs: list = []
    ids, labels = [], []
    for batch in batches:
        if batch.ids is None:
            raise ValueError(f"{source}: probe batches need dataset ids")
        if need_labels and "label" not in batch.targets:
            raise ValueError(f"{source}: no labels (a labeled manifest has a third column `label`; probing "
                             "needs one in every split)")
        if device is not None:
            batch = batch.to(device)
        hs, valid = states(batch)
        if layer_norm:
            hs = layer_normalize(hs)
        if frames:
            xs += [h[v].to("cpu", frame_dtype) for h, v in zip(hs, valid)]
        else:
            b, _, s, d = hs.shape  # mean over valid frames of every state at once: (B, N, S * D) -> (B, S, D)
            xs.append(mean_pool(hs.reshape(b, -1, s * d), ~valid).view(b, s, d).cpu())
        ids.append(batch.ids.cpu())
        if "label" in batch.targets:
            labels.append(batch.targets["label"].cpu())
    if not ids:
        raise ValueError(f"{source}: no items")
    id_all = torch.cat(ids)
    order = torch.argsort(id_all)
    x = [xs[i] for i in order.tolist()] if frames else torch.cat(xs)[order]
    y = torch.cat(labels)[order] if labels and len(labels) == len(ids) else None
    return Features(x, id_all[order], y, source=source)



# --------------------------------------------------------------------------------------------------------
# seeded construction

@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def reinitialized(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture, freshly initialized from `seed`: rebuilt from the encoder's recorded
    constructor arguments (omnissl.backbones.config), so every module runs its own init."""
    with seeded(seed):
        return build_module(module_config(encoder))

