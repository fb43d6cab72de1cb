"""How much of the words, and how much of the voice, HuBERT's offline targets carry, before any pretraining.

HuBERT learns to predict, at masked frames, the k-means unit of some frame features; what the units encode is
what its encoder is pushed to represent. This bench fits each candidate target (MFCC 39 as fairseq's iteration
1, with and without per-utterance mean/variance normalization; the recipes' 64-bin log-mel, ditto) by k-means
on the pretraining corpus as `omnissl hubert-units` does (half the utterances, MiniBatchKMeans), labels the
embedded keyword and speaker tasks' clips with the nearest centroid, and fits a logistic regression on each
clip's unit histogram (bag of units) and bag of unit bigrams. Keyword accuracy from a bag of units is a proxy
for phonetic content; speaker accuracy for what the units keep of the voice. It also reports PNMI-style
utterance dependence of the units on the corpus: I(unit; utterance) / H(unit) (1 = every utterance has its
own units, 0 = the same unit distribution everywhere).

    python bench/hubert_targets.py [--clusters 50 100] [--corpus small] [--features mfcc mfcc-cmvn ...]
    python bench/hubert_targets.py --checkpoint runs/.../last.ckpt --layers 1 2 3 --clusters 100   # iteration 2's

Ends with one line per (features, clusters):
    RESULT name=hubert_targets features=... clusters=... keywords=... speakers=... utt_dependence=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402,F401  (puts the repository on sys.path)

from omnissl.datamodules.audio_io import read_audio_manifest  # noqa: E402
from omnissl.eval.units import (  # noqa: E402
    _features_of, cmvn, fit_kmeans, fit_sample, iteration1_features, nearest_centroid, resolve_manifest)


FEATURES = {  # name -> (features, cmvn) of omnissl.eval.units.iteration1_features
    "mfcc": ("mfcc", False), "mfcc-cmvn": ("mfcc", True), "logmel": ("logmel", False), "logmel-cmvn": ("logmel", True),
}


def features(manifest, index, extract) -> list[np.ndarray]:
    """Per-utterance features, decoded as `omnissl hubert-units` decodes them."""
    feats, lens = _features_of(manifest, index, extract)
    return np.split(feats, np.cumsum(lens)[:-1])


def bag(units: list[np.ndarray], k: int) -> np.ndarray:
    """Per clip: normalized unit histogram, then normalized histogram of unit bigrams (deduplicated runs)."""
    rows = []
    for u in units:
        h1 = np.bincount(u, minlength=k).astype(np.float32)
        r = u[np.r_[True, u[1:] != u[:-1]]] if len(u) else u
        h2 = np.bincount(r[:-1] * k + r[1:], minlength=k * k).astype(np.float32) if len(r) > 1 else np.zeros(k * k)
        rows.append(np.concatenate([h1 / max(1.0, h1.sum()), h2 / max(1.0, h2.sum())]))
    return np.stack(rows)


def utterance_dependence(units: list[np.ndarray], k: int) -> float:
    """I(unit; utterance) / H(unit) over the labeled utterances, frames weighted equally."""
    counts = np.stack([np.bincount(u, minlength=k) for u in units]).astype(np.float64)
    p = counts / counts.sum()
    pu, pk = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pu @ pk)[nz])).sum())
    h = float(-(pk[pk > 0] * np.log(pk[pk > 0])).sum())
    return mi / h


def task_accuracy(task: str, extract, centroids: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = learning.probe_data(task)
    k = len(centroids)
    xs, ys = {}, {}
    for split in ("train", "test"):
        m = read_audio_manifest(data.sources[split])
        units = [nearest_centroid(f, centroids) for f in features(m, range(len(m)), extract)]
        xs[split], ys[split] = bag(units, k), np.array(m.labels)
    scaler = StandardScaler().fit(xs["train"])
    lr = LogisticRegression(C=0.1, max_iter=2000, random_state=seed)
    lr.fit(scaler.transform(xs["train"]), ys["train"])
    return float((lr.predict(scaler.transform(xs["test"])) == ys["test"]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    p.add_argument("--clusters", nargs="+", type=int, default=[50, 100])
    p.add_argument("--corpus", default="small", help="embedded pretraining corpus the k-means is fit on")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="iteration 2's candidates: an omnissl checkpoint whose trunk blocks --layers "
                                        "are clustered (as `omnissl hubert-units --iteration 2`) instead of --features")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cmvn", action="store_true", help="with --checkpoint: per-utterance normalized layer outputs")
    a = p.parse_args()
    if a.checkpoint:
        from omnissl.checkpoints import read_checkpoint
        from omnissl.eval.units import LayerFeatures

        encoder = read_checkpoint(a.checkpoint).encoder
        candidates = {f"layer{k}" + "-cmvn" * a.cmvn: LayerFeatures(encoder, k) for k in a.layers}
        if a.cmvn:
            candidates = {name: (lambda w, f=f: cmvn(f(w))) for name, f in candidates.items()}
    else:
        candidates = {name: iteration1_features(*FEATURES[name])[0] for name in a.features}

    train = read_audio_manifest(resolve_manifest(f"embedded:{a.corpus}", "train"))
    sample = fit_sample(len(train), a.fraction, a.seed)
    for name, extract in candidates.items():
        fit_feats = features(train, sample, extract)
        for k in a.clusters:
            km = fit_kmeans(np.concatenate(fit_feats), k, seed=a.seed, n_init=5)
            centroids = km.cluster_centers_.astype(np.float32)
            dep = utterance_dependence([nearest_centroid(f, centroids) for f in fit_feats], k)
            kw = task_accuracy("keywords", extract, centroids, a.seed)
            sp = task_accuracy("speakers", extract, centroids, a.seed)
            print(f"RESULT name=hubert_targets features={name} clusters={k} corpus={a.corpus} keywords={kw:.4f} "
                  f"speakers={sp:.4f} utt_dependence={dep:.4f}", flush=True)


if __name__ == "__main__":
    main()
