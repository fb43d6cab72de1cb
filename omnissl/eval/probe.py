"""Probing frozen encoders, SUPERB-style: every hidden state, a learned weighted sum, a small head.

    states = EncoderStates(encoder)                              # or baseline_states("audio"), ... (eval/upstream)
    train = extract(states, train_loader, frames=False)          # cached once: (U, S, D) pooled states
    result = fit_classifier(train, valid, test, head="linear")   # ProbeResult: test accuracy, layer weights

    train = extract(states, loader, frames=True)                 # per-utterance (N_u, S, D) frames, then
    attach_transcripts(train, lines, source, vocab=vocab)        # their letters (eval/ctc)
    result = fit_ctc(train, valid, test, vocab, head="linear")    # ProbeResult: test CER (and WER)

    scores = run_probe(states, load_probe_data(...), "pretrained")  # all of it, per split (eval/probe_data)

Frozen features are computed once per utterance and cached, so the head trains for many epochs in seconds.
Utterance classification mean-pools each state over valid frames *before* the weighted sum; that equals
pooling after it, because the only learned part of the featurizer (the softmax weights) is linear and every
fixed normalization (s3prl's per-frame LayerNorm, our train-set standardization) is applied per state first.

Legend: U utterances, B batch, N frames/tokens, S = L + 1 hidden states, D width, K classes, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnissl.eval.ctc import CharVocab, attach_transcripts, greedy_decode, read_transcripts
from omnissl.eval.featurizer import CTCHead, Featurizer, classifier_head
from omnissl.eval.metrics import accuracy, cer, wer
from omnissl.eval.probe_data import ProbeData
from omnissl.eval.results import ProbeResult, UpstreamScores
from omnissl.eval.upstream import Features, extract, frozen, seeded
from omnissl.progress import progress

# --------------------------------------------------------------------------------------------------------
# training


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
    bar = progress(range(1, epochs + 1), desc="probe head", unit="epoch", leave=False)
    for epoch in bar:
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
            bar.set_postfix(valid=f"{score:.3f}", best=f"{best:.3f}", refresh=False)
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
    with seeded(seed):
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

    with seeded(seed):
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
    with seeded(seed):
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

    with seeded(seed):
        best_epoch = _fit(model, loss_of, score_of, len(train), valid=valid is not None, higher_is_better=False,
                          epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    refs, hyps = decode("test")
    return ProbeResult("cer", cer(refs, hyps), score_of("valid") if valid is not None else None, score_of("train"),
                       feat.weights().tolist(), best_epoch, {"wer": wer(refs, hyps)})


# --------------------------------------------------------------------------------------------------------
# one upstream, end to end


def extract_splits(states, data: ProbeData, *, task: str = "classify", layer_norm: bool = False,
                   device: torch.device | str = "cpu") -> tuple[dict[str, Features], CharVocab | None]:
    """Cached features of every split (pooled for classification, frames with transcripts for CTC), and the
    CTC vocabulary (from the training transcripts)."""
    frames = task == "ctc"
    feats = {s: extract(states, progress(loader, desc=f"features ({s})", unit="batch"), frames=frames,
                        layer_norm=layer_norm, need_labels=not frames, source=data.sources[s], device=device)
             for s, loader in data.loaders.items()}
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
    probe and, with `per_layer`, one probe per hidden state. -> UpstreamScores. None hyperparameters
    take the task's defaults."""
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


