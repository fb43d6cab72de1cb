"""MAE: masked autoencoding of image patches (He et al. 2022) and of log-mel patches (AudioMAE, Huang et al.
2022), on any Encoder whose frontend can `patchify` its input (ImagePatches, LogMelPatches).

The encoder sees only the kept tokens (`keep=`); the decoder fills removed positions with a mask token and
regresses the (per-patch normalized) patch values; the loss is the MSE averaged over removed patches only.
`reconstruct` returns input, masked input and reconstruction as pictures (images, or log-mel spectrograms)
for `omnissl.train.reconstructions.Reconstructions` to draw.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.batch import Batch
from omnissl.ops import take_rows
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.heads import MAEDecoder
from omnissl.ssl.losses import masked_mse
from omnissl.ssl.masking import random_keep

INITS = ("mae", "keep")


def mae_init(module: nn.Module) -> None:
    """MAE's `initialize_weights` (models_mae.py, also AudioMAE's): xavier_uniform weights and zero biases for
    every Linear, LayerNorm weight 1 / bias 0, the patch embedding's conv initialized like a Linear (xavier over
    its flattened (out, in * kh * kw) weight; its bias keeps PyTorch's default, as in MAE), CLS and mask tokens
    N(0, 0.02). Sin-cos positions are fixed and untouched."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if hasattr(m, "patchify") and isinstance(getattr(m, "proj", None), nn.Conv2d):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        if isinstance(m, Encoder) and m.cls_token is not None:
            nn.init.normal_(m.cls_token, std=0.02)
        if isinstance(m, MAEDecoder):
            nn.init.normal_(m.mask_token, std=0.02)


class MAE(SSLModule):
    """encoder: an Encoder with a patch frontend. modality: the Batch input it reads ("image" or "audio").
    init: "mae" re-initializes encoder and decoder as MAE does (`mae_init`); "keep" keeps the encoder's own
    init (e.g. an encoder loaded from a checkpoint) and applies MAE's init to the decoder only.
    Defaults: MAE ViT-B (mask 0.75, norm_pix_loss, decoder 512/8/16); AudioMAE uses mask_ratio 0.8."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        modality: str = "image",
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        init: str = "mae",
        **base,
    ) -> None:
        super().__init__(**base)
        if not hasattr(encoder.frontend, "patchify"):
            raise ValueError(f"MAE needs a patch frontend with patchify(), got {type(encoder.frontend).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        # the encoder sees kept tokens only (keep=), so the mask embedding is never used: frozen, so that no
        # unused parameter stops DDP's reducer (find_unused_parameters False) or reaches the optimizer
        encoder.mask_emb.requires_grad_(False)
        self.encoder, self.modality = encoder, modality
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder = MAEDecoder(in_dim=encoder.dim, out_dim=encoder.frontend.patch_dim, dim=decoder_dim,
                                  depth=decoder_depth, heads=decoder_heads)
        mae_init(self.decoder)
        if init == "mae":
            mae_init(self.encoder)

    def targets(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw input -> (targets (B, N, P) in fp32, per-patch mean, per-patch std); targets are normalized per
        patch when `norm_pix_loss` (MAE: mean and unbiased variance + 1e-6), else mean 0 and std 1."""
        patches = self.encoder.frontend.patchify(x).float()
        if not self.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        std = (var + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def encode_visible(self, batch: Batch, generator: torch.Generator | None = None):
        """Embed every patch, draw the keep mask, encode the kept tokens -> (tokens, keep (B, N) bool, output)."""
        x = batch.inputs[self.modality]
        tokens = self.encoder.embed(x, batch.lengths.get(self.modality))
        b, n, _ = tokens.x.shape
        keep = random_keep((b, n), mask_ratio=self.mask_ratio, padding_mask=tokens.padding_mask,
                           generator=generator if generator is not None else self.generator(x.device),
                           device=x.device)
        return tokens, keep, self.encoder.encode(tokens, keep=keep)

    def forward_masked(self, batch: Batch, generator: torch.Generator | None = None):
        """-> (predictions (B, N, P) at every patch, targets, mean, std, removed (B, N) bool, padding mask or
        None)."""
        tokens, keep, out = self.encode_visible(batch, generator)
        pred = self.decoder(out.last, keep, tokens.grid, self.encoder.num_prefix, tokens.padding_mask)
        target, mean, std = self.targets(batch.inputs[self.modality])
        removed = ~keep if tokens.padding_mask is None else ~keep & ~tokens.padding_mask
        return pred, target, mean, std, removed, tokens.padding_mask

    def step(self, batch: Batch) -> StepOutput:
        # the decoder predicts only the N - K patches the encoder did not see (its last block, final LayerNorm
        # and output Linear run on those rows only): the loss never reads the kept patches' predictions, so
        # this is forward_masked's loss (tested) for about a quarter less work in those layers
        tokens, keep, out = self.encode_visible(batch)
        pad = tokens.padding_mask
        hidden = (~keep).nonzero()[:, 1].view(keep.shape[0], -1)  # (B, N - K), in sequence order
        pred = self.decoder(out.last, keep, tokens.grid, self.encoder.num_prefix, pad, queries=hidden)
        target = take_rows(self.targets(batch.inputs[self.modality])[0], hidden)
        removed = torch.ones_like(hidden, dtype=torch.bool) if pad is None else ~pad.gather(1, hidden)
        loss_sum, count = masked_mse(pred, target, removed)
        return StepOutput(self.normalize(loss_sum, count), {"masked_frac": count / keep.numel()},
                          batch.batch_size)

    def unpatchify(self, patches: Tensor, x: Tensor) -> Tensor:
        """(B, N, P) patch values -> pictures: images (B, C, H, W) like `x`, or log-mel spectrograms
        (B, frames, n_mels) for audio (the frames that fill whole patch rows)."""
        front = self.encoder.frontend
        if self.modality == "image":
            p = front.patch
            return rearrange(patches, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=x.shape[2] // p, p=p, q=p)
        return rearrange(patches, "b (tp fp) (pt pf) -> b (tp pt) (fp pf)", fp=front.n_mels // front.patch_freq,
                         pt=front.patch_time, pf=front.patch_freq)

    @torch.no_grad()
    def reconstruct(self, batch: Batch, seed: int = 0) -> dict[str, Tensor]:
        """MAE's visualization for a batch, with a fixed mask drawn from `seed` (the same pictures every call):
        "input" (the patchified input, as pictures), "masked" (removed patches set to NaN: drawn blank),
        "reconstruction" (predictions, de-normalized with each patch's own mean and std under norm_pix_loss as
        MAE's demo does, with the visible patches pasted from the input), "removed" (B, N) bool. Pictures are
        images (B, C, H, W) or log-mel spectrograms (B, frames, n_mels). Runs in eval mode, restores the mode."""
        was_training = self.training
        self.eval()
        try:
            x = batch.inputs[self.modality]
            gen = torch.Generator(device=x.device).manual_seed(seed)
            pred, target, mean, std, removed, pad = self.forward_masked(batch, gen)
        finally:
            self.train(was_training)
        patches = target * std + mean
        recon = torch.where(removed[..., None], pred.float() * std + mean, patches)
        masked = patches.masked_fill(removed[..., None], math.nan)
        if pad is not None:  # padding is neither input nor prediction
            recon, masked = (t.masked_fill(pad[..., None], math.nan) for t in (recon, masked))
            patches = patches.masked_fill(pad[..., None], math.nan)
        return {"input": self.unpatchify(patches, x), "masked": self.unpatchify(masked, x),
                "reconstruction": self.unpatchify(recon, x), "removed": removed}
