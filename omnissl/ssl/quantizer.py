"""wav2vec 2.0's Gumbel product quantizer and the codebook perplexity it reports (Baevski et al. 2020).

Legend: B batch, N frames, C input width, G codebook groups, V entries per group, P = B·N frames flattened.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


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
