"""MAE: masked autoencoding of image patches (He et al. 2022) and of log-mel patches (AudioMAE, Huang et al.
2022), on any Encoder whose frontend can `patchify` its input (ImagePatches, LogMelPatches).

The encoder sees only the kept tokens (`keep=`); the decoder fills removed positions with a mask token and
regresses the (per-patch normalized) patch values; the loss is the MSE averaged over removed patches only.
"""

from __future__ import annotations

from omnissl.backbones.encoder import Encoder
from omnissl.batch import Batch
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.heads import MAEDecoder
from omnissl.ssl.losses import masked_mse
from omnissl.ssl.masking import random_keep


class MAE(SSLModule):
    """encoder: an Encoder with a patch frontend. modality: the Batch input it reads ("image" or "audio").
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
        **base,
    ) -> None:
        super().__init__(**base)
        if not hasattr(encoder.frontend, "patchify"):
            raise ValueError(f"MAE needs a patch frontend with patchify(), got {type(encoder.frontend).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        # the encoder sees kept tokens only (keep=), so the mask embedding is never used: frozen, so that no
        # unused parameter stops DDP's reducer (find_unused_parameters False) or reaches the optimizer
        encoder.mask_emb.requires_grad_(False)
        self.encoder, self.modality = encoder, modality
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder = MAEDecoder(in_dim=encoder.dim, out_dim=encoder.frontend.patch_dim, dim=decoder_dim,
                                  depth=decoder_depth, heads=decoder_heads)

    def step(self, batch: Batch) -> StepOutput:
        x = batch.inputs[self.modality]
        tokens = self.encoder.embed(x, batch.lengths.get(self.modality))
        b, n, _ = tokens.x.shape
        keep = random_keep((b, n), mask_ratio=self.mask_ratio, padding_mask=tokens.padding_mask,
                           generator=self.generator(x.device), device=x.device)
        out = self.encoder.encode(tokens, keep=keep)
        pred = self.decoder(out.last, keep, tokens.grid, self.encoder.num_prefix)
        target = self.encoder.frontend.patchify(x).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        removed = ~keep if tokens.padding_mask is None else ~keep & ~tokens.padding_mask
        loss_sum, count = masked_mse(pred, target, removed)
        return StepOutput(self.normalize(loss_sum, count), {"masked_frac": removed.float().mean()}, b)
