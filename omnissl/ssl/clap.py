"""CLAP: contrastive language-audio pretraining (Elizalde et al. 2023; LAION-CLAP, Wu et al. 2023).

    audio (B, T) -> audio tower (`encoder`, any Encoder) -> pool -> 2-layer MLP -> â (B, P)
    text  (B, N) -> text tower (`text_encoder`, a TokenEmbedding Encoder) -> pool -> 2-layer MLP -> t̂ (B, P)
    loss = ½ [CE(s·Â T̂ᵀ, diag) + CE(s·T̂ Âᵀ, diag)] over the global batch (`losses.contrastive_pairs`:
           L2-normalized, negatives gathered from every rank with gradients to each rank's slice, fp32),
    s = exp(logit_scale), learnable, initialized at 1/0.07 and kept in [1, 100] (LAION clamps the parameter
    after every optimizer step, `training/train.py`; REFERENCE §B.6).

The audio tower is `encoder` so that a CLAP checkpoint's audio tower exports, probes and loads like any other
encoder (`omnissl export`, `omnissl probe`, `load_encoder`); the text tower's constructor arguments ride in the
checkpoint's metadata. Either tower may come from an omnissl run (a recipe's `class_path:
omnissl.checkpoints.load_encoder`: an audio tower from a wav2vec 2.0 / HuBERT / data2vec run, a text tower
from an MLM run). `save_package` / `load_package` write and read both towers with their projections.

During validation the module keeps every clip's audio embedding and, at the end of the epoch, ranks the
valid split's captions (all of them, several per clip: LAION-CLAP's Clotho / AudioCaps protocol,
`retrieval_metrics` below) and classifies the DataModule's zero-shot clips by prompts
("This is a sound of {label}."), when the DataModule offers them (AudioTextDataModule).

Legend: B batch, T samples, N tokens, D tower width, P shared width, K captions per clip, C classes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from omnissl.backbones.config import build_module, module_config
from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.batch import SAMPLE_RATE, Batch
from omnissl.checkpoints import load_backbone, load_encoder_weights, load_head_weights, load_strict, save_backbone
from omnissl.ops import mean_pool
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.losses import contrastive_pairs

PACKAGE_FORMAT = "omnissl-clap"
PROMPT = "This is a sound of {label}."  # LAION-CLAP `evaluate/eval_zeroshot_classification.py`
POOLS = ("mean", "cls", "first")


PROJECTIONS = ("mlp", "linear")


class ProjectionMLP(nn.Sequential):
    """LAION-CLAP's projection: Linear(D, P) -> ReLU -> Linear(P, P) (`audio_projection`, `text_projection`);
    with `linear`, CLIP's: one Linear(D, P) (CLIP has no bias there; we keep one)."""

    def __init__(self, in_dim: int, out_dim: int, linear: bool = False) -> None:
        if linear:
            super().__init__(nn.Linear(in_dim, out_dim))
        else:
            super().__init__(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))


class AttentionalFusion(nn.Module):
    """Attentional feature fusion (Dai et al. 2021, "AFF"; LAION-CLAP `feature_fusion.py`) of two token sequences
    (B, N, D): w = sigmoid(local(x + y) + global(mean_n(x + y))), out = 2 x w + 2 y (1 - w); local / global are
    bottleneck MLPs (D -> D/r -> D) per token and on the sequence mean.
    NOTE(ref): LAION's 1x1 convolutions carry BatchNorm; we leave it out, so that a clip's embedding does not
    depend on the other clips of its batch (or on its rank's share of them under DDP)."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.local_att = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.global_att = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        both = x + y
        w = torch.sigmoid(self.local_att(both) + self.global_att(both.mean(1, keepdim=True)))
        return 2 * x * w + 2 * y * (1 - w)


class FeatureFusion(nn.Module):
    """LAION-CLAP's feature fusion for audio longer than the model's window (Wu et al. 2023, sec. 3.3; REFERENCE
    §B.6 "Long audio"), on the audio tower's tokens before its trunk.

    A clip of n > `window` tokens gives a global view, the whole clip squeezed to `window` tokens (linear
    interpolation in time), and 3 local views, `window`-token crops from the front, middle and back thirds of
    its possible starts (random in training, each third's middle in evaluation); each local crop is shortened
    3x by a strided convolution (kernel 3, stride 3), the three are concatenated in time (zero-padded to
    `window`) and fused with the global view by `AttentionalFusion`. A clip of n <= `window` tokens passes
    unchanged (LAION stacks it 4 times and fuses only the "longer" clips). A batch with a long clip comes out
    `window` tokens long.
    NOTE(ref): LAION fuses log-mel inputs: the global view is the mel resized with bilinear interpolation, the
    local crops go through a second patch embedding 3x wider in time (HTS-AT `PatchEmbed.mel_conv2d`), and the
    crops are drawn at random in evaluation too. We fuse the tower's projected 1-D tokens (any audio frontend
    with one token per time step: log-mel frames or the wav2vec 2.0 conv extractor), from one frontend pass over
    the whole clip, and take fixed crops in evaluation so that evaluation is deterministic."""

    def __init__(self, dim: int, window: int, reduction: int = 4) -> None:
        super().__init__()
        if window < 3:
            raise ValueError(f"the fusion window must hold at least 3 tokens, got {window}")
        self.window = window
        self.local_conv = nn.Conv1d(dim, dim, kernel_size=3, stride=3)
        self.fuse = AttentionalFusion(dim, reduction)

    def starts(self, n: int) -> list[int]:
        """Start tokens of the 3 local crops of a clip of n > window tokens (front, middle, back thirds)."""
        ranges = torch.tensor_split(torch.arange(n - self.window + 1), 3)
        out = []
        for r in ranges:
            if len(r) == 0:  # fewer starts than thirds: LAION falls back to the first one
                out.append(0)
            elif self.training:
                out.append(int(r[torch.randint(len(r), ())]))
            else:
                out.append(int(r[len(r) // 2]))
        return out

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), padding_mask (B, N) or None -> (fused tokens (B, N', D), padding mask)."""
        b, n, _ = x.shape
        valid = (~padding_mask).sum(1) if padding_mask is not None else torch.full((b,), n, device=x.device)
        if int(valid.max()) <= self.window:
            if torch.is_grad_enabled() and self.training:  # no long clip: the weights get zero, not no, gradient
                x = x + 0.0 * sum(p.sum() for p in self.parameters())  # (DDP needs every parameter used)
            return x, padding_mask
        w = self.window
        rows, masks = [], []
        for i in range(b):
            k = int(valid[i])
            if k <= w:
                row = x[i, :w]
                rows.append(torch.nn.functional.pad(row, (0, 0, 0, w - row.shape[0])))
                masks.append(torch.arange(w, device=x.device) >= k)
                continue
            seq = x[i, :k]  # (k, D)
            global_view = torch.nn.functional.interpolate(seq.t()[None], size=w, mode="linear",
                                                          align_corners=False)[0].t()  # (w, D)
            crops = torch.stack([seq[s:s + w] for s in self.starts(k)])  # (3, w, D)
            local = self.local_conv(crops.transpose(1, 2)).transpose(1, 2).reshape(-1, x.shape[2])  # (3 (w//3), D)
            local = torch.nn.functional.pad(local, (0, 0, 0, w - local.shape[0]))
            rows.append(self.fuse(global_view[None], local[None])[0])
            masks.append(torch.zeros(w, dtype=torch.bool, device=x.device))
        mask = torch.stack(masks)
        return torch.stack(rows), mask if bool(mask.any()) else None


def pool(hidden: Tensor, padding_mask: Tensor | None, how: str, prefix: int = 0) -> Tensor:
    """(B, N, D) tower output -> (B, D): "mean" over valid tokens (after any CLS), "cls" the CLS token (index 0;
    the encoder must have one), "first" the first token (the text's <s>, as RoBERTa's pooler reads it)."""
    if how == "mean":
        return mean_pool(hidden, padding_mask, prefix)
    if how in ("cls", "first"):
        return hidden[:, 0].float()
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLS}")


def pool_queries(padding_mask: Tensor | None, how: str, prefix: int, batch: int, device: torch.device
                 ) -> Tensor | None:
    """The token positions (B, Q) whose outputs `pool` reads, for `Encoder.encode(queries=)` (the trunk's last
    block computes only those rows, and in a padded batch the blocks before it run on the valid tokens only), or
    None when pooling needs the whole output:

      "first" without a CLS token: position 0 of every row (B, 1);
      "mean" of a padded batch: positions 0 .. the longest row's length - 1 (B, Q), the padding among them
        masked by the returned padding mask (without padding every row is wanted: nothing to save);
      "cls", or "first" on a tower with a CLS token (it reads the CLS row): None, as queries index the tokens
        after the prefix and cannot name the CLS row."""
    if how == "first" and prefix == 0:
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    if how == "mean" and padding_mask is not None:
        longest = int((~padding_mask).sum(1).max())
        return torch.arange(longest, device=device).expand(batch, longest)
    return None


def freeze_layers(encoder: Encoder, layers: int) -> None:
    """Freeze a tower: layers -1 freezes all of it; k >= 0 freezes everything below its trunk's first k blocks
    (frontend, feature norm and projection, positions, CLS) and those blocks; 0 freezes nothing."""
    if layers == 0:
        return
    depth = len(encoder.trunk.blocks)
    if layers < -1 or layers > depth:
        raise ValueError(f"frozen layers must be -1 (all), 0 (none) or 1..{depth}, got {layers}")
    if layers == -1:
        encoder.requires_grad_(False)
        return
    for name, child in encoder.named_children():
        if name != "trunk":
            child.requires_grad_(False)
    for name in ("mask_emb", "cls_token"):
        p = getattr(encoder, name)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)
    for block in list(encoder.trunk.blocks)[:layers]:
        block.requires_grad_(False)
    if not encoder.trunk.pre_norm:  # a post-LN trunk's norm is its input LayerNorm: below the first block
        encoder.trunk.norm.requires_grad_(False)


class CLAP(SSLModule):
    """Contrastive language-audio pretraining of two towers (see the module docstring).

    encoder: the audio tower (any Encoder reading "audio"); text_encoder: the text tower (TokenEmbedding).
    dim: the shared width P (LAION-CLAP 512). audio_pool / text_pool: "mean", "cls" or "first" (LAION-CLAP:
    HTS-AT's pooled output; RoBERTa's first-token pooler). logit_scale_init: s at start (1/0.07, CLIP and
    LAION-CLAP); max_logit_scale: the clamp (100). freeze_audio_layers / freeze_text_layers: -1 freezes a tower,
    k > 0 its input side and first k blocks (`freeze_layers`; a frozen tower runs in eval mode, without dropout).
    gather: negatives from every rank (False: each rank contrasts its own batch only). prompt: the zero-shot
    template. zeroshot_every: validate zero-shot every n-th validation (0: never). audio_init_from /
    text_init_from: an omnissl checkpoint or package whose encoder weights start that tower (loaded at `setup`,
    strictly: the tower must be built with the same architecture; a text tower's package also carries the
    tokenizer the DataModule must use, `data.tokenizer`). projection: "mlp" (LAION-CLAP's 2-layer MLP) or
    "linear" (CLIP's single linear map, which keeps a bag-of-words text tower additive in its words).

    Metrics: acc_a2t / acc_t2a (in-batch top-1 of the global batch, local rows), logit_scale (s). At the end of
    a validation epoch: val/a2t_R@{1,5,10}, val/t2a_R@{1,5,10}, val/a2t_mAP@10, val/t2a_mAP@10 on the valid
    split's captions, and val/zeroshot_acc (with _heldout, _seen and _heldout_among_heldout breakdowns when the
    DataModule marks classes held out: `zeroshot_accuracy`).
    """

    def __init__(
        self,
        encoder: Encoder,
        text_encoder: Encoder,
        *,
        dim: int = 512,  # LAION-CLAP joint embedding width
        audio_pool: str = "mean",
        text_pool: str = "first",
        logit_scale_init: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        freeze_audio_layers: int = 0,
        freeze_text_layers: int = 0,
        gather: bool = True,
        prompt: str = PROMPT,
        zeroshot_every: int = 1,
        audio_init_from: str | None = None,
        text_init_from: str | None = None,
        fusion_window_s: float | None = None,
        projection: str = "mlp",
        **base,
    ) -> None:
        super().__init__(**base)
        if not isinstance(text_encoder.frontend, TokenEmbedding):
            raise ValueError(f"the text tower needs a TokenEmbedding frontend, got {type(text_encoder.frontend).__name__}")
        for name, how, enc in (("audio_pool", audio_pool, encoder), ("text_pool", text_pool, text_encoder)):
            if how not in POOLS:
                raise ValueError(f"{name} must be one of {POOLS}, got {how!r}")
            if how == "cls" and enc.cls_token is None:
                raise ValueError(f"{name}='cls' needs a tower with a CLS token")
        if not 1.0 <= logit_scale_init <= max_logit_scale:
            raise ValueError(f"need 1 <= logit_scale_init <= max_logit_scale, got {logit_scale_init}, {max_logit_scale}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if "{label}" not in prompt:
            raise ValueError(f"the zero-shot prompt must contain '{{label}}', got {prompt!r}")
        self.encoder, self.text_encoder = encoder, text_encoder
        # neither tower is masked: a parameter without a gradient would stop DDP (find_unused_parameters False)
        encoder.mask_emb.requires_grad_(False)
        text_encoder.mask_emb.requires_grad_(False)
        self.projection = projection
        self.audio_proj = ProjectionMLP(encoder.dim, dim, linear=projection == "linear")
        self.text_proj = ProjectionMLP(text_encoder.dim, dim, linear=projection == "linear")
        self.logit_scale = LogitScale(math.log(logit_scale_init))
        self.dim, self.audio_pool, self.text_pool = dim, audio_pool, text_pool
        self.max_logit_scale, self.gather, self.prompt = max_logit_scale, gather, prompt
        self.zeroshot_every = zeroshot_every
        self.freeze_audio_layers, self.freeze_text_layers = freeze_audio_layers, freeze_text_layers
        freeze_layers(encoder, freeze_audio_layers)
        freeze_layers(text_encoder, freeze_text_layers)
        self.audio_init_from, self.text_init_from = audio_init_from, text_init_from
        self.fusion_window_s = fusion_window_s
        self.audio_fusion: FeatureFusion | None = None
        if fusion_window_s is not None:
            per_token = getattr(encoder.frontend, "samples_per_token", None)
            if not per_token:
                raise ValueError("fusion_window_s needs an audio tower with a time-based frontend (samples_per_token)")
            self.audio_fusion = FeatureFusion(encoder.dim, int(round(fusion_window_s * SAMPLE_RATE / per_token)))
        self._val: list[tuple[Tensor, Tensor]] = []
        self._validations = 0

    def setup(self, stage: str) -> None:
        """Start the towers from pretrained omnissl runs (before a resumed run's own state is restored), and check
        that the DataModule's tokenizer fits the text tower."""
        for path, tower in ((self.audio_init_from, self.encoder), (self.text_init_from, self.text_encoder)):
            if path and stage == "fit":
                load_encoder_weights(tower, path)
        dm = self.trainer.datamodule if self.attached else None
        pad, vocab = self.text_encoder.frontend.pad_id, self.text_encoder.frontend.embed.num_embeddings
        if dm is not None and getattr(dm, "pad_id", pad) != pad:
            raise ValueError(f"the text tower pads with id {pad} but the DataModule's tokenizer with {dm.pad_id}: "
                             f"build the tower with pad_id={dm.pad_id}")
        if dm is not None and getattr(dm, "vocab_size", vocab) > vocab:
            raise ValueError(f"the DataModule's vocabulary ({dm.vocab_size}) is larger than the text tower's ({vocab}); "
                             "a tower from an MLM run needs that run's tokenizer (data.tokenizer: its package)")

    # --- towers -----------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        for enc, frozen in ((self.encoder, self.freeze_audio_layers), (self.text_encoder, self.freeze_text_layers)):
            if frozen == -1:
                enc.eval()
        return self

    def _tower(self, encoder: Encoder, x: Tensor, lengths: Tensor | None, how: str,
               fusion: FeatureFusion | None = None) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
            tokens = encoder.embed(x, lengths)
        if fusion is not None:
            if tokens.grid is not None and tokens.grid[1] != 1:
                raise ValueError(f"feature fusion needs one token per time step, got a {tokens.grid} patch grid")
            fused, mask = fusion(tokens.x, tokens.padding_mask)
            tokens = tokens._replace(x=fused, padding_mask=mask, grid=None if tokens.grid is None else
                                     (fused.shape[1], 1))
        queries = pool_queries(tokens.padding_mask, how, encoder.num_prefix, tokens.x.shape[0], tokens.x.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
            out = encoder.encode(tokens, queries=queries)  # with queries: the queried rows only, no prefix
            return pool(out.last, out.padding_mask, how, encoder.num_prefix if queries is None else 0)

    def embed_audio(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """audio (B, T) at 16 kHz -> projected audio embeddings (B, P), not normalized."""
        pooled = self._tower(self.encoder, audio, lengths, self.audio_pool, self.audio_fusion)
        return self.audio_proj(pooled.to(self.audio_proj[0].weight.dtype))

    def embed_text(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """token ids (B, N) -> projected text embeddings (B, P), not normalized."""
        pooled = self._tower(self.text_encoder, ids, lengths, self.text_pool)
        return self.text_proj(pooled.to(self.text_proj[0].weight.dtype))

    @property
    def scale(self) -> Tensor:
        """s = exp(logit_scale) within [1, max_logit_scale] (detached, fp32)."""
        return self.logit_scale.value.detach().float()[0].clamp(0.0, math.log(self.max_logit_scale)).exp()

    # --- the objective -----------------------------------------------------------------------------------------

    def step(self, batch: Batch) -> StepOutput:
        a = self.embed_audio(batch.inputs["audio"], batch.lengths.get("audio"))
        t = self.embed_text(batch.inputs["text"], batch.lengths.get("text"))
        loss_sum, count, right_at, right_ta = contrastive_pairs(a, t, self.logit_scale(),
                                                                max_scale=self.max_logit_scale, gather=self.gather)
        if not self.training and batch.ids is not None:  # kept for the epoch's retrieval metrics
            self._val.append((batch.ids.detach(), torch.nn.functional.normalize(a.detach().float(), dim=-1)))
        n = max(int(count), 1)
        metrics: dict[str, Tensor | float] = {"acc_a2t": right_at.float() / n, "acc_t2a": right_ta.float() / n,
                                              "logit_scale": self.scale}
        return StepOutput(self.normalize(loss_sum, count), metrics, a.shape[0])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # LAION-CLAP `train.py`: clamp(logit_scale, 0, ln 100) after every step
            self.logit_scale.value.clamp_(0.0, math.log(self.max_logit_scale))

    # --- evaluation during validation --------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val = []

    @torch.no_grad()
    def embed_texts(self, ids: Sequence[Tensor], batch_size: int = 256) -> Tensor:
        """A list of 1-D token id tensors -> L2-normalized text embeddings (len, P), in batches."""
        pad = self.text_encoder.frontend.pad_id
        out = []
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            lengths = torch.tensor([len(x) for x in chunk], device=self.device)
            padded = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long, device=self.device)
            for j, x in enumerate(chunk):
                padded[j, :len(x)] = torch.as_tensor(x, device=self.device)
            out.append(torch.nn.functional.normalize(self.embed_text(padded, lengths).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule if self.attached else None
        cached, self._val = self._val, []
        if dm is None or self.trainer.sanity_checking:
            return
        self._validations += 1
        metrics: dict[str, float] = {}
        captions = getattr(dm, "eval_captions", None)
        if cached and callable(captions):
            ids = torch.cat([i for i, _ in cached])
            emb = torch.cat([e for _, e in cached])
            if self.trainer.world_size > 1:
                ids, emb = self.gather_rows(ids), self.gather_rows(emb)
            order, keep = unique_first(ids)  # one embedding per clip (padding repeats under DDP dropped)
            clip_ids = order.tolist()
            texts = captions("valid", clip_ids)  # per clip: its K captions' token ids
            metrics.update(retrieval_metrics(emb[keep], self.embed_texts([t for ts in texts for t in ts]),
                                             [len(ts) for ts in texts]))
        zeroshot = getattr(dm, "zeroshot_data", None)
        if callable(zeroshot) and self.zeroshot_every and self._validations % self.zeroshot_every == 0:
            data = zeroshot()
            if data is not None:
                metrics.update(self.zeroshot(data))
        for name, value in metrics.items():
            self.log(f"val/{name}", float(value), sync_dist=False, rank_zero_only=False)

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of x (evaluation only, no gradient), whatever each rank's count."""
        counts = self.all_gather(torch.tensor(x.shape[0], device=x.device)).flatten().tolist()
        most = int(max(counts))
        padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) if x.shape[0] < most else x
        parts = self.all_gather(padded)  # (world, most, ...)
        return torch.cat([parts[r, :int(n)] for r, n in enumerate(counts)])

    @torch.no_grad()
    def zeroshot(self, data) -> dict[str, float]:
        """Zero-shot accuracy on a DataModule's `zeroshot_data()`: (loader of labeled clips, class names,
        tokenize(texts) -> list of id tensors, held-out class flags or None)."""
        loader, classes, tokenize, heldout = data
        classes_emb = self.embed_texts(tokenize([self.prompt.format(label=c) for c in classes]))
        scores, labels, ids = [], [], []
        for batch in loader:
            audio = batch.inputs["audio"].to(self.device)
            lengths = batch.lengths.get("audio")
            a = torch.nn.functional.normalize(self.embed_audio(audio, None if lengths is None
                                                               else lengths.to(self.device)).float(), dim=-1)
            scores.append((a @ classes_emb.t()).cpu())
            labels.append(batch.targets["label"].cpu())
            if batch.ids is not None:
                ids.append(batch.ids.cpu())
        scores_t, labels_t = torch.cat(scores), torch.cat(labels)
        if self.attached and self.trainer.world_size > 1:  # each rank classified its shard of the clips
            scores_t = self.gather_rows(scores_t.to(self.device)).cpu()
            labels_t = self.gather_rows(labels_t.to(self.device)).cpu()
            if len(ids) == len(scores):  # the distributed sampler pads the shards with repeated clips: once each
                _, first = unique_first(self.gather_rows(torch.cat(ids).to(self.device)).cpu())
                scores_t, labels_t = scores_t[first], labels_t[first]
        return zeroshot_accuracy(scores_t, labels_t, heldout)

    # --- checkpoints and packages ------------------------------------------------------------------------------

    def checkpoint_metadata(self) -> dict:
        return {"text_encoder": module_config(self.text_encoder), "dim": self.dim, "audio_pool": self.audio_pool,
                "text_pool": self.text_pool, "max_logit_scale": self.max_logit_scale, "prompt": self.prompt,
                "fusion_window_s": self.fusion_window_s, "projection": self.projection}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # the caption tokenizer belongs to the text tower: kept apart, so that exporting the audio tower alone
        # (`omnissl export`) does not dress it as a text encoder
        tok = checkpoint["omnissl"].pop("tokenizer", None)
        if tok is not None:
            checkpoint["omnissl"]["metadata"]["text_tokenizer"] = tok

    def save_package(self, path: str | Path, *, tokenizer: str | None = None, info: dict | None = None) -> Path:
        """Write both towers and projections: `path` is the audio tower's package (heads audio_proj,
        logit_scale), so `load_encoder(path)` reads the audio tower as any encoder; `path/text` the text tower's
        (head text_proj, with tokenizer.json); `path/clap.json` the settings."""
        out = Path(path)
        heads = {"audio_proj": self.audio_proj, "logit_scale": self.logit_scale}
        if self.audio_fusion is not None:
            heads["audio_fusion"] = self.audio_fusion
        save_backbone(self.encoder, out, heads=heads)
        save_backbone(self.text_encoder, out / "text", heads={"text_proj": self.text_proj})
        if tokenizer is not None:
            (out / "text" / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
        settings = {"format": PACKAGE_FORMAT, "version": 1, "dim": self.dim, "audio_pool": self.audio_pool,
                    "text_pool": self.text_pool, "max_logit_scale": self.max_logit_scale, "prompt": self.prompt,
                    "fusion_window_s": self.fusion_window_s, "projection": self.projection, "info": info or {}}
        (out / "clap.json").write_text(json.dumps(settings, indent=2) + "\n")
        return out


class LogitScale(nn.Module):
    """The learnable log of the logit scale, `value` (1,), read through `forward()` -> a 0-dim tensor.

    A module of its own, not a parameter of the CLAP module itself: FSDP2 (`SSLModule.configure_model`) shards
    child modules and reduces their gradients across ranks, and unshards a module's parameters in its forward;
    it refuses 0-dim parameters, hence the shape (1,). Also the package's "logit_scale" head."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor([float(value)]))

    def forward(self) -> Tensor:
        return self.value[0]


def is_package(path: str | Path) -> bool:
    return (Path(path) / "clap.json").is_file()


def load_package(path: str | Path) -> CLAP:
    """A CLAP written by `CLAP.save_package` (weights only), in eval mode."""
    root = Path(path)
    settings = json.loads((root / "clap.json").read_text())
    if settings.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{root / 'clap.json'}: format={settings.get('format')!r}, expected {PACKAGE_FORMAT!r}")
    audio, text = load_backbone(root), load_backbone(root / "text")
    model = CLAP(audio, text, dim=int(settings["dim"]), audio_pool=settings["audio_pool"],
                 text_pool=settings["text_pool"], max_logit_scale=float(settings["max_logit_scale"]),
                 prompt=settings["prompt"], fusion_window_s=settings.get("fusion_window_s"),
                 projection=settings.get("projection", "mlp"))
    heads = load_head_weights(root)
    load_strict(model.audio_proj, heads["audio_proj"], f"{root} audio_proj")
    if model.audio_fusion is not None:
        load_strict(model.audio_fusion, heads.get("audio_fusion", {}), f"{root} audio_fusion")
    load_strict(model.text_proj, load_head_weights(root / "text")["text_proj"], f"{root / 'text'} text_proj")
    model.logit_scale.value.data.copy_(heads["logit_scale"]["value"].reshape(1))
    return model.eval()


def from_checkpoint(encoder: Encoder, heads: dict[str, dict[str, Tensor]], info: dict) -> CLAP:
    """A CLAP rebuilt from `omnissl.checkpoints.read_checkpoint`'s parts (its audio tower, the other modules'
    weights, checkpoint["omnissl"]), in eval mode."""
    meta = info.get("metadata", {})
    if "text_encoder" not in meta:
        raise ValueError(f"not a CLAP checkpoint (objective {info.get('objective')!r}: no text tower description)")
    text = build_module(meta["text_encoder"], "checkpoint.omnissl.metadata.text_encoder")
    model = CLAP(encoder, text, dim=int(meta["dim"]), audio_pool=meta["audio_pool"], text_pool=meta["text_pool"],
                 max_logit_scale=float(meta["max_logit_scale"]), prompt=meta["prompt"],
                 fusion_window_s=meta.get("fusion_window_s"), projection=meta.get("projection", "mlp"))
    for name in ("text_encoder", "audio_proj", "text_proj") + (("audio_fusion",) if model.audio_fusion else ()):
        load_strict(getattr(model, name), heads.get(name, {}), f"checkpoint {name}.*")
    scale = dict(heads.get("logit_scale", {}))
    if set(scale) == {""}:  # a checkpoint from before LogitScale: the module's own 0-dim parameter `logit_scale`
        scale = {"value": scale[""].reshape(1)}
    load_strict(model.logit_scale, scale, "checkpoint logit_scale.*")
    return model.eval()


# --- retrieval and zero-shot maths (shared by validation and `omnissl zeroshot`) ---------------------------------


def unique_first(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(the distinct ids, ascending; for each, the index of one of its rows in `ids`)."""
    order, inverse = torch.unique(ids, return_inverse=True)
    keep = torch.zeros(len(order), dtype=torch.long, device=ids.device)
    keep[inverse] = torch.arange(len(ids), device=ids.device)
    return order, keep


def retrieval_metrics(audio: Tensor, text: Tensor, per_clip: Sequence[int], ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, float]:
    """LAION-CLAP's retrieval metrics with several captions per clip (`evaluate_clotho_audiocaps`).

    audio (A, P), text (ΣK_a, P) L2-normalized, the captions of clip a contiguous and in clip order;
    per_clip: K_a. text->audio: every caption is a query, rank r (0-based) of its clip; R@k = mean(r < k),
    mAP@10 = mean(1/(r+1) if r < 10 else 0). audio->text: R@k counts a clip when its best-ranked caption is
    within k; mAP@10 = mean over clips of Σ_j j / r_j over its captions' ranks r_j (1-based, ascending, ≤ 10),
    divided by K_a.
    NOTE(ref): LAION takes the ranks in caption order, not sorted (torch.where's row order), although its
    docstring (and Mei et al.'s code it adapts) sorts them; we sort.
    """
    per_clip = list(per_clip)
    if audio.shape[0] != len(per_clip) or text.shape[0] != sum(per_clip) or min(per_clip, default=1) < 1:
        raise ValueError(f"audio {tuple(audio.shape)}, text {tuple(text.shape)} and captions per clip "
                         f"(sum {sum(per_clip)}) disagree")
    sim = audio.float() @ text.float().t()  # (A, ΣK)
    owner = torch.repeat_interleave(torch.arange(len(per_clip), device=sim.device),
                                    torch.as_tensor(per_clip, device=sim.device))
    # text -> audio: rank of the true clip among all clips for each caption (ties count against it)
    t2a = sim.t()  # (ΣK, A)
    true = t2a.gather(1, owner[:, None])
    r_t = (t2a > true).sum(1).float()
    # audio -> text: ranks of each clip's own captions among all captions
    out: dict[str, float] = {}
    best, aps = [], []
    start = 0
    for a, k_a in enumerate(per_clip):
        own = sim[a, start:start + k_a]  # (K_a,)
        r = (sim[a][None, :] > own[:, None]).sum(1).float()  # 0-based rank of each own caption
        r = torch.sort(r).values
        best.append(r[0])
        hit = r < 10
        j = torch.arange(1, int(hit.sum()) + 1, device=sim.device, dtype=torch.float32)
        aps.append((j / (r[hit] + 1)).sum() / k_a)
        start += k_a
    r_a = torch.stack(best)
    for k in ks:
        out[f"a2t_R@{k}"] = float((r_a < k).float().mean())
        out[f"t2a_R@{k}"] = float((r_t < k).float().mean())
    out["a2t_mAP@10"] = float(torch.stack(aps).mean())
    out["t2a_mAP@10"] = float(torch.where(r_t < 10, 1.0 / (r_t + 1), torch.zeros_like(r_t)).mean())
    return out


def zeroshot_accuracy(scores: Tensor, labels: Tensor, heldout: Sequence[bool] | None = None) -> dict[str, float]:
    """Zero-shot accuracies from the prompt scores (N, C) of N clips with true classes `labels` (N,).

    "zeroshot_acc": argmax over all C classes. With `heldout` flagging each class, over the clips whose true class
    is / is not held out: "zeroshot_acc_heldout" / "zeroshot_acc_seen", still the argmax over all C classes (the
    generalized zero-shot setting: a held-out clip must beat every seen prompt too; chance 1/C), and
    "zeroshot_acc_heldout_among_heldout", the argmax over the held-out classes only (the classic zero-shot
    setting of ESC-50 / CLAP papers, where a dataset's whole label set is unseen; chance 1/#held-out)."""
    if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (clips, classes) for {labels.shape[0]} labels, got {tuple(scores.shape)}")
    right = (scores.argmax(-1) == labels).float()
    out = {"zeroshot_acc": float(right.mean())}
    if heldout is not None:
        flags = torch.as_tensor(list(heldout), dtype=torch.bool)
        if len(flags) != scores.shape[1]:
            raise ValueError(f"{len(flags)} held-out flags for {scores.shape[1]} classes")
        held = flags.to(labels.device)[labels]
        for name, sel in (("heldout", held), ("seen", ~held)):
            if bool(sel.any()):
                out[f"zeroshot_acc_{name}"] = float(right[sel].mean())
        if bool(held.any()):
            among = torch.nonzero(flags).flatten().to(scores.device)
            pred = among[scores[held][:, among].argmax(-1)]
            out["zeroshot_acc_heldout_among_heldout"] = float((pred == labels[held]).float().mean())
    return out
