"""HuBERT's offline targets: frame features -> k-means -> one line of unit ids per utterance.

    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 1 --clusters 100
    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 2 --checkpoint last.ckpt \\
        --layer 6 --clusters 500

Iteration 1 clusters 39-dim MFCC + Δ + ΔΔ (13 kaldi MFCCs, 25 ms windows every 10 ms); iteration 2 clusters
the layer-K outputs of a previous omnissl checkpoint's encoder (Hsu et al. 2021, sec. 4.2: K = 100 on MFCCs,
then K = 500 on layer 6 of the iteration-1 model). MiniBatchKMeans is fit on a seeded random fraction of the
utterances (fairseq `learn_kmeans.py --percent 0.1`, with its defaults: k-means++, batch 10000, n_init 20,
max_iter 100, max_no_improvement 100, reassignment_ratio 0) and every utterance is labelled.

Frame rate. Units are written at the encoder's frame rate, 50 Hz (320 samples, 20 ms): frame j of the conv
extractor sees samples [320j, 320j + 400), exactly the window of MFCC frame 2j, and the number of even MFCC
frames, 1 + (T - 400) // 320, equals the number of conv frames for every T.
NOTE(ref): fairseq dumps MFCC labels at 100 Hz and the model keeps every other label (`label_rate 100`,
`feat2tar_ratio 2`); we keep the even MFCC frames before clustering instead, so one 50 Hz file serves both
iterations and the Batch contract (units at `samples_per_token`) holds. The labels the model trains on are
those of the same windows; the k-means fit sees half as many (identically distributed) frames.

Outputs, next to the manifest: `<stem>.<ext>` (e.g. `train.km`), one line of space-separated ints per
manifest row. Work is resumable: features of the fit sample, the k-means model and the labels of each
shard of utterances are cached under `<stem>.<ext>.cache/` (or --cache-dir) and skipped when present;
results are deterministic for a seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = 320


# ---------------------------------------------------------------------------------------------------------
# Manifests and unit files


def read_audio_manifest(path: str | os.PathLike) -> tuple[Path, list[tuple[str, int]]]:
    """fairseq TSV: first line the root folder, then `relpath<TAB>num_samples[<TAB>...]` -> (root, rows)."""
    from omnissl.datamodules.common import read_manifest

    root, rows = read_manifest(path)
    out = []
    for i, cells in enumerate(rows):
        if len(cells) < 2 or not cells[1].strip().isdigit():
            raise ValueError(f"{path}: row {i + 2} must be 'relpath<TAB>num_samples', got {cells!r}")
        out.append((cells[0], int(cells[1])))
    return root, out


def resolve_manifest(spec: str | os.PathLike, split: str) -> Path:
    """A manifest path, or an embedded corpus ("embedded:small", see omnissl.datamodules.audio) whose
    `split` manifest is generated on first use."""
    if isinstance(spec, str) and spec.startswith("embedded:"):
        from omnissl.datamodules.audio import embedded_manifest

        return embedded_manifest(spec, split, generate=True)
    return Path(spec)


def units_path_for(manifest: str | os.PathLike, ext: str = "km") -> Path:
    """`<manifest folder>/<manifest stem>.<ext>`."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.{ext}")


def read_units(path: str | os.PathLike) -> list[np.ndarray]:
    """One int64 array per line of a unit file."""
    with open(path, encoding="utf-8") as f:
        return [np.array(line.split(), dtype=np.int64) for line in f.read().splitlines()]


def check_units(
    manifest: str | os.PathLike,
    units_path: str | os.PathLike,
    samples_per_frame: int = SAMPLES_PER_FRAME,
    *,
    tolerance: int = 2,
) -> None:
    """Fail before training when a unit file does not belong to its manifest: missing file, one line per
    manifest row, and per line about num_samples / samples_per_frame units (± tolerance). Every error names
    the unit file (and the first offending rows)."""
    units_path = Path(units_path)
    if not units_path.is_file():
        raise FileNotFoundError(
            f"unit file {units_path} for manifest {manifest} does not exist; make it with "
            f"`omnissl hubert-units --manifest {manifest}`"
        )
    _, rows = read_audio_manifest(manifest)
    with open(units_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != len(rows):
        raise ValueError(f"unit file {units_path} has {len(lines)} lines but manifest {manifest} lists "
                         f"{len(rows)} utterances: it was made for another manifest")
    bad = []
    for i, (line, (rel, num_samples)) in enumerate(zip(lines, rows)):
        have, want = len(line.split()), num_samples // samples_per_frame
        if abs(have - want) > tolerance:
            bad.append(f"line {i + 1} ({rel}): {have} units, expected ~{want}")
            if len(bad) >= 5:
                break
    if bad:
        raise ValueError(f"unit file {units_path} does not match manifest {manifest} at {samples_per_frame} "
                         f"samples per frame: " + "; ".join(bad))


def load_audio(path: str | os.PathLike, expected: int | None = None) -> Tensor:
    """Read a 16 kHz file with soundfile -> mono float32 (T,)."""
    import soundfile as sf

    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sr}, expected {SAMPLE_RATE} (resample the corpus first)")
    wav = wav.mean(1)
    if expected is not None and len(wav) != expected:
        raise ValueError(f"{path}: {len(wav)} samples but the manifest says {expected}")
    return torch.from_numpy(np.ascontiguousarray(wav))


# ---------------------------------------------------------------------------------------------------------
# Feature extractors: wav (T,) -> (frames, dim) float32 at 50 Hz


def mfcc_features(wav: Tensor) -> Tensor:
    """13 kaldi MFCCs + Δ + ΔΔ (fairseq `dump_mfcc_feature.py`: use_energy False, deltas over 5 frames),
    every other 10 ms frame -> (1 + (T - 400) // 320, 39) at the encoder's 20 ms frames."""
    import torchaudio

    if wav.numel() < 400:
        return torch.zeros(0, 39)
    mfcc = torchaudio.compliance.kaldi.mfcc(wav[None].float(), sample_frequency=SAMPLE_RATE, use_energy=False)
    mfcc = mfcc.t()  # (13, frames)
    delta = torchaudio.functional.compute_deltas(mfcc)
    ddelta = torchaudio.functional.compute_deltas(delta)
    feats = torch.cat([mfcc, delta, ddelta], dim=0).t()  # (frames, 39) at 100 Hz
    return feats[::2].contiguous()


def _instantiate(spec):
    """class_path/init_args dicts (LightningCLI config) -> objects, recursively."""
    import importlib

    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        target = getattr(importlib.import_module(module), name)
        return target(**{k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: _instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_instantiate(v) for v in spec]
    return spec


def find_run_config(checkpoint: Path) -> Path:
    """The config.yaml LightningCLI saved for the run that wrote `checkpoint` (searched upwards)."""
    for folder in list(checkpoint.resolve().parents)[:4]:
        for name in ("config.yaml", "config.yml"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no config.yaml found above {checkpoint}; pass --config with the run's config")


def load_encoder(checkpoint: str | os.PathLike, config: str | os.PathLike | None = None) -> torch.nn.Module:
    """Rebuild an omnissl objective's encoder from its run config and load its weights from a Lightning
    checkpoint (`state_dict` keys `encoder.*`)."""
    import yaml

    checkpoint = Path(checkpoint)
    config = Path(config) if config is not None else find_run_config(checkpoint)
    cfg = yaml.safe_load(config.read_text())
    try:
        spec = cfg["model"]["init_args"]["encoder"]
    except (KeyError, TypeError):
        raise ValueError(f"{config}: expected model.init_args.encoder (an omnissl objective's config)") from None
    encoder = _instantiate(spec)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    own = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not own:
        raise ValueError(f"{checkpoint}: no 'encoder.*' weights in its state_dict")
    encoder.load_state_dict(own, strict=True)
    return encoder.eval()


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


def _save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling and rename: an interrupted run never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    _save_atomic(path, write)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)

    _save_atomic(path, write)


def _shards(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def _features_of(rows: list[tuple[str, int]], root: Path, index: range, extract) -> tuple[np.ndarray, np.ndarray]:
    feats, lens = [], []
    for i in index:
        rel, num = rows[i]
        f = extract(load_audio(root / rel, num)).numpy().astype(np.float32)
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


def fit_kmeans(feats: np.ndarray, clusters: int, *, seed: int, n_init: int = 20, batch_size: int = 10_000,
               max_iter: int = 100):
    """sklearn MiniBatchKMeans with fairseq `learn_kmeans.py`'s settings."""
    from sklearn.cluster import MiniBatchKMeans

    if len(feats) < clusters:
        raise ValueError(f"{len(feats)} frames in the fit sample, fewer than {clusters} clusters: raise "
                         "--sample-fraction or lower --clusters")
    km = MiniBatchKMeans(n_clusters=clusters, init="k-means++", max_iter=max_iter, batch_size=batch_size,
                         tol=0.0, max_no_improvement=100, n_init=n_init, reassignment_ratio=0.0,
                         random_state=seed, compute_labels=False, verbose=0)
    return km.fit(feats)


def _progress(it, total: int, desc: str) -> Iterator:
    from tqdm import tqdm

    return iter(tqdm(it, total=total, desc=desc, unit="shard", file=sys.stderr))


def make_units(
    manifest: str | os.PathLike,
    *,
    valid: str | os.PathLike | None = None,
    iteration: int = 1,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
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
    """The whole pipeline; returns the unit files written (train, then valid)."""
    manifest = resolve_manifest(manifest, "train")
    valid = None if valid is None else resolve_manifest(valid, "valid")
    if iteration == 1:
        extract, tag = mfcc_features, "mfcc39"
    elif iteration == 2:
        if checkpoint is None:
            raise ValueError("iteration 2 needs --checkpoint (an omnissl checkpoint of the previous iteration)")
        ckpt = Path(checkpoint)
        st = ckpt.stat()
        digest = hashlib.sha1(f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
        extract, tag = LayerFeatures(load_encoder(ckpt, config), layer, device), f"layer{layer}-{digest}"
    else:
        raise ValueError(f"iteration must be 1 or 2, got {iteration}")
    cache = Path(cache_dir) if cache_dir is not None else manifest.with_name(f"{manifest.stem}.{out_ext}.cache")
    cache = cache / tag
    cache.mkdir(parents=True, exist_ok=True)
    setting = {"tag": tag, "clusters": clusters, "fraction": sample_fraction, "seed": seed, "n_init": n_init,
               "batch": kmeans_batch_size, "max_iter": max_iter, "manifest": str(manifest.resolve())}
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]

    # 1. features of the fit sample, in shards
    root, rows = read_audio_manifest(manifest)
    if not rows:
        raise ValueError(f"manifest {manifest} lists no utterances")
    sample = fit_sample(len(rows), sample_fraction, seed)
    fit_dir = cache / f"fit-{key}"
    fit_dir.mkdir(exist_ok=True)
    parts = _shards(len(sample), shard_size)
    for s, part in _progress(enumerate(parts), len(parts), "features (k-means sample)"):
        path = fit_dir / f"shard{s:05d}.npy"
        if not path.exists():
            feats, _ = _features_of(rows, root, [int(i) for i in sample[part.start:part.stop]], extract)
            _save_npy(path, feats)

    # 2. k-means
    model_path = cache / f"kmeans-{key}.pkl"
    if model_path.exists():
        km = pickle.loads(model_path.read_bytes())
    else:
        feats = np.concatenate([np.load(fit_dir / f"shard{s:05d}.npy") for s in range(len(parts))])
        print(f"fitting MiniBatchKMeans K={clusters} on {len(feats)} frames of {len(sample)} utterances",
              file=sys.stderr)
        km = fit_kmeans(feats, clusters, seed=seed, n_init=n_init, batch_size=kmeans_batch_size, max_iter=max_iter)
        _save_atomic(model_path, lambda p: p.write_bytes(pickle.dumps(km)))

    # 3. labels of every utterance, in shards, then the unit files
    written = []
    for man in [manifest] + ([valid] if valid is not None else []):
        root, rows = (root, rows) if man == manifest else read_audio_manifest(man)
        lab_dir = cache / f"labels-{key}" / hashlib.sha1(str(man.resolve()).encode()).hexdigest()[:10]
        lab_dir.mkdir(parents=True, exist_ok=True)
        shards = _shards(len(rows), shard_size)
        for s, part in _progress(enumerate(shards), len(shards), f"units ({man.name})"):
            path = lab_dir / f"shard{s:05d}.npz"
            if not path.exists():
                feats, lens = _features_of(rows, root, part, extract)
                labels = km.predict(feats.astype(np.float32)) if len(feats) else np.zeros(0, np.int64)
                _save_npz(path, labels=labels.astype(np.int64), lens=lens)
        out = units_path_for(man, out_ext)

        def write(p: Path, lab_dir=lab_dir, shards=shards) -> None:
            with open(p, "w", encoding="utf-8") as f:
                for s in range(len(shards)):
                    z = np.load(lab_dir / f"shard{s:05d}.npz")
                    for seg in np.split(z["labels"], np.cumsum(z["lens"])[:-1]):
                        f.write(" ".join(map(str, seg.tolist())) + "\n")

        _save_atomic(out, write)
        written.append(out)
        print(f"wrote {out} ({len(rows)} utterances, K={clusters})", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omnissl hubert-units", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True,
                   help="training manifest (fairseq TSV, or embedded:<size>); the k-means fit sample")
    p.add_argument("--valid", help="another manifest (or embedded:<size>) to label with the same k-means model")
    p.add_argument("--iteration", type=int, choices=(1, 2), default=1)
    p.add_argument("--checkpoint", help="iteration 2: the previous iteration's omnissl checkpoint")
    p.add_argument("--config", help="iteration 2: the run's config.yaml (default: found above the checkpoint)")
    p.add_argument("--layer", type=int, default=6, help="iteration 2: trunk block whose output is clustered")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--sample-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-ext", default="km")
    p.add_argument("--cache-dir")
    p.add_argument("--shard-size", type=int, default=200, help="utterances per cached shard")
    p.add_argument("--n-init", type=int, default=20)
    p.add_argument("--kmeans-batch-size", type=int, default=10_000)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    make_units(a.manifest, valid=a.valid, iteration=a.iteration, checkpoint=a.checkpoint, config=a.config,
               layer=a.layer, clusters=a.clusters, sample_fraction=a.sample_fraction, seed=a.seed,
               out_ext=a.out_ext, cache_dir=a.cache_dir, shard_size=a.shard_size, n_init=a.n_init,
               kmeans_batch_size=a.kmeans_batch_size, max_iter=a.max_iter, device=a.device)
    return 0
