"""Full fine-tuning of a pretrained `Encoder`: utterance classification (mean pooling + linear) and CTC
character recognition, with layer-wise learning-rate decay and a frozen-then-trained feature extractor.

    omnissl fit -c recipes/trainer/cpu.yaml -c recipes/audio/finetune_keywords_tiny_cpu.yaml \
        --model.init_args.pretrained runs/cpu/.../checkpoints/last.ckpt

Parts, each usable alone:
  * `mean_pool`: mean over valid tokens (CLS excluded).
  * `layer_id` / `llrd_param_groups`: BEiT / data2vec 2.0 / MAE layer-wise lr decay. Layer ids: 0 for
    everything below the first block (frontend, feature norm and projection, positions, mask embedding, CLS
    token, and the input LayerNorm of a post-LN trunk), i + 1 for block i, L + 1 for the final LayerNorm of a
    pre-LN trunk and every parameter outside the encoder (the head). Group lr = lr * decay ** (L + 1 - id).
    Each layer is split into a weight-decay group and a no-decay group by `omnissl.optim.no_decay`.
  * `FineTune`: the shared LightningModule (encoder forward with freezing and optional masking, LLRD
    optimizer, checks). `UtteranceClassifier` and `CTCRecognizer` add a head and a loss.

Freezing (fairseq `wav2vec2_asr`, REFERENCE §B.2 fine-tuning):
  * `freeze_encoder_steps` = fairseq `freeze_finetune_updates`: for the first N optimizer steps the whole
    encoder runs under `no_grad` (still in train mode: dropout, layerdrop and masking apply) and only the head
    learns.
  * `freeze_frontend_steps`: the feature extractor (the encoder's `frontend`) runs under `no_grad` for the
    first N optimizer steps, then trains like the rest (at its decayed lr). `None` freezes it for the whole run,
    fairseq's `feature_grad_mult: 0.0`, which every wav2vec 2.0 fine-tuning config uses; then its parameters are
    set `requires_grad=False` once (so DDP never waits for their gradients). With N > 0 the extractor's
    parameters get no gradient (`None`: AdamW neither decays nor moves them) until step N; under multi-GPU DDP
    that needs `strategy: ddp_find_unused_parameters_true`, which `setup` checks.
    The feature norm and projection after the extractor always train (fairseq keeps `layer_norm` and
    `post_extract_proj` outside the frozen `feature_extractor`).

Text (sequence classification, RoBERTa's fine-tuning: mean pooling here, see `UtteranceClassifier`): the data is
a `LabeledTextDataModule` and the encoder's frontend is its token embedding, which trains (`freeze_frontend_steps:
0`, recipes/text/finetune_labeled_text_tiny_cpu.yaml). The labeled texts must be tokenized with the pretraining
tokenizer: `link_pretrained_tokenizer` (called by the CLI on the parsed config, before anything is built) points
the DataModule at the tokenizer that travels with the `pretrained` checkpoint or the `load_backbone` package
when none is given, and `setup` refuses a DataModule whose tokenizer is another one.

Legend: B batch, N tokens, D width, K classes, V vocabulary (blank included), L layers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.protocol import BackboneOutput
from omnissl.batch import Batch
from omnissl.checkpoints import load_encoder_weights, read_tokenizer
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.common import atomic_file, data_root
from omnissl.eval.ctc import WORD_SEP, CharVocab, greedy_decode, read_transcripts
from omnissl.eval.metrics import edit_distance
from omnissl.ops import mean_pool
from omnissl.optim import no_decay
from omnissl.ssl.base import SSLModule, StepOutput
from omnissl.ssl.masking import span_mask

# the data split a Lightning stage reads (a sanity check runs the valid split)
SPLIT_OF_STAGE = {"train": "train", "sanity_check": "valid", "validate": "valid", "test": "test"}

# --------------------------------------------------------------------------------------------------- parts


def layer_id(name: str, *, num_layers: int, pre_norm: bool) -> int:
    """Layer index of an encoder parameter named relative to the encoder ("trunk.blocks.3.fc1.weight")
    for layer-wise lr decay: 0 = below the first block, i + 1 = block i, L + 1 = above the last block."""
    if name.startswith("trunk.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("trunk.norm."):
        # NOTE(ref): BEiT has no post-LN input norm; a post-LN trunk's `norm` acts on the embeddings (id 0),
        # a pre-LN trunk's is the final norm, which BEiT puts with the head (L + 1).
        return num_layers + 1 if pre_norm else 0
    return 0


def llrd_param_groups(model: nn.Module, *, encoder: Encoder, layer_decay: float, weight_decay: float,
                      encoder_prefix: str = "encoder.") -> list[dict]:
    """Parameter groups of `model` for layer-wise lr decay, by parameter name.

    Each group: {"params", "weight_decay", "lr_scale", "layer", "name"}; `lr_scale` = layer_decay ** (L + 1 -
    id) (BEiT `LayerDecayValueAssigner`), where parameters under `encoder_prefix` get `layer_id` and every
    other parameter (the head) id L + 1, i.e. scale 1. Frozen (`requires_grad=False`) parameters are left
    out. Groups are ordered by layer, decay group first.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = encoder.num_layers
    trunk = getattr(encoder, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks"):
        if layer_decay < 1.0:
            raise ValueError(f"layer_decay={layer_decay} needs an omnissl Encoder (blocks at trunk.blocks.<i>); "
                             f"{type(encoder).__name__} has none: use layer_decay 1.0")
        trunk = None
    pre_norm = bool(getattr(trunk, "pre_norm", True))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(encoder_prefix):
            lid = layer_id(name[len(encoder_prefix):], num_layers=depth, pre_norm=pre_norm)
        else:
            lid = depth + 1
        decay = not no_decay(name, p)
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid,
            "name": f"layer{lid}.{'decay' if decay else 'no_decay'}",
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


# ------------------------------------------------------------------------------------- text: the tokenizer


def pretrained_source(init_args: Any) -> str | None:
    """Where a fine-tuning config's encoder weights come from: `pretrained` (a checkpoint or package), else the
    `path` of an `encoder: {class_path: omnissl.checkpoints.load_backbone, ...}`; None when neither."""
    if init_args is None:
        return None
    if init_args.get("pretrained"):
        return str(init_args.get("pretrained"))
    enc = init_args.get("encoder")
    if enc is not None and hasattr(enc, "get") and str(enc.get("class_path", "")).endswith("load_backbone"):
        path = (enc.get("init_args") or {}).get("path")
        return None if path is None else str(path)
    return None


def tokenizer_file(text: str) -> Path:
    """The tokenizer JSON `text` as a file in the data cache (`tokenizers/pretrained-<sha256 prefix>/`),
    written once and atomically; the same text always gives the same file."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = data_root() / "cache" / "tokenizers" / f"pretrained-{digest}" / "tokenizer.json"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


def link_pretrained_tokenizer(config: Any) -> None:
    """In place, on a parsed `omnissl fit/validate/test` config: when the model fine-tunes a pretrained encoder
    (`FineTune` subclass with `pretrained` or a `load_backbone` encoder) on a `LabeledTextDataModule` whose
    `tokenizer` is not set, set it to the tokenizer that travels with the pretrained checkpoint or package (so
    the labeled texts get the token ids the encoder was trained on). Other configs are left alone; a
    pretrained source without a tokenizer is left to `FineTune.setup` to refuse."""
    try:
        model_class, data_class = config.get("model.class_path"), config.get("data.class_path")
        init_args = config.get("model.init_args")
    except (KeyError, AttributeError):
        return
    if not (isinstance(model_class, str) and isinstance(data_class, str)):
        return
    if not data_class.endswith("LabeledTextDataModule") or config.get("data.init_args.tokenizer") is not None:
        return
    source = pretrained_source(init_args)
    if source is None:
        return
    text = read_tokenizer(source)
    if text is not None:
        config["data.init_args.tokenizer"] = str(tokenizer_file(text))


# ---------------------------------------------------------------------------------------------- modules


class FineTune(SSLModule):
    """Shared part of the fine-tuning modules: a pretrained encoder run with freezing and optional masking,
    optimized with layer-wise lr decay. Subclasses implement `step` with a head on `self.features(batch)`.

    encoder: the Encoder to fine-tune (a builder in a recipe, or a loaded package).
    pretrained: a Lightning checkpoint of any objective (its `encoder.*` weights) or a bare encoder state
        dict, loaded strictly into `encoder` at construction; None: keep the encoder's weights.
    modality: the Batch input to read.
    layer_decay: lr factor per layer below the head (1.0: none, as in fairseq's wav2vec 2.0 fine-tuning;
        BEiT-B uses 0.65, MAE ViT-B 0.75). freeze_encoder_steps / freeze_frontend_steps: see the module docstring.
    mask_prob / mask_length: wav2vec 2.0-style span masking of the encoder input during training only
        (fairseq fine-tuning `mask_prob` 0.65 / `mask_length` 10 for ASR; 0.0 = off, the default here).
    Optimizer, scheduler, weight_decay, seed: as in SSLModule (the optimizer's lr is the head's lr).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        pretrained: str | None = None,
        modality: str = "audio",
        layer_decay: float = 1.0,  # fairseq wav2vec 2.0 fine-tuning uses none
        freeze_encoder_steps: int = 0,  # fairseq base_100h freeze_finetune_updates 0 (base_10m: 10000)
        freeze_frontend_steps: int | None = None,  # None: always (fairseq feature_grad_mult 0.0)
        mask_prob: float = 0.0,
        mask_length: int = 10,
        **base,
    ) -> None:
        super().__init__(**base)
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if freeze_encoder_steps < 0:
            raise ValueError(f"freeze_encoder_steps must be >= 0, got {freeze_encoder_steps}")
        if freeze_frontend_steps is not None and freeze_frontend_steps < 0:
            raise ValueError(f"freeze_frontend_steps must be >= 0 or null (always), got {freeze_frontend_steps}")
        if not 0.0 <= mask_prob < 1.0 or mask_length < 1:
            raise ValueError(f"need 0 <= mask_prob < 1 and mask_length >= 1, got {mask_prob}, {mask_length}")
        if pretrained is not None:
            load_encoder_weights(encoder, pretrained)
        # text: the tokenizer the encoder was pretrained with (None: unknown, e.g. a random-init encoder)
        self.pretrained_tokenizer = read_tokenizer(pretrained) if pretrained is not None and modality == "text" \
            else None
        self.encoder, self.modality = encoder, modality
        self.layer_decay = layer_decay
        self.freeze_encoder_steps, self.freeze_frontend_steps = freeze_encoder_steps, freeze_frontend_steps
        self.mask_prob, self.mask_length = mask_prob, mask_length
        if freeze_frontend_steps is None:
            encoder.frontend.requires_grad_(False)
        if mask_prob == 0.0:
            encoder.mask_emb.requires_grad_(False)  # never used: no parameter without a gradient under DDP

    # --- encoder forward ------------------------------------------------------------------------------

    def encoder_frozen(self) -> bool:
        return self.global_step < self.freeze_encoder_steps if self._trainer is not None else False

    def frontend_frozen(self) -> bool:
        if self.freeze_frontend_steps is None:
            return True
        return self.global_step < self.freeze_frontend_steps if self._trainer is not None else False

    def features(self, batch: Batch, *, return_layers: bool = False) -> BackboneOutput:
        """Encode the batch's input with the freezing and masking in force at this step."""
        x, lengths = batch.inputs[self.modality], batch.lengths.get(self.modality)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen()):
            tokens = self.encoder.embed(x, lengths, grad_scale=0.0 if self.frontend_frozen() else 1.0)
            mask = None
            if self.training and self.mask_prob > 0.0:
                # NOTE(ref): fairseq's fine-tuning also masks feature channels (mask_channel_prob/length) and
                # uses min_masks 2; we mask time spans only, with at least one span, which short clips allow.
                b, n, _ = tokens.x.shape
                mask = span_mask((b, n), padding_mask=tokens.padding_mask, mask_prob=self.mask_prob,
                                 span=self.mask_length, min_spans=1, same_count=False,
                                 generator=self.generator(x.device), device=x.device)
            return self.encoder.encode(tokens, mask=mask, return_layers=return_layers)

    # --- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.modality == "text":
            self.check_text_data(self.trainer.datamodule)

    def check_text_data(self, dm: Any) -> None:
        """A text DataModule must tokenize with the encoder's pretraining tokenizer: its vocabulary must fit the
        token embedding, and when the pretrained checkpoint carries a tokenizer, the DataModule's must be the
        same (ValueError naming both otherwise)."""
        path = getattr(dm, "tokenizer_path", None)
        if dm is None or path is None:
            raise ValueError(f"modality text needs a text DataModule with a tokenizer (LabeledTextDataModule), "
                             f"got {type(dm).__name__}")
        rows = self.encoder.frontend.embed.num_embeddings
        if dm.vocab_size > rows:
            raise ValueError(f"the DataModule's tokenizer {path} has {dm.vocab_size} tokens but the encoder embeds "
                             f"only {rows}: tokenize with the pretraining tokenizer (data.init_args.tokenizer)")
        if self.pretrained_tokenizer is not None and Path(path).read_text(encoding="utf-8") != self.pretrained_tokenizer:
            raise ValueError(f"the DataModule tokenizes with {path}, not the tokenizer the pretrained encoder was "
                             f"trained with (it travels with the checkpoint): drop data.init_args.tokenizer to use "
                             f"that one, or pass a package's tokenizer.json")
        pad = getattr(self.encoder.frontend.embed, "padding_idx", None)
        if pad is not None and pad != dm.pad_id:
            raise ValueError(f"the encoder's padding id is {pad} but the tokenizer's <pad> is {dm.pad_id} ({path})")

    def on_fit_start(self) -> None:
        # after the strategy wrapped the model: DDP says itself whether it accepts parameters without gradients
        temporary = self.freeze_encoder_steps > 0 or (self.freeze_frontend_steps or 0) > 0
        ddp = self.trainer.strategy.model
        if (temporary and self.trainer.world_size > 1 and isinstance(ddp, DistributedDataParallel)
                and not ddp.find_unused_parameters):
            raise ValueError(
                f"freeze_encoder_steps={self.freeze_encoder_steps} / freeze_frontend_steps="
                f"{self.freeze_frontend_steps} leave parameters without gradients for some steps, which DDP "
                "rejects: set trainer.strategy: ddp_find_unused_parameters_true"
            )

    def configure_optimizers(self):
        groups = llrd_param_groups(self, encoder=self.encoder, layer_decay=self.layer_decay,
                                   weight_decay=self.weight_decay)
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:  # the optimizer's lr is the head's; lower layers get a fraction
            group["lr"] = group["lr"] * group["lr_scale"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)  # schedules scale each group's own initial lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._micro = 0
        self._log_metrics("test", self.step(batch))


class UtteranceClassifier(FineTune):
    """Utterance classification: mean-pooled output of one encoder layer -> Linear(D, K), cross-entropy.

    num_classes: K; must equal the DataModule's `num_classes` when it has one (checked at setup).
    layer: which of the L + 1 layer outputs to pool (-1: the last, as in HF `Wav2Vec2ForSequenceClassification`
    without its weighted layer sum).
    Metrics: acc (top-1). Batches need `targets["label"]` (B,) int64.
    """

    def __init__(self, encoder: Encoder, *, num_classes: int, layer: int = -1, **base) -> None:
        super().__init__(encoder, **base)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not -(encoder.num_layers + 1) <= layer <= encoder.num_layers:
            raise ValueError(f"layer {layer} out of range for an encoder with {encoder.num_layers} + 1 layer outputs")
        self.num_classes, self.layer = num_classes, layer
        # NOTE(ref): HF Wav2Vec2ForSequenceClassification projects to 256 before pooling, then classifies; the
        # issue asks for pooling + linear, and a linear map commutes with mean pooling, so one Linear suffices.
        self.head = nn.Linear(encoder.dim, num_classes)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        found = getattr(dm, "num_classes", None) if dm is not None else None
        if dm is not None and hasattr(dm, "num_classes") and found is None:
            raise ValueError(f"{type(dm).__name__} has no labels (num_classes is None): fine-tuning a classifier "
                             "needs a labeled manifest (a third column) or a labeled DataModule")
        if found is not None and found != self.num_classes:
            raise ValueError(f"model.init_args.num_classes={self.num_classes} but the data has {found} classes "
                             f"({type(dm).__name__})")

    def logits(self, batch: Batch) -> Tensor:
        """(B, K) fp32 logits."""
        out = self.features(batch, return_layers=self.layer != -1)
        h = out.last if self.layer == -1 else out.layers[self.layer]
        return self.head(mean_pool(h, out.padding_mask, self.encoder.num_prefix)).float()

    def step(self, batch: Batch) -> StepOutput:
        if "label" not in batch.targets:
            raise ValueError("UtteranceClassifier needs targets['label'] in every batch: use labeled data")
        labels = batch.targets["label"]
        logits = self.logits(batch)
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"labels {sorted(set(labels.tolist()))} outside [0, {self.num_classes}) "
                             f"for samples {[] if batch.ids is None else batch.ids.tolist()}")
        loss = self.normalize(F.cross_entropy(logits, labels, reduction="sum"), labels.numel())
        acc = (logits.argmax(-1) == labels).float().mean()
        return StepOutput(loss, {"acc": acc}, labels.numel())


class CTCRecognizer(FineTune):
    """Character recognition with CTC (wav2vec 2.0 fine-tuning, Baevski et al. 2020 sec. 4.3): a linear layer
    over the last encoder layer's frames -> V = blank + `alphabet` characters, CTC loss summed over utterances
    and divided by the number of target characters (fairseq's `ctc` criterion), greedy best-path decoding.

    alphabet: the output characters in fairseq letter format ("|" ends a word); index 0 is the blank. The
        default is fairseq's LibriSpeech letter dictionary (26 letters, apostrophe, word boundary). Fixed at
        construction so the head, its checkpoint and its outputs do not depend on the data; `setup` checks
        that every training transcript fits it.
    Transcripts: fairseq `.ltr` letter files (or `.wrd` word files) beside each manifest of an AudioDataModule
        (`omnissl.eval.ctc.read_transcripts`), one line per manifest line; the embedded speech corpora ship
        them. Read once at setup and looked up by the batch's sample ids.
    Metrics: `val/cer`, `val/wer` (`test/...`): corpus-level rates (total edits / total reference length over
        the whole split and all ranks, `omnissl.eval.metrics`), plus the per-batch loss.
    """

    def __init__(self, encoder: Encoder, *, alphabet: str = "|'ABCDEFGHIJKLMNOPQRSTUVWXYZ", **base) -> None:
        super().__init__(encoder, **base)
        if len(set(alphabet)) != len(alphabet) or not alphabet or any(c.isspace() for c in alphabet):
            raise ValueError(f"alphabet must be distinct non-space characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.vocab = CharVocab(["<blank>", *alphabet])
        self.head = nn.Linear(encoder.dim, len(self.vocab))
        self._targets: dict[str, list[Tensor]] = {}  # split -> (M,) int64 per dataset index
        self._texts: dict[str, list[str]] = {}  # split -> reference words per dataset index
        self._errors: dict[str, Tensor] = {}

    # --- transcripts ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        datasets = {s: dm.dataset(s) for s in ("train", "valid", "test")} if isinstance(dm, AudioDataModule) else {}
        datasets = {s: ds for s, ds in datasets.items() if ds is not None}
        if not datasets:
            raise ValueError(f"CTCRecognizer needs an AudioDataModule (manifests with transcripts beside them), "
                             f"got {type(dm).__name__}")
        for split, ds in datasets.items():
            source, lines = read_transcripts(ds.source)
            if len(lines) != len(ds.manifest):
                raise ValueError(f"{source} has {len(lines)} lines but {ds.source} lists "
                                 f"{len(ds.manifest)} utterances")
            rows = [lines[int(r)] for r in ds.rows]
            unknown = sorted({c for line in rows for c in line.split()} - set(self.alphabet))
            if unknown and split == "train":
                raise ValueError(f"{source}: characters {unknown} are not in model.init_args.alphabet="
                                 f"{self.alphabet!r}")
            keep = set(self.alphabet)  # held-out splits: characters outside the alphabet cannot be produced
            self._targets[split] = [self.vocab.encode(" ".join(c for c in line.split() if c in keep),
                                                      f"{source}:{int(r) + 1}") for line, r in zip(rows, ds.rows)]
            self._texts[split] = [" ".join(line.replace(" ", "").replace(WORD_SEP, " ").split()) for line in rows]

    def split(self) -> str:
        """The data split of the running stage ("train" outside a Trainer)."""
        stage = self.trainer.state.stage if self._trainer is not None else None
        return "train" if stage is None else SPLIT_OF_STAGE.get(stage.value, "train")

    def _lookup(self, batch: Batch, split: str) -> tuple[list[Tensor], list[str]]:
        if batch.ids is None:
            raise ValueError("CTCRecognizer needs batch.ids to find each utterance's transcript")
        if split not in self._targets:
            raise RuntimeError(f"no transcripts for the {split} split: setup() has not read them")
        ids = batch.ids.tolist()
        return [self._targets[split][i] for i in ids], [self._texts[split][i] for i in ids]

    # --- steps --------------------------------------------------------------------------------------------

    def log_probs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """-> ((B, N, V) fp32 log-probabilities, (B,) valid frame counts)."""
        out = self.features(batch)
        x = out.last[:, self.encoder.num_prefix:]
        b, n = x.shape[:2]
        pad = out.padding_mask
        lengths = torch.full((b,), n, device=x.device) if pad is None else (~pad[:, self.encoder.num_prefix:]).sum(1)
        return F.log_softmax(self.head(x).float(), dim=-1), lengths

    def step(self, batch: Batch) -> StepOutput:
        split = self.split()
        targets, texts = self._lookup(batch, split)
        lp, lengths = self.log_probs(batch)
        target_lengths = torch.tensor([len(t) for t in targets], device=lp.device)
        too_long = (target_lengths > lengths).nonzero().flatten().tolist()
        if too_long:
            raise ValueError(f"samples {[int(batch.ids[i]) for i in too_long]} have more characters than encoder "
                             f"frames ({self.encoder.samples_per_token} samples per frame): CTC cannot align them")
        # NOTE(ref): fairseq's ctc criterion uses zero_infinity=True as well; we keep the sum (not mean) and
        # divide by all ranks' target characters, fairseq's sample_size with sentence_avg=False.
        loss_sum = F.ctc_loss(lp.transpose(0, 1), torch.cat(targets).to(lp.device), lengths, target_lengths,
                              blank=self.vocab.blank, reduction="sum", zero_infinity=True)
        loss = self.normalize(loss_sum, target_lengths.sum())
        if split != "train":
            self.score(lp, lengths, texts, split)
        return StepOutput(loss, {}, len(targets))

    def score(self, lp: Tensor, lengths: Tensor, refs: list[str], split: str) -> None:
        """Add a batch's character and word edits (and reference lengths) to the split's running counts."""
        hyps = [self.vocab.text(ids) for ids in greedy_decode(lp, lengths, self.vocab.blank)]
        counts = torch.tensor([
            sum(edit_distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs),
            sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)), sum(len(r.split()) for r in refs),
        ], dtype=torch.float64)
        self._errors[split] = self._errors.get(split, torch.zeros(4, dtype=torch.float64)) + counts

    def _log_rates(self, stage: str, split: str) -> None:
        counts = self._errors.pop(split, torch.zeros(4, dtype=torch.float64)).to(self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[1] > 0:
            self.log(f"{stage}/cer", float(counts[0] / counts[1]), rank_zero_only=True)
        if counts[3] > 0:
            self.log(f"{stage}/wer", float(counts[2] / counts[3]), rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_rates("val", "valid")

    def on_test_epoch_end(self) -> None:
        self._log_rates("test", "test")
