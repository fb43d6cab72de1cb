"""Floor for the labeled speech downstream sets: pooled log-mel + logistic regression, no pretraining.

A pretrained encoder is only interesting on these tasks if it beats this. The keyword task is built to keep
the floor at or below 0.80 accuracy (see `omnissl/datamodules/corpora/labeled_speech.py`).

Features per clip: 64-bin log-mel (25 ms window, 10 ms hop), mean and standard deviation over time -> 128
dims; standardized; sklearn LogisticRegression (C=1). Trained on `train`, reported on `valid` and `test`.

    python bench/baseline_speech.py [--size default] [--tasks keywords speakers] [--seed 0]

Prints one line per task:  RESULT name=baseline_speech task=<task> acc=<test accuracy> ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from omnissl.datamodules.common import data_root, read_manifest
from omnissl.datamodules.corpora import labeled_speech


def features(manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (X (n, 128) float32 mean+std pooled log-mel, y (n,) str labels)."""
    root, rows = read_manifest(manifest)
    mel = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=64)
    xs, ys = [], []
    for rel, _, label in rows:
        audio, sr = sf.read(root / rel, dtype="float32")
        assert sr == 16_000
        m = torch.log(mel(torch.from_numpy(audio)) + 1e-6)  # (64, frames)
        xs.append(torch.cat([m.mean(1), m.std(1)]).numpy())
        ys.append(label)
    return np.stack(xs), np.array(ys)


def run(task: str, size: str, seed: int, data: Path | None) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = data or data_root() / "corpora" / f"labeled_speech-{task}-{size}-seed{seed}"
    t0 = time.perf_counter()
    manifests = labeled_speech.generate(out, size=size, seed=seed, task=task)
    t_gen = time.perf_counter() - t0
    (xtr, ytr), (xva, yva), (xte, yte) = (features(manifests[s]) for s in ("train", "valid", "test"))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(xtr, ytr)
    res = {
        "acc": float((clf.predict(xte) == yte).mean()),
        "valid_acc": float((clf.predict(xva) == yva).mean()),
        "train_acc": float((clf.predict(xtr) == ytr).mean()),
        "chance": 1.0 / len(set(ytr)),
        "n_train": len(ytr),
        "n_test": len(yte),
        "gen_s": t_gen,
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(labeled_speech.TASKS), choices=labeled_speech.TASKS)
    ap.add_argument("--data", type=Path, default=None, help="output folder (one task only); default: the cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for task in args.tasks:
        r = run(task, args.size, args.seed, args.data)
        print(
            f"RESULT name=baseline_speech task={task} acc={r['acc']:.4f} valid_acc={r['valid_acc']:.4f} "
            f"train_acc={r['train_acc']:.4f} chance={r['chance']:.4f} n_train={r['n_train']} "
            f"n_test={r['n_test']} size={args.size} seed={args.seed}",
            flush=True,
        )


if __name__ == "__main__":
    main()
