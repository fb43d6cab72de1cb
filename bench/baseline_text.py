"""Floor for the labeled text task: TF-IDF + logistic regression, no pretraining.

Task: which of 9 standard-library families a docstring comes from, with the test split by module
(`omnissl/datamodules/corpora/labeled_text.py`); a pretrained text encoder's probe is interesting if it beats
this. Features: word uni+bigram TF-IDF (sublinear tf, min_df 2) over the raw docstrings; sklearn
LogisticRegression (C=10). Trained on `train`, reported on `valid` and `test`.

    python bench/baseline_text.py [--size default] [--seed 0]

Prints:  RESULT name=baseline_text acc=<test accuracy> valid_acc=... train_acc=... chance=... n_train=... n_test=...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from omnissl.datamodules.common import data_root, read_manifest
from omnissl.datamodules.corpora import labeled_text


def load(manifest: Path) -> tuple[list[str], np.ndarray]:
    """-> (texts, labels (n,) str)."""
    root, rows = read_manifest(manifest)
    return [(root / r[0]).read_text(encoding="utf-8") for r in rows], np.array([r[2] for r in rows])


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="output folder; default: the cache")
    args = ap.parse_args()
    out = args.data or data_root() / "corpora" / f"labeled_text-{args.size}-seed{args.seed}"
    t0 = time.perf_counter()
    manifests = labeled_text.generate(out, size=args.size, seed=args.seed)
    t_gen = time.perf_counter() - t0
    (xtr, ytr), (xva, yva), (xte, yte) = (load(manifests[s]) for s in ("train", "valid", "test"))
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(xtr) > 100 else 1)
    clf = LogisticRegression(C=10.0, max_iter=3000)
    clf.fit(vec.fit_transform(xtr), ytr)
    acc = lambda x, y: float((clf.predict(vec.transform(x)) == y).mean())  # noqa: E731
    print(f"RESULT name=baseline_text acc={acc(xte, yte):.4f} valid_acc={acc(xva, yva):.4f} "
          f"train_acc={acc(xtr, ytr):.4f} chance={1.0 / len(set(ytr)):.4f} n_train={len(ytr)} n_test={len(yte)} "
          f"size={args.size} seed={args.seed} gen_s={t_gen:.1f}")


if __name__ == "__main__":
    main()
