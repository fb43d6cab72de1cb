"""Floor for the labeled image tasks: raw pixels + logistic regression, no pretraining.

Tasks (`--corpus`): `labeled_images`, scikit-learn's 8x8 handwritten digits with fixed stratified splits
(`omnissl/datamodules/corpora/labeled_images.py`); `shapes`, generated 32x32 RGB shapes with a held-out hue
in test (`omnissl/datamodules/corpora/shapes.py`). Features: every pixel value read back from the PNG files
(grayscale digits, RGB shapes), scaled to [0, 1] and standardized; sklearn LogisticRegression (C=1). Trained
on `train`, reported on `valid` and `test`.

    python bench/baseline_images.py [--corpus shapes] [--size default]

Prints:  RESULT name=baseline_images acc=<test accuracy> valid_acc=... train_acc=... chance=... n_train=... n_test=...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from omnissl.datamodules.common import data_root, read_manifest
from omnissl.datamodules.corpora import CORPORA


def load(manifest: Path, mode: str = "L") -> tuple[np.ndarray, np.ndarray]:
    """-> (X (n, H*W*channels) float32 in [0, 1], y (n,) str labels); mode: Pillow's "L" or "RGB"."""
    root, rows = read_manifest(manifest)
    xs = [np.asarray(Image.open(root / r[0]).convert(mode), dtype=np.float32).ravel() / 255.0 for r in rows]
    return np.stack(xs), np.array([r[2] for r in rows])


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="labeled_images", choices=["labeled_images", "shapes"])
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--data", type=Path, default=None, help="output folder; default: the cache")
    args = ap.parse_args()
    corpus = CORPORA[args.corpus]
    out = args.data or data_root() / "corpora" / f"{corpus.folder}-{args.size}-seed0"
    t0 = time.perf_counter()
    manifests = corpus.generate(out, size=args.size)
    t_gen = time.perf_counter() - t0
    mode = "L" if args.corpus == "labeled_images" else "RGB"
    (xtr, ytr), (xva, yva), (xte, yte) = (load(manifests[s], mode) for s in ("train", "valid", "test"))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(xtr, ytr)
    acc = lambda x, y: float((clf.predict(x) == y).mean())  # noqa: E731
    print(f"RESULT name=baseline_images acc={acc(xte, yte):.4f} valid_acc={acc(xva, yva):.4f} "
          f"train_acc={acc(xtr, ytr):.4f} chance={1.0 / len(set(ytr)):.4f} n_train={len(ytr)} n_test={len(yte)} "
          f"corpus={args.corpus} size={args.size} gen_s={t_gen:.1f}")


if __name__ == "__main__":
    main()
