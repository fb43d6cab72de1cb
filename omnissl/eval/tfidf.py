"""The non-learned text baseline of the probe: TF-IDF of token uni+bigrams + logistic regression.

    scores = tfidf_baseline(data)           # UpstreamScores, as run_probe's (`omnissl probe --baseline` on text)
    states = TfidfStates().fit(data.loaders["train"])   # the features alone: vocabulary and idf from train
    hs, valid = states(batch)               # (B, 1, 1, F): one state, one "frame" per text

The features are scikit-learn's `TfidfVectorizer` with the settings of the classic text-classification floor
(`bench/baseline_text.py`): uni- and bigrams, sublinear tf (1 + log tf), smoothed idf, L2-normalized rows, n-grams
seen in fewer than 2 training texts dropped (1 below 100 training texts). The "words" are the token ids the probe
already has (the encoder's own tokenizer, `<s>`/`</s>` included), so the baseline sees exactly the (truncated)
input the encoder sees; on the embedded labeled text with the 4096-entry BPE of `mlm_tiny_cpu.yaml` this is as
strong as word n-grams over the raw docstrings (README "Masked language modelling").

The classifier is scikit-learn's multinomial LogisticRegression (C = 10, lbfgs) on the L2-normalized rows, not
the probe's Adam-trained linear head: the probe standardizes every feature with train-set statistics, which
inflates rare n-grams, and on these sparse features it scored 0.35-0.43 where logistic regression scores 0.43
(README). The speech baseline is the other way round (its dense log-mel statistics probe as well with either).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from omnissl.batch import Batch
from omnissl.eval.results import ProbeResult, UpstreamScores

# n-grams kept at most (the most frequent in training): the dense (texts, features) matrices stay small
MAX_FEATURES = 50_000


def _token_strings(batch: Batch) -> list[str]:
    """Each text's valid token ids as one space-separated string ("0 713 49 2")."""
    ids = batch.inputs["text"]
    lengths = batch.lengths.get("text", torch.full((ids.shape[0],), ids.shape[1]))
    return [" ".join(map(str, row[: int(n)].tolist())) for row, n in zip(ids.cpu(), lengths.cpu())]


class TfidfStates:
    """Non-learned text baseline: TF-IDF of token uni+bigrams (see the module docstring). `fit(batches)` on the
    training split first; calling it unfitted is a RuntimeError."""

    num_states, samples_per_token = 1, None

    def __init__(self, *, ngram_range: tuple[int, int] = (1, 2), min_df: int | None = None,
                 max_features: int = MAX_FEATURES) -> None:
        self.ngram_range, self.min_df, self.max_features = tuple(ngram_range), min_df, max_features
        self.vectorizer = None
        self.dim = 0

    def fit(self, batches: Iterable[Batch]) -> TfidfStates:
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = [t for b in batches for t in _token_strings(_text(b))]
        if not texts:
            raise ValueError("TfidfStates.fit: the training split holds no texts")
        min_df = self.min_df if self.min_df is not None else (2 if len(texts) >= 100 else 1)
        self.vectorizer = TfidfVectorizer(ngram_range=self.ngram_range, sublinear_tf=True, min_df=min_df,
                                          max_features=self.max_features, token_pattern=r"\S+", lowercase=False,
                                          dtype=float)
        self.vectorizer.fit(texts)
        self.dim = len(self.vectorizer.vocabulary_)
        return self

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if self.vectorizer is None:
            raise RuntimeError("TfidfStates is not fitted: call fit(<train batches>) first (run_probe does)")
        x = self.vectorizer.transform(_token_strings(_text(batch))).toarray()
        device = batch.inputs["text"].device
        hs = torch.from_numpy(x).float().to(device)[:, None, None]  # (B, 1, 1, F)
        return hs, torch.ones(hs.shape[:2], dtype=torch.bool, device=device)


def _text(batch: Batch) -> Batch:
    if set(batch.inputs) != {"text"}:
        raise ValueError(f"TfidfStates takes text batches, got {sorted(batch.inputs)}")
    return batch


def tfidf_baseline(data, name: str = "TF-IDF + LR baseline", *, C: float = 10.0) -> UpstreamScores:
    """TF-IDF (`TfidfStates`, fitted on train) + logistic regression (C) on a text `ProbeData` with a train
    and a test split (valid optional): accuracies as a ProbeResult (one state, weight 1; best_epoch 0, as no
    epoch is chosen). Labels of valid/test must occur in train, as in the probe."""
    from sklearn.linear_model import LogisticRegression

    if data.modality != "text":
        raise ValueError(f"the TF-IDF baseline takes text, got {data.modality} data ({data.sources['train']})")
    states = TfidfStates().fit(data.loaders["train"])
    xy = {}
    for split, loader in data.loaders.items():
        xs, ys, ids = [], [], []
        for batch in loader:
            if "label" not in batch.targets:
                raise ValueError(f"{data.sources[split]}: no labels in the {split} split")
            xs.append(states.vectorizer.transform(_token_strings(_text(batch))))
            ys.append(batch.targets["label"].numpy())
            ids.append(batch.ids.numpy())
        order = np.argsort(np.concatenate(ids), kind="stable")
        xy[split] = (sp.vstack(xs).tocsr()[order], np.concatenate(ys)[order])
    seen = set(xy["train"][1].tolist())
    for split, (_, y) in xy.items():
        if unseen := sorted(set(y.tolist()) - seen):
            raise ValueError(f"{data.sources[split]}: {split} labels {unseen[:10]} never occur in the training "
                             f"split ({data.sources['train']})")
    clf = LogisticRegression(C=C, max_iter=3000).fit(*xy["train"])
    acc = {split: float(clf.score(x, y)) for split, (x, y) in xy.items()}
    result = ProbeResult("accuracy", acc["test"], acc.get("valid"), acc["train"], [1.0], 0)
    return UpstreamScores(name, result, None)
