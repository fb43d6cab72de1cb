"""HuBERT's offline targets: frame features -> k-means -> one line of unit ids per utterance.

    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 1 --clusters 100
    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 2 --checkpoint last.ckpt \\
        --layer 6 --clusters 500

Iteration 1 clusters 39-dim MFCC + Δ + ΔΔ (13 kaldi MFCCs, 25 ms windows every 10 ms; or, `features="logmel"`,
64-bin kaldi log-mel of the same windows); iteration 2 clusters
the layer-K outputs of a previous omnissl checkpoint's encoder (Hsu et al. 2021, sec. 4.2: K = 100 on MFCCs,
then K = 500 on layer 6 of the iteration-1 model). MiniBatchKMeans is fit on a seeded random fraction of the
utterances (fairseq `learn_kmeans.py --percent 0.1`, with its defaults: k-means++, batch 10000, n_init 20,
max_iter 100, max_no_improvement 100, reassignment_ratio 0) and every utterance is labelled.

Per-utterance normalization (`cmvn=True`): each feature dimension minus its mean over the utterance's frames,
divided by its standard deviation (Kaldi's `apply-cmvn --norm-vars`), before k-means and labelling.
NOTE(ref): fairseq clusters raw MFCCs (LibriSpeech: one read-speech condition). On a corpus of many voices the raw
units are largely per-utterance: `python bench/hubert_targets.py` measured I(unit; utterance) / H(unit) 0.27 for
50 raw MFCC units and 0.07 with cmvn, and a bag of the units classifies the keyword task's words at 0.25 raw vs
0.35 with cmvn (log-mel with cmvn: 0.45). The option is off by default.

Frame rate. Units are written at the encoder's frame rate, 50 Hz (320 samples, 20 ms): frame j of the conv
extractor sees samples [320j, 320j + 400), exactly the window of MFCC frame 2j, and the number of even MFCC
frames, 1 + (T - 400) // 320, equals the number of conv frames for every T.
NOTE(ref): fairseq dumps MFCC labels at 100 Hz and the model keeps every other label (`label_rate 100`,
`feat2tar_ratio 2`); we keep the even MFCC frames before clustering instead, so one 50 Hz file serves both
iterations and the Batch contract (units at `samples_per_token`) holds. The labels the model trains on are
those of the same windows; the k-means fit sees half as many (identically distributed) frames.

Audio is decoded as training decodes it (omnissl.datamodules.audio_io.load_audio: other sample rates resampled to
16 kHz, channels averaged; a bad file raises AudioDataError naming the manifest line). Iteration 2 rebuilds the
encoder from the checkpoint alone (omnissl.checkpoints.read_checkpoint: weights only, a checkpoint holding
pickled objects is refused). Unit-file I/O (units_path_for, read_units, check_units) is the data layer's:
omnissl/datamodules/units.py; the command is omnissl/commands/hubert_units.py.

Outputs, next to the manifest: `<stem>.<ext>` (e.g. `train.km`), one line of space-separated ints per
manifest row. Work is resumable: features of the fit sample, the k-means model and the labels of each
shard of utterances are cached under `<stem>.<ext>.cache/` (or --cache-dir) and skipped when present;
results are deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import Tensor

from omnissl.batch import SAMPLE_RATE
from omnissl.checkpoints import read_checkpoint
from omnissl.datamodules.audio_io import AudioDataError, AudioManifest, load_audio, read_audio_manifest
from omnissl.datamodules.common import atomic_file
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.units import units_path_for
from omnissl.progress import StepLines, progress, shows_progress


def resolve_manifest(spec: str | os.PathLike, split: str) -> Path:
    """A manifest path, or an embedded corpus ("embedded:small", see omnissl.datamodules.audio) whose
    `split` manifest is generated on first use."""
    if isinstance(spec, str) and spec.startswith("embedded:"):
        return embedded_corpus(spec, size="default")[split]
    return Path(spec)


# ---------------------------------------------------------------------------------------------------------
# Feature extractors: wav (T,) -> (frames, dim) float32 at 50 Hz


def mfcc_features(wav: Tensor) -> Tensor:
    """13 kaldi MFCCs + Δ + ΔΔ (fairseq `dump_mfcc_feature.py`: use_energy False, deltas over 5 frames),
    every other 10 ms frame -> (1 + (T - 400) // 320, 39) at the encoder's 20 ms frames."""
    if wav.numel() < 400:
        return torch.zeros(0, 39)
    mfcc = torchaudio.compliance.kaldi.mfcc(wav[None].float(), sample_frequency=SAMPLE_RATE, use_energy=False)
    mfcc = mfcc.t()  # (13, frames)
    delta = torchaudio.functional.compute_deltas(mfcc)
    ddelta = torchaudio.functional.compute_deltas(delta)
    feats = torch.cat([mfcc, delta, ddelta], dim=0).t()  # (frames, 39) at 100 Hz
    return feats[::2].contiguous()


def logmel_features(wav: Tensor) -> Tensor:
    """64-bin kaldi log-mel filterbank of mfcc_features' windows (25 ms, every 10 ms), every other frame ->
    (1 + (T - 400) // 320, 64) at the encoder's 20 ms frames."""
    if wav.numel() < 400:
        return torch.zeros(0, 64)
    fbank = torchaudio.compliance.kaldi.fbank(wav[None].float(), sample_frequency=SAMPLE_RATE, num_mel_bins=64)
    return fbank[::2].contiguous()


def cmvn(feats: Tensor) -> Tensor:
    """Per-utterance mean and variance normalization of (frames, D) features over the frames (Kaldi's
    `apply-cmvn --norm-vars`; a constant dimension becomes 0)."""
    if len(feats) == 0:
        return feats
    mean, std = feats.mean(0, keepdim=True), feats.std(0, unbiased=False, keepdim=True)
    return (feats - mean) / std.clamp_min(1e-5)


ITERATION1_FEATURES = ("mfcc", "logmel")


def iteration1_features(features: str = "mfcc", normalize: bool = False):
    """Iteration 1's frame features by name -> (extract: wav -> (frames, D), cache tag)."""
    if features not in ITERATION1_FEATURES:
        raise ValueError(f"unknown iteration-1 features {features!r}; expected one of {ITERATION1_FEATURES}")
    tag = "mfcc39" if features == "mfcc" else "logmel64"

    def extract(wav: Tensor) -> Tensor:  # (looked up at call time: tests count the extractor's calls)
        f = mfcc_features(wav) if features == "mfcc" else logmel_features(wav)
        return cmvn(f) if normalize else f

    return extract, tag + ("-cmvn" if normalize else "")


class LayerFeatures:
    """Output of trunk block `layer` (1-based, as fairseq's `output_layer`; 0 = trunk input) of an
    encoder, one utterance at a time, without masking -> (frames, D) float32."""

    def __init__(self, encoder: torch.nn.Module, layer: int, device: str = "cpu") -> None:
        if not 0 <= layer <= encoder.num_layers:
            raise ValueError(f"layer {layer} out of range: the encoder has {encoder.num_layers} blocks")
        self.encoder, self.layer, self.device = encoder.to(device).eval(), layer, device

    @torch.inference_mode()
    def __call__(self, wav: Tensor) -> Tensor:
        x = wav[None].to(self.device)
        out = self.encoder.encode(self.encoder.embed(x), return_layers=True)
        return out.layers[self.layer][0].float().cpu()


# ---------------------------------------------------------------------------------------------------------
# Resumable pipeline


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    with atomic_file(path) as tmp:
        write(tmp)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)

    with atomic_file(path) as tmp:
        write(tmp)


def _shards(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def _features_of(manifest: AudioManifest, index, extract) -> tuple[np.ndarray, np.ndarray]:
    """Features of the utterances `index` of `manifest`, decoded (and resampled to 16 kHz) as training does."""
    feats, lens = [], []
    for i in index:
        try:
            wav = load_audio(manifest.root / manifest.paths[i], expected=int(manifest.sizes[i]))
        except AudioDataError as e:
            raise AudioDataError(f"{manifest.where(i)}: {e}") from e
        f = extract(wav).numpy().astype(np.float32)
        feats.append(f)
        lens.append(len(f))
    dim = feats[0].shape[1] if feats else 0
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), np.array(lens, dtype=np.int64)


def fit_sample(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the utterances the k-means fit sees: a seeded random `fraction` of n (>= 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sample fraction must be in (0, 1], got {fraction}")
    k = max(1, int(np.ceil(n * fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def nearest_centroid(feats: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N,) int64 index of the nearest centroid (squared Euclidean, first on ties), as
    MiniBatchKMeans.predict assigns them."""
    if len(feats) == 0:
        return np.zeros(0, np.int64)
    x, c = torch.from_numpy(np.ascontiguousarray(feats, np.float32)), torch.from_numpy(centroids)
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]
    return d.argmin(1).numpy().astype(np.int64)


def fit_kmeans(feats: np.ndarray, clusters: int, *, seed: int, n_init: int = 20, batch_size: int = 10_000,
               max_iter: int = 100):
    """sklearn MiniBatchKMeans with fairseq `learn_kmeans.py`'s settings."""
    from sklearn.cluster import MiniBatchKMeans

    if len(feats) < clusters:
        raise ValueError(f"{len(feats)} frames in the fit sample, fewer than {clusters} clusters: raise "
                         "--sample-fraction or lower --clusters")
    verbose = shows_progress()  # sklearn's verbose lines (as fairseq's learn_kmeans.py) drive a bar on a terminal
    km = MiniBatchKMeans(n_clusters=clusters, init="k-means++", max_iter=max_iter, batch_size=batch_size,
                         tol=0.0, max_no_improvement=100, n_init=n_init, reassignment_ratio=0.0,
                         random_state=seed, compute_labels=False, verbose=int(verbose))
    if not verbose:
        return km.fit(feats)
    with StepLines(r"Minibatch step (\d+)/(\d+)", desc=f"k-means K={clusters}") as out, redirect_stdout(out):
        return km.fit(feats)


def _progress(it, total: int, desc: str) -> Iterator:
    return iter(progress(it, total=total, desc=desc, unit="shard"))


def make_units(
    manifest: str | os.PathLike,
    *,
    valid: str | os.PathLike | None = None,
    iteration: int = 1,
    features: str = "mfcc",
    normalize: bool = False,
    checkpoint: str | os.PathLike | None = None,
    layer: int = 6,
    clusters: int = 100,
    sample_fraction: float = 0.1,
    seed: int = 0,
    out_ext: str = "km",
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = 200,
    n_init: int = 20,
    kmeans_batch_size: int = 10_000,
    max_iter: int = 100,
    device: str = "cpu",
) -> list[Path]:
    """The whole pipeline; returns the unit files written (train, then valid). `features` names iteration 1's
    frame features (ITERATION1_FEATURES); `normalize` applies per-utterance `cmvn` to the clustered features
    (either iteration)."""
    manifest = resolve_manifest(manifest, "train")
    valid = None if valid is None else resolve_manifest(valid, "valid")
    if iteration == 1:
        extract, tag = iteration1_features(features, normalize)
    elif iteration == 2:
        if features != "mfcc":
            raise ValueError(f"features {features!r} name iteration 1's frame features; iteration 2 clusters a layer "
                             "of --checkpoint (drop --features)")
        if checkpoint is None:
            raise ValueError("iteration 2 needs --checkpoint (an omnissl checkpoint of the previous iteration)")
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt}")
        st = ckpt.stat()
        digest = hashlib.sha1(f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
        encoder = read_checkpoint(ckpt).encoder  # weights only: never unpickles code
        layer_features = LayerFeatures(encoder, layer, device)
        extract = (lambda wav: cmvn(layer_features(wav))) if normalize else layer_features
        tag = f"layer{layer}-{digest}" + ("-cmvn" if normalize else "")
    else:
        raise ValueError(f"iteration must be 1 or 2, got {iteration}")
    cache = Path(cache_dir) if cache_dir is not None else manifest.with_name(f"{manifest.stem}.{out_ext}.cache")
    cache = cache / tag
    cache.mkdir(parents=True, exist_ok=True)
    setting = {"tag": tag, "clusters": clusters, "fraction": sample_fraction, "seed": seed, "n_init": n_init,
               "batch": kmeans_batch_size, "max_iter": max_iter, "manifest": str(manifest.resolve())}
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]

    # 1. features of the fit sample, in shards
    rows = read_audio_manifest(manifest)
    if not len(rows):
        raise ValueError(f"manifest {manifest} lists no utterances")
    sample = fit_sample(len(rows), sample_fraction, seed)
    fit_dir = cache / f"fit-{key}"
    fit_dir.mkdir(exist_ok=True)
    parts = _shards(len(sample), shard_size)
    for s, part in _progress(enumerate(parts), len(parts), "features (k-means sample)"):
        path = fit_dir / f"shard{s:05d}.npy"
        if not path.exists():
            feats, _ = _features_of(rows, [int(i) for i in sample[part.start:part.stop]], extract)
            _save_npy(path, feats)

    # 2. k-means
    model_path = cache / f"kmeans-{key}.npy"  # the centroids only: a cache is data, never unpickled code
    if model_path.exists():
        centroids = np.load(model_path, allow_pickle=False)
    else:
        feats = np.concatenate([np.load(fit_dir / f"shard{s:05d}.npy") for s in range(len(parts))])
        print(f"fitting MiniBatchKMeans K={clusters} on {len(feats)} frames of {len(sample)} utterances",
              file=sys.stderr)
        km = fit_kmeans(feats, clusters, seed=seed, n_init=n_init, batch_size=kmeans_batch_size, max_iter=max_iter)
        centroids = km.cluster_centers_.astype(np.float32)
        _save_npy(model_path, centroids)

    # 3. labels of every utterance, in shards, then the unit files
    written = []
    for man in [manifest] + ([valid] if valid is not None else []):
        rows = rows if man == manifest else read_audio_manifest(man)
        lab_dir = cache / f"labels-{key}" / hashlib.sha1(str(man.resolve()).encode()).hexdigest()[:10]
        lab_dir.mkdir(parents=True, exist_ok=True)
        shards = _shards(len(rows), shard_size)
        for s, part in _progress(enumerate(shards), len(shards), f"units ({man.name})"):
            path = lab_dir / f"shard{s:05d}.npz"
            if not path.exists():
                feats, lens = _features_of(rows, part, extract)
                labels = nearest_centroid(feats, centroids)
                _save_npz(path, labels=labels.astype(np.int64), lens=lens)
        out = units_path_for(man, out_ext)

        def write(p: Path, lab_dir=lab_dir, shards=shards) -> None:
            with open(p, "w", encoding="utf-8") as f:
                for s in range(len(shards)):
                    z = np.load(lab_dir / f"shard{s:05d}.npz")
                    for seg in np.split(z["labels"], np.cumsum(z["lens"])[:-1]):
                        f.write(" ".join(map(str, seg.tolist())) + "\n")

        with atomic_file(out) as tmp:
            write(tmp)
        written.append(out)
        print(f"wrote {out} ({len(rows)} utterances, K={clusters})", file=sys.stderr)
    return written
