"""Floor for the labeled text task: TF-IDF + logistic regression, no pretraining.

Task: which of 9 standard-library families a docstring comes from, with the test split by module
(`omnissl/datamodules/corpora/labeled_text.py`); a pretrained text encoder's probe is interesting if it beats
this. The baseline is `omnissl.eval.tfidf.tfidf_baseline`, what `omnissl probe --baseline` reports for text:
TF-IDF of token uni+bigrams (sublinear tf, min_df 2) over the token ids of a tokenizer, scikit-learn
LogisticRegression (C = 10), trained on `train`, reported on `valid` and `test`.

    python bench/baseline_text.py [--size small] [--tokenizer tok.json | --pretraining-vocab 4096] [--compare]

`--tokenizer`: the encoder's tokenizer (a tokenizer.json, or a package folder); default: the byte-level BPE of
`--pretraining-vocab` entries trained on the embedded text corpus (`embedded:text`, size small), i.e. the
tokenizer of recipes/text/mlm_tiny_cpu.yaml (4096). `--compare` adds, for reference, word uni+bigram TF-IDF
over the raw docstrings (the same vectorizer and classifier, scikit-learn's default word pattern, lower-cased)
and the former bag-of-tokens baseline through the probe's linear head.

Prints:  RESULT name=baseline_text features=<name> acc=<test accuracy> valid_acc=... train_acc=... chance=...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from omnissl.datamodules.common import read_manifest
from omnissl.eval.probe_data import load_probe_data
from omnissl.eval.tfidf import tfidf_baseline


def load(manifest: Path) -> tuple[list[str], np.ndarray]:
    """-> (texts, labels (n,) str)."""
    root, rows = read_manifest(manifest)
    return [(root / r[0]).read_text(encoding="utf-8") for r in rows], np.array([r[2] for r in rows])


def pretraining_tokenizer(vocab: int) -> str:
    """The tokenizer an MLM run on embedded:text (small) trains with `vocab` entries."""
    from omnissl.datamodules.text import TextDataModule

    dm = TextDataModule(embedded_size="small", vocab_size=vocab, num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup()
    return str(dm.tokenizer_path)


def words_tfidf(sources: dict[str, str]) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xva, yva), (xte, yte) = (load(Path(sources[s])) for s in ("train", "valid", "test"))
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(xtr) >= 100 else 1)
    clf = LogisticRegression(C=10.0, max_iter=3000).fit(vec.fit_transform(xtr), ytr)
    return {s: float(clf.score(vec.transform(x), y)) for s, (x, y) in
            (("test", (xte, yte)), ("valid", (xva, yva)), ("train", (xtr, ytr)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "default"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--pretraining-vocab", type=int, default=4096)
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    tok = args.tokenizer or pretraining_tokenizer(args.pretraining_vocab)
    spec = f"embedded:labeled_text:{args.size}"
    t0 = time.perf_counter()
    data = load_probe_data(spec, spec, spec, tokenizer=tok)
    rows = {"tfidf_tokens": tfidf_baseline(data).result}  # the baseline
    scores = {k: {"test": r.test, "valid": r.valid, "train": r.train} for k, r in rows.items()}
    if args.compare:
        from omnissl.eval.probe import run_probe
        from omnissl.eval.upstream import baseline_states

        scores["tfidf_words_raw_text"] = words_tfidf(data.sources)
        r = run_probe(baseline_states("text", vocab_size=data.vocab_size), data, "bag").result
        scores["bag_of_tokens_probe_head"] = {"test": r.test, "valid": r.valid, "train": r.train}
    n = {s: len(loader.dataset) for s, loader in data.loaders.items()}
    for name, s in scores.items():
        print(f"RESULT name=baseline_text features={name} acc={s['test']:.4f} "
              f"valid_acc={s['valid']:.4f} train_acc={s['train']:.4f} chance={1 / len(data.classes):.4f} "
              f"n_train={n['train']} n_test={n['test']} size={args.size} tokenizer={tok} "
              f"s={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
