"""Probing frozen encoders, SUPERB-style: every hidden state, a learned weighted sum, a small head.

The split follows s3prl (REFERENCE.md §3): an *upstream* gives all hidden states h_0 … h_L at a declared
downsample rate (`samples_per_token`); a *featurizer* mixes them with softmax weights (init 0, so uniform) or
picks one layer; a *downstream* head is trained on top while the upstream stays frozen.

    states = EncoderStates(encoder)                              # or baseline_states("audio"), ...
    train = extract(states, train_loader, frames=False)          # cached once: (U, S, D) pooled states
    result = fit_classifier(train, valid, test, head="linear")   # ProbeResult: test accuracy, layer weights

    train = extract(states, loader, frames=True, transcripts=...) # per-utterance (N_u, S, D) frames
    result = fit_ctc(train, valid, test, vocab, head="linear")    # ProbeResult: test CER (and WER)

Frozen features are computed once per utterance and cached, so the head trains for many epochs in seconds.
Utterance classification mean-pools each state over valid frames *before* the weighted sum; that equals
pooling after it, because the only learned part of the featurizer (the softmax weights) is linear and every
fixed normalization (s3prl's per-frame LayerNorm, our train-set standardization) is applied per state first.

The first version's helpers stay: `pooled_features` (mean-pooled states of a frozen encoder) and
`linear_probe_accuracy` / `probe_layers` (scikit-learn logistic regression per layer; bench/learning_check.py).

Legend: U utterances, B batch, N frames/tokens, S = L + 1 hidden states, D width, K classes, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from omnissl.batch import Batch
from omnissl.eval.metrics import accuracy, cer, wer

# --------------------------------------------------------------------------------------------------------
# upstream: hidden states of a frozen encoder, or of a non-learned baseline


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
    """Non-learned audio baseline: one state, 64-bin log-mel frames (25 ms window, 10 ms hop, no centring),
    log(mel + 1e-6) — the features of bench/baseline_speech.py, at 160 samples per frame."""

    num_states, samples_per_token = 1, 160

    def __init__(self, n_mels: int = 64) -> None:
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=n_mels,
                                                        center=False)
        self.dim = n_mels

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if batch_modality(batch) != "audio":
            raise ValueError("LogMelStates takes audio batches")
        x = batch.inputs["audio"]
        if x.shape[1] < 400:
            raise ValueError(f"audio of {x.shape[1]} samples is shorter than one 25 ms frame (400 samples)")
        mel = torch.log(self.mel.to(x.device)(x.float()) + 1e-6)  # (B, n_mels, N)
        hs = rearrange(mel, "b d n -> b n 1 d")
        lengths = batch.lengths.get("audio", torch.full((x.shape[0],), x.shape[1], device=x.device))
        frames = (lengths - 400).div(160, rounding_mode="floor") + 1
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
            w = valid.to(hs.dtype)[..., None, None]  # (B, N, 1, 1)
            xs.append(((hs * w).sum(1) / w.sum(1).clamp(min=1)).cpu())
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


def pooled_features(encoder: nn.Module, batches: Iterable[Batch], modality: str) -> tuple[Tensor, Tensor]:
    """Mean-pool every layer's output over valid tokens (CLS excluded). -> ((U, L + 1, D) float32, (U,) labels),
    in dataset-id order. The encoder runs frozen (see `frozen`)."""
    def checked(batches: Iterable[Batch]) -> Iterator[Batch]:
        for b in batches:
            if batch_modality(b) != modality:
                raise ValueError(f"expected {modality} batches, got {batch_modality(b)}")
            yield b

    with frozen(encoder):
        feats = extract(EncoderStates(encoder), checked(batches), frames=False)
    return feats.x, feats.labels


# --------------------------------------------------------------------------------------------------------
# featurizer and heads


class Featurizer(nn.Module):
    """Weighted sum of S hidden states (s3prl's Featurizer): softmax(w) with w initialized to 0, so uniform;
    or one fixed state (`layer`). Each state is first standardized by fixed per-state, per-channel statistics
    of the training split (`shift`, `scale`, set by `fit_statistics`).

    # NOTE(ref): s3prl mixes raw states (optionally LayerNorm'd per frame); we also standardize each state
    # with training-set statistics, because states of different layers differ in scale by orders of
    # magnitude (conv features vs. post-LN blocks), and otherwise the learned weights mostly measure scale.

    hs (..., S, D) -> (..., D).
    """

    def __init__(self, num_states: int, dim: int, *, layer: int | None = None) -> None:
        super().__init__()
        if layer is not None and not -num_states <= layer < num_states:
            raise ValueError(f"layer {layer} out of range for {num_states} hidden states")
        self.num_states, self.layer = num_states, (None if layer is None else layer % num_states)
        self.logits = nn.Parameter(torch.zeros(num_states), requires_grad=layer is None)
        self.register_buffer("shift", torch.zeros(num_states, dim))
        self.register_buffer("scale", torch.ones(num_states, dim))

    @torch.no_grad()
    def fit_statistics(self, hs: Tensor) -> None:
        """Per-state, per-channel mean and standard deviation of (M, S, D) training vectors."""
        hs = hs.float()
        std = hs.std(0, unbiased=False)
        self.shift.copy_(hs.mean(0))
        self.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant in train: left unscaled

    @torch.no_grad()
    def weights(self) -> Tensor:
        """(S,) the mixing weights (one-hot for a fixed layer), detached; they sum to 1."""
        if self.layer is not None:
            return F.one_hot(torch.tensor(self.layer), self.num_states).float()
        return self.logits.softmax(0)

    def forward(self, hs: Tensor) -> Tensor:
        if hs.shape[-2] != self.num_states:
            raise ValueError(f"expected {self.num_states} hidden states, got {hs.shape[-2]}")
        z = (hs.float() - self.shift) / self.scale
        if self.layer is not None:
            return z[..., self.layer, :]
        return torch.einsum("...sd,s->...d", z, self.logits.softmax(0))


def classifier_head(dim: int, num_classes: int, kind: str = "linear", *, hidden: int = 256,
                    dropout: float = 0.1) -> nn.Module:
    """Utterance classifier on pooled features: "linear" (D -> K) or "mlp" (D -> hidden -> ReLU -> K)."""
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown classification head {kind!r}; expected linear or mlp")


class CTCHead(nn.Module):
    """Frame classifier over V = vocabulary + blank for CTC. x (B, N, D), lengths (B,) -> log-probabilities
    (B, N, V).

    "linear" (D -> V): SUPERB's phoneme-recognition downstream (and wav2vec 2.0 fine-tuning's output layer);
    the default, since it measures what the frames themselves encode and trains in seconds on a CPU.
    "lstm": a bidirectional LSTM, then 2 x hidden -> V; SUPERB's ASR downstream (2 x 1024). It adds context
    the upstream may lack, and is slow without a GPU (1 x 256 wide: 12 s per batch of 8 x 10 s utterances,
    forward and backward, measured on one shared CPU core).
    """

    def __init__(self, dim: int, vocab_size: int, kind: str = "linear", *, hidden: int = 256, layers: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in ("linear", "lstm"):
            raise ValueError(f"unknown CTC head {kind!r}; expected linear or lstm")
        self.kind = kind
        self.rnn = (nn.LSTM(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)
                    if kind == "lstm" else None)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden if self.rnn is not None else dim, vocab_size)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.out(self.dropout(x)).log_softmax(-1)


# --------------------------------------------------------------------------------------------------------
# CTC vocabulary and decoding


WORD_SEP = "|"


@dataclass
class CharVocab:
    """Characters of the training transcripts plus the CTC blank at index 0. Transcripts are fairseq letter
    lines ("H I | T H E R E |"): tokens separated by spaces, "|" ending each word."""

    symbols: list[str]
    blank: int = 0

    @classmethod
    def from_transcripts(cls, lines: Sequence[str], source: str = "?") -> "CharVocab":
        chars = sorted({c for line in lines for c in line.split()})
        if not chars:
            raise ValueError(f"{source}: the training transcripts are empty")
        return cls(["<blank>", *chars])

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, line: str, where: str = "?") -> Tensor:
        """A letter line -> (M,) int64; a character unseen in training raises naming `where`."""
        index = {s: i for i, s in enumerate(self.symbols)}
        out = []
        for c in line.split():
            if c not in index or index[c] == self.blank:
                raise ValueError(f"{where}: character {c!r} does not occur in the training transcripts")
            out.append(index[c])
        return torch.tensor(out, dtype=torch.int64)

    def text(self, ids: Sequence[int]) -> str:
        """Label ids -> words separated by single spaces ("|" -> word boundary)."""
        return " ".join("".join(self.symbols[i] for i in ids).replace(WORD_SEP, " ").split())


def greedy_decode(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs (B, N, V), lengths (B,)."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        row = row[:n]
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(t) for t in row[keep & (row != blank)]])
    return out


def read_transcripts(manifest: str | Path) -> tuple[Path, list[str]]:
    """The letter transcripts beside a manifest: `X.ltr` (fairseq letters), else `X.wrd` (words, converted).
    -> (the file read, one letter line per manifest line)."""
    manifest = Path(manifest)
    ltr, wrd = manifest.with_suffix(".ltr"), manifest.with_suffix(".wrd")
    if ltr.is_file():
        return ltr, ltr.read_text(encoding="utf-8").splitlines()
    if wrd.is_file():
        lines = wrd.read_text(encoding="utf-8").splitlines()
        return wrd, [" ".join(" ".join(w) + " " + WORD_SEP for w in line.split()) for line in lines]
    raise FileNotFoundError(f"{manifest}: no transcripts for the CTC probe (expected {ltr.name} or {wrd.name} "
                            "beside the manifest, one line per utterance)")


def attach_transcripts(feats: Features, lines: Sequence[str], source: str, *, vocab: CharVocab | None = None,
                       rows: Sequence[int] | None = None) -> Features:
    """Give frame features their transcripts: the utterance with dataset id i gets letter line `rows[i]`
    (default: line i) as `texts`, and with a `vocab` (the training split) as `targets` too. Held-out splits
    need no vocab: a character never seen in training is simply one the probe cannot produce."""
    texts, targets = [], []
    for i in feats.ids.tolist():
        row = i if rows is None else int(rows[i])
        if row >= len(lines):
            raise ValueError(f"{source} has {len(lines)} lines but the manifest lists utterance {row + 1}")
        texts.append(" ".join(lines[row].replace(" ", "").replace(WORD_SEP, " ").split()))
        if vocab is not None:
            targets.append(vocab.encode(lines[row], f"{source}:{row + 1}"))
    feats.texts, feats.targets = texts, (targets if vocab is not None else None)
    return feats


# --------------------------------------------------------------------------------------------------------
# training


@dataclass
class ProbeResult:
    """What a probe measured. metric: "accuracy" (higher is better) or "cer" (lower is better)."""

    metric: str
    test: float
    valid: float | None
    train: float
    layer_weights: list[float]
    best_epoch: int
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fit(model: nn.Module, loss_of, score_of, train_n: int, *, valid: bool, higher_is_better: bool, epochs: int,
         lr: float, batch_size: int, seed: int, weight_decay: float = 0.0) -> int:
    """Adam over shuffled mini-batches of `train_n` items for `epochs` (weight decay on the head only, not on
    the featurizer's layer logits); after each epoch `score_of("valid")`
    selects the best state (kept in `model` at the end). Without a valid split the last epoch is kept.
    Returns the selected epoch (1-based)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not n.endswith("logits")], "weight_decay": weight_decay},
              {"params": [p for n, p in params if n.endswith("logits")], "weight_decay": 0.0}]  # layer weights
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = None, None, epochs
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(train_n, generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_of(idx)
                loss.backward()
            opt.step()
        if valid:
            model.eval()
            with torch.no_grad():
                score = score_of("valid")
            if best is None or (score > best if higher_is_better else score < best):
                best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best_epoch


def _check_labels(train: Features, others: dict[str, Features | None], num_classes: int | None) -> int:
    if train.labels is None:
        raise ValueError(f"{train.source}: the training split has no labels")
    k = int(train.labels.max()) + 1 if num_classes is None else num_classes
    seen = set(train.labels.tolist())
    for name, f in others.items():
        if f is None:
            continue
        if f.labels is None:
            raise ValueError(f"{f.source}: the {name} split has no labels")
        unseen = sorted(set(f.labels.tolist()) - seen)
        if unseen:
            raise ValueError(f"{f.source}: {name} labels {unseen[:10]} never occur in the training split "
                             f"({train.source})")
    return k


def fit_classifier(train: Features, valid: Features | None, test: Features, *, head: str = "linear",
                   layer: int | None = None, num_classes: int | None = None, epochs: int = 60, lr: float = 1e-2,
                   batch_size: int = 32, weight_decay: float = 1e-4, seed: int = 0,
                   device: torch.device | str = "cpu") -> ProbeResult:
    """Featurizer + classification head on pooled features; selects the epoch on valid accuracy, reports
    test accuracy and the learned layer weights. Labels of valid/test must occur in train (ValueError
    naming the split's source and the labels otherwise); `num_classes` defaults to max(train label) + 1."""
    k = _check_labels(train, {"valid": valid, "test": test}, num_classes)
    dim = train.x.shape[-1]
    with _seeded(seed):
        feat = Featurizer(train.num_states, dim, layer=layer)
        feat.fit_statistics(train.x)
        model = nn.Sequential(feat, classifier_head(dim, k, head)).to(device)
    data = {s: (f.x.to(device), f.labels.to(device)) for s, f in (("train", train), ("valid", valid), ("test", test))
            if f is not None}

    def loss_of(idx: Tensor) -> Tensor:
        x, y = data["train"]
        return F.cross_entropy(model(x[idx]), y[idx])

    def score_of(split: str) -> float:
        x, y = data[split]
        with torch.no_grad():
            return accuracy(model(x), y)

    with _seeded(seed):
        best_epoch = _fit(model, loss_of, score_of, len(train), valid=valid is not None, higher_is_better=True,
                          epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay)
    return ProbeResult("accuracy", score_of("test"), score_of("valid") if valid is not None else None,
                       score_of("train"), feat.weights().tolist(), best_epoch)


def _pad_frames(xs: Sequence[Tensor], device) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(x) for x in xs], dtype=torch.int64)
    out = xs[0].new_zeros((len(xs), int(lengths.max()), *xs[0].shape[1:]))
    for i, x in enumerate(xs):
        out[i, : len(x)] = x
    return out.to(device).float(), lengths.to(device)


def fit_ctc(train: Features, valid: Features | None, test: Features, vocab: CharVocab, *, head: str = "linear",
            layer: int | None = None, epochs: int = 40, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
            hidden: int = 256, device: torch.device | str = "cpu") -> ProbeResult:
    """Featurizer + CTC head on frame features with label sequences (`attach_transcripts`); greedy decoding;
    selects the epoch on valid CER; reports test CER (metric "cer") and WER (`extra["wer"]`)."""
    for f in (train, valid, test):
        if f is not None and f.texts is None:
            raise ValueError(f"{f.source}: frame features without transcripts (see attach_transcripts)")
    if train.targets is None:
        raise ValueError(f"{train.source}: training transcripts need the vocabulary (attach_transcripts(vocab=))")
    too_short = [int(i) for i, x, t in zip(train.ids, train.x, train.targets) if len(x) < len(t)]
    if 2 * len(too_short) > len(train):
        raise ValueError(f"{train.source}: {len(too_short)} of {len(train)} utterances have fewer frames than "
                         f"characters (e.g. id {too_short[0]}): the upstream's frame rate is too low for character CTC")
    if too_short:  # no CTC alignment exists: their loss is infinite and zeroed (zero_infinity), as in fairseq
        warnings.warn(f"{train.source}: {len(too_short)} training utterances have fewer frames than characters "
                      f"(e.g. id {too_short[0]}); they do not contribute to the CTC loss", stacklevel=2)
    dim = train.x[0].shape[-1]
    with _seeded(seed):
        feat = Featurizer(train.num_states, dim, layer=layer)
        feat.fit_statistics(torch.cat(list(train.x)))
        model = nn.ModuleDict({"feat": feat, "head": CTCHead(dim, len(vocab), head, hidden=hidden)}).to(device)
    splits = {"train": train, "valid": valid, "test": test}

    def forward(f: Features, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        x, lengths = _pad_frames([f.x[i] for i in idx], device)
        return model["head"](model["feat"](x), lengths), lengths

    def loss_of(idx: Tensor) -> Tensor:
        lp, lengths = forward(train, idx.tolist())
        tgt = [train.targets[i] for i in idx.tolist()]
        tl = torch.tensor([len(t) for t in tgt])
        # summed over utterances, divided by the number of target characters (fairseq's ctc criterion)
        loss = F.ctc_loss(lp.transpose(0, 1), torch.cat(tgt).to(device), lengths, tl.to(device),
                          blank=vocab.blank, reduction="sum", zero_infinity=True)
        return loss / tl.sum().clamp(min=1)

    def decode(split: str) -> tuple[list[str], list[str]]:
        f = splits[split]
        refs, hyps = [], []
        with torch.no_grad():
            for start in range(0, len(f), batch_size):
                idx = list(range(start, min(start + batch_size, len(f))))
                lp, lengths = forward(f, idx)
                hyps += [vocab.text(h) for h in greedy_decode(lp, lengths, vocab.blank)]
                refs += [f.texts[i] for i in idx]
        return refs, hyps

    def score_of(split: str) -> float:
        return cer(*decode(split))

    with _seeded(seed):
        best_epoch = _fit(model, loss_of, score_of, len(train), valid=valid is not None, higher_is_better=False,
                          epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    refs, hyps = decode("test")
    return ProbeResult("cer", cer(refs, hyps), score_of("valid") if valid is not None else None, score_of("train"),
                       feat.weights().tolist(), best_epoch, {"wer": wer(refs, hyps)})


# --------------------------------------------------------------------------------------------------------
# first version: scikit-learn logistic regression per layer


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, c: float = 1.0,
                          seed: int = 0) -> float:
    """Standardized features -> multinomial logistic regression (L2, strength 1/c) -> test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    unseen = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen} never occur in the training split")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(train_x.numpy().astype(np.float64), train_y.numpy())
    return float(clf.score(test_x.numpy().astype(np.float64), test_y.numpy()))


def probe_layers(encoder: nn.Module, train: Iterable[Batch], test: Iterable[Batch], modality: str,
                 layers: list[int] | None = None) -> dict[int, float]:
    """Accuracy of a linear probe on each chosen layer (default: all L + 1) of a frozen encoder."""
    tr_x, tr_y = pooled_features(encoder, train, modality)
    te_x, te_y = pooled_features(encoder, test, modality)
    chosen = range(tr_x.shape[1]) if layers is None else layers
    return {k: linear_probe_accuracy(tr_x[:, k], tr_y, te_x[:, k], te_y) for k in chosen}


# --------------------------------------------------------------------------------------------------------
# data: labeled manifests and embedded specs -> loaders

_AUDIO_EMBEDDED = ("speech", "keywords", "speakers", "tiny", "small", "default")
_SPLITS = ("train", "valid", "test")


def source_modality(spec: str) -> str:
    """"audio", "text" or "image" for a manifest, a folder, a .jsonl file or an embedded spec."""
    from omnissl.datamodules.audio import EXTENSIONS as AUDIO_EXTENSIONS
    from omnissl.datamodules.common import is_embedded, read_manifest
    from omnissl.datamodules.image import IMAGE_EXTENSIONS

    if is_embedded(spec):
        name = spec.split(":")[1]
        if name in _AUDIO_EMBEDDED:
            return "audio"
        if name in ("labeled_text", "labeled_images"):
            return "text" if name == "labeled_text" else "image"
        raise ValueError(f"{spec!r} names no labeled embedded corpus; expected embedded:keywords:<size>, "
                         "embedded:speakers:<size>, embedded:<size> (speech, for --task ctc), "
                         "embedded:labeled_text[:<size>] or embedded:labeled_images[:<size>]")
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl":
        return "text"
    if path.is_dir():
        first = next((p for p in sorted(path.rglob("*"))
                      if p.suffix.lower() in AUDIO_EXTENSIONS + tuple(IMAGE_EXTENSIONS)), None)
        if first is None:
            raise ValueError(f"{path}: the folder holds no audio or image files")
        ext = first.suffix.lower()
    else:
        _, rows = read_manifest(path)
        if not rows:
            raise ValueError(f"{path}: the manifest lists no items")
        ext = Path(rows[0][0]).suffix.lower()
    return "audio" if ext in AUDIO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else "text"


def _embedded_size(spec: str) -> tuple[str, str]:
    """'embedded:labeled_text:tiny' -> ('embedded:labeled_text', 'tiny'); no size -> 'small'."""
    parts = spec.split(":")
    return ":".join(parts[:2]), (parts[2] if len(parts) > 2 else "small")


@dataclass
class ProbeData:
    """Loaders of the probe's splits. sources: split -> manifest (for messages); rows (audio): split ->
    dataset id -> manifest line index; classes (classification); vocab_size (text)."""

    modality: str
    loaders: dict[str, Iterable[Batch]]
    sources: dict[str, str]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] | None = None
    vocab_size: int | None = None


def load_probe_data(train: str, test: str, valid: str | None = None, *, task: str = "classify",
                    batch_size: int = 16, tokenizer: str | None = None, image_size: int = 224,
                    max_tokens: int = 512) -> ProbeData:
    """Labeled manifests (or embedded specs) of the probe's splits -> ProbeData, with the modality taken
    from the data. Classification needs labels in every split, and valid/test labels must occur in train:
    otherwise a ValueError (or AudioDataError) names the file and the label. CTC (audio only) needs
    transcripts beside every manifest (see `read_transcripts`)."""
    given = {"train": train, "valid": valid, "test": test}
    modalities = {s: source_modality(v) for s, v in given.items() if v is not None}
    if len(set(modalities.values())) != 1:
        raise ValueError(f"the splits disagree on the modality: {modalities}")
    modality = modalities["train"]
    if task not in ("classify", "ctc"):
        raise ValueError(f"unknown task {task!r}; expected classify or ctc")
    if task == "ctc" and modality != "audio":
        raise ValueError(f"the CTC probe needs speech with transcripts, got {modality} data ({train})")
    if modality == "audio":
        return _audio_data(given, task, batch_size)
    if modality == "text":
        from omnissl.datamodules.labeled import LabeledTextDataModule as DM

        kwargs = {"tokenizer": tokenizer, "max_tokens": max_tokens}
    else:
        from omnissl.datamodules.labeled import LabeledImageDataModule as DM

        kwargs = {"image_size": image_size, "train_augment": False}
    from omnissl.datamodules.common import is_embedded

    args, size = dict(given), "small"
    if is_embedded(train):
        args["train"], size = _embedded_size(train)
        for s in ("valid", "test"):  # the embedded corpus supplies its own held-out splits
            if args[s] is not None and is_embedded(args[s]):
                if _embedded_size(args[s]) != (args["train"], size):
                    raise ValueError(f"--{s} {args[s]} must be the training corpus {train} or a manifest")
                args[s] = None
    dm = DM(train=args["train"], valid=args["valid"], test=args["test"], embedded_size=size,
            batch_size=batch_size, num_workers=0, **kwargs)
    dm.prepare_data()
    dm.setup()
    sources = {s: str(p) for s, p in dm.split_sources().items() if given[s] is not None}
    loaders = {"train": dm._loader(dm.sets["train"], False)}
    for s in ("valid", "test"):
        if given[s] is not None:
            if s not in dm.sets:
                raise ValueError(f"{sources[s]}: no {s} items")
            loaders[s] = dm._loader(dm.sets[s], False)
    return ProbeData(modality, loaders, sources, classes=dm.classes,
                     vocab_size=dm.vocab_size if modality == "text" else None)


def _audio_data(given: dict[str, str | None], task: str, batch_size: int) -> ProbeData:
    from omnissl.datamodules.audio import AudioDataModule, embedded_manifest, read_audio_manifest
    from omnissl.datamodules.common import is_embedded

    dm = AudioDataModule(train_manifest=given["train"], valid_manifest=given["valid"], test_manifest=given["test"],
                         max_samples=None, min_samples=0, max_tokens=None, batch_size=batch_size, num_workers=0)
    dm.prepare_data()
    paths = {s: (embedded_manifest(v, s, generate=False) if is_embedded(v) else Path(v).expanduser())
             for s, v in given.items() if v is not None}
    if task == "classify":
        for s, p in paths.items():  # before setup(): it would take the classes of any labeled split
            if read_audio_manifest(p).labels is None:
                raise ValueError(f"{p}: no labels (a labeled manifest has a third column `label`; the probe "
                                 f"needs one in the {s} split)")
    dm.setup()
    loaders = {s: dm._loader(s, shuffle=False) for s in paths}
    rows = {s: dm.datasets[s].rows for s in paths}
    return ProbeData("audio", loaders, {s: str(p) for s, p in paths.items()}, rows=rows,
                     classes=dm.classes if task == "classify" else None)


# --------------------------------------------------------------------------------------------------------
# one upstream, end to end


def reinitialized(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture, freshly initialized from `seed`: rebuilt from the encoder's recorded
    constructor arguments (omnissl.backbones.config), so every module runs its own init."""
    from omnissl.backbones.config import build_module, module_config

    with _seeded(seed):
        return build_module(module_config(encoder))


def extract_splits(states, data: ProbeData, *, task: str = "classify", layer_norm: bool = False,
                   device: torch.device | str = "cpu") -> tuple[dict[str, Features], CharVocab | None]:
    """Cached features of every split (pooled for classification, frames with transcripts for CTC), and the
    CTC vocabulary (from the training transcripts)."""
    frames = task == "ctc"
    feats = {s: extract(states, loader, frames=frames, layer_norm=layer_norm, need_labels=not frames,
                        source=data.sources[s], device=device) for s, loader in data.loaders.items()}
    vocab = None
    if frames:
        lines = {s: read_transcripts(data.sources[s]) for s in feats}
        vocab = CharVocab.from_transcripts(lines["train"][1], str(lines["train"][0]))
        for s, f in feats.items():
            attach_transcripts(f, lines[s][1], str(lines[s][0]), vocab=vocab if s == "train" else None,
                               rows=data.rows.get(s))
    return feats, vocab


def run_probe(states, data: ProbeData, name: str, *, task: str = "classify", head: str | None = None,
              layer: int | None = None, layer_norm: bool = False, per_layer: bool = False, epochs: int | None = None,
              lr: float | None = None, batch_size: int | None = None, seed: int = 0,
              device: torch.device | str = "cpu"):
    """Extract once (an `EncoderStates` upstream runs `frozen`), then fit the weighted-sum (or fixed-`layer`)
    probe and, with `per_layer`, one probe per hidden state. -> report.UpstreamScores. None hyperparameters
    take the task's defaults."""
    from omnissl.eval.report import UpstreamScores

    encoder = getattr(states, "encoder", None)
    with frozen(encoder) if encoder is not None else contextlib.nullcontext():
        feats, vocab = extract_splits(states, data, task=task, layer_norm=layer_norm, device=device)
    opts = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
    if task == "classify":
        def fit(k):
            return fit_classifier(feats["train"], feats.get("valid"), feats["test"], head=head or "linear",
                                  layer=k, num_classes=len(data.classes), seed=seed, device=device, **opts)
    else:
        def fit(k):
            return fit_ctc(feats["train"], feats.get("valid"), feats["test"], vocab, head=head or "linear", layer=k,
                           seed=seed, device=device, **opts)
    result = fit(layer)
    num_states = feats["train"].num_states
    layers = [fit(k) for k in range(num_states)] if per_layer and num_states > 1 else None
    return UpstreamScores(name, result, layers)


# --------------------------------------------------------------------------------------------------------
# omnissl probe


def _describe(result: ProbeResult) -> str:
    what = "accuracy" if result.metric == "accuracy" else "CER"
    extra = "".join(f", {k.upper()} {v:.4f}" for k, v in result.extra.items())
    valid = "" if result.valid is None else f", valid {result.valid:.4f}"
    return f"test {what} {result.test:.4f}{extra}{valid}, epoch {result.best_epoch}"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from omnissl.datamodules.audio import AudioDataError

    parser = argparse.ArgumentParser(
        prog="omnissl probe",
        description="SUPERB-style probe of a frozen encoder package (omnissl export / save_backbone): all hidden "
                    "states, learned softmax layer weights, a small head trained on cached features. Prints the "
                    "test accuracy (classify) or CER (ctc) last.")
    parser.add_argument("encoder", help="encoder package directory (config.json + model.safetensors)")
    parser.add_argument("--train", required=True, help="labeled manifest, folder, .jsonl, or embedded:... spec")
    parser.add_argument("--test", required=True, help="held-out split reported at the end")
    parser.add_argument("--valid", default=None, help="split that selects the epoch (default: the last epoch)")
    parser.add_argument("--task", choices=["classify", "ctc"], default="classify",
                        help="utterance classification (mean pooling) or character CTC (speech + .ltr/.wrd)")
    parser.add_argument("--head", choices=["linear", "mlp", "lstm"], default=None,
                        help="classify: linear (default) or mlp; ctc: linear (default) or lstm (BiLSTM; GPU)")
    parser.add_argument("--layer", type=int, default=None, help="probe one fixed hidden state instead of the "
                                                                  "weighted sum (0 = trunk input)")
    parser.add_argument("--layer-norm", action="store_true", help="s3prl's per-frame LayerNorm of every state")
    parser.add_argument("--report", type=Path, default=None,
                        help="write probe.md and probe_layers.png here (adds one probe per layer)")
    parser.add_argument("--random-init", action="store_true",
                        help="also probe the same architecture re-initialized (seed --seed)")
    parser.add_argument("--baseline", action="store_true",
                        help="also probe the non-learned baseline (log-mel, bag of tokens, raw pixels)")
    parser.add_argument("--wandb", action="store_true",
                        help="log the report to a new W&B run (offline without credentials or with WANDB_MODE=offline)")
    parser.add_argument("--epochs", type=int, default=None, help="head training epochs (classify 60, ctc 40)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (classify 1e-2, ctc 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per extraction batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tokenizer", default=None,
                        help="text: the pretraining tokenizer (default: tokenizer.json in the package)")
    parser.add_argument("--image-size", type=int, default=224, help="images: resize/crop size")
    args = parser.parse_args(argv)
    if args.wandb and args.report is None:
        parser.error("--wandb logs the report: add --report DIR")
    valid_heads = {"classify": ("linear", "mlp"), "ctc": ("linear", "lstm")}[args.task]
    if args.head is not None and args.head not in valid_heads:
        parser.error(f"--head {args.head} does not fit --task {args.task} (choose {' or '.join(valid_heads)})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from omnissl.checkpoints import load_backbone

        encoder = load_backbone(args.encoder).to(device)
        tokenizer = args.tokenizer
        if tokenizer is None and (Path(args.encoder) / "tokenizer.json").is_file():
            tokenizer = str(Path(args.encoder) / "tokenizer.json")
        if source_modality(args.train) == "text" and tokenizer is None:
            raise ValueError(f"probing a text encoder needs its pretraining tokenizer: pass --tokenizer or put "
                             f"tokenizer.json into {args.encoder}")
        data = load_probe_data(args.train, args.test, args.valid, task=args.task, batch_size=args.batch_size,
                               tokenizer=tokenizer, image_size=args.image_size)
        if data.modality == "text" and data.vocab_size > encoder.frontend.embed.num_embeddings:
            raise ValueError(f"the tokenizer has {data.vocab_size} tokens but the encoder embeds only "
                             f"{encoder.frontend.embed.num_embeddings}: not its pretraining tokenizer")
        print(f"probing {args.encoder}: {data.modality}, {encoder.num_layers + 1} hidden states of width "
              f"{encoder.dim}, {encoder.samples_per_token or '-'} samples per frame; task {args.task}; "
              f"train {data.sources['train']}, test {data.sources['test']}", flush=True)
        upstreams = [("pretrained", encoder)]
        if args.random_init:
            upstreams.append(("random init", reinitialized(encoder, args.seed).to(device)))
        opts = dict(task=args.task, head=args.head, layer=args.layer, layer_norm=args.layer_norm,
                    per_layer=args.report is not None, epochs=args.epochs, lr=args.lr, seed=args.seed, device=device)
        rows = []
        for name, enc in upstreams:
            rows.append(run_probe(EncoderStates(enc), data, name, **opts))
            print(f"{name}: {_describe(rows[-1].result)}; layer weights "
                  + " ".join(f"{w:.3f}" for w in rows[-1].result.layer_weights), flush=True)
        if args.baseline:
            base = baseline_states(data.modality, vocab_size=data.vocab_size)
            name = {"audio": "log-mel baseline", "text": "bag-of-tokens baseline", "image": "pixel baseline"}
            rows.append(run_probe(base, data, name[data.modality], **{**opts, "layer": None}))
            print(f"{rows[-1].name}: {_describe(rows[-1].result)}", flush=True)
    except (ValueError, FileNotFoundError, AudioDataError) as e:
        parser.exit(2, f"omnissl probe: error: {e}\n")
    if args.report is not None:
        from omnissl.eval.report import log_report, write_report

        title = f"{args.task} probe of {args.encoder} on {data.sources['train']} (test {data.sources['test']})"
        paths = write_report(rows, args.report, title=title)
        print(f"report: {paths['markdown']} {paths['plot']}", flush=True)
        if args.wandb:
            import wandb

            from omnissl.train.callbacks import _wandb_credentials

            mode = "offline" if os.environ.get("WANDB_MODE") == "offline" or not _wandb_credentials() else "online"
            run = wandb.init(project="omnissl", job_type="probe", dir=str(args.report), mode=mode,
                             config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
            log_report(rows, paths, run)
            run.finish()
    main_result = rows[0].result
    what = "accuracy" if main_result.metric == "accuracy" else "CER"
    print(f"test {what}: {main_result.test:.4f}", file=sys.stdout, flush=True)
    return 0
