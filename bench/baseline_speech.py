"""The non-learned floor of the labeled speech tasks, and the choice of it.

A pretrained encoder is only interesting on these tasks if it beats the strongest simple baseline. The baseline
is `omnissl.eval.upstream.baseline_states("audio")` (what `omnissl probe --baseline` and the learning benches
use), probed exactly as an encoder is: `omnissl.eval.probe.run_probe` (cached mean-pooled states, train-set
standardization, linear head trained with Adam, epoch chosen on valid accuracy, test accuracy reported).

`--compare` measures the candidates (log-mel mean pooling, mean + std pooling, more bins, deltas, MFCC + deltas)
with that probe and, for reference, with a scikit-learn logistic regression (C = 1) on the same pooled,
standardized features; the winner on keywords and speakers is the default of `LogMelStates`. The "random basis"
candidates are the baseline's features rotated: they show how much the probe depends on the basis.

    python bench/baseline_speech.py [--size small] [--tasks keywords speakers] [--compare] [--seeds 0 1 2]
    python bench/baseline_speech.py --compare --seeds 0 1 2 --only "mean+std"   # the baseline in 3 random bases

Prints one line per task (and candidate):
    RESULT name=baseline_speech task=<task> features=<name> acc=<test accuracy> ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omnissl.eval.upstream import LogMelStates, baseline_states  # noqa: E402

TASKS = ("keywords", "speakers")


class RotatedLogMel(LogMelStates):
    """The baseline's frames in a fixed random orthonormal basis (QR of a Gaussian matrix from `seed`): the same
    information, pooled the same way (mean pooling commutes with the rotation). A probe invariant to the basis
    would score it as the baseline; this one standardizes per dimension and trains with Adam, so it need not."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=torch.Generator().manual_seed(seed)))

    def frames(self, x):
        return super().frames(x) @ self.q.to(x.device)


# name -> constructor of the upstream; "baseline" is whatever baseline_states("audio") is today
CANDIDATES = {
    "baseline": lambda: baseline_states("audio"),
    "log-mel 64, mean": lambda: LogMelStates(64, std=False),
    "log-mel 64, mean+std": lambda: LogMelStates(64, std=True),
    "log-mel 80, mean+std": lambda: LogMelStates(80, std=True),
    "log-mel 64 + delta, mean+std": lambda: LogMelStates(64, deltas=1, std=True),
    "MFCC 20 + delta + delta2, mean+std": lambda: LogMelStates(64, n_mfcc=20, deltas=2, std=True),
    "MFCC 40 + delta + delta2, mean+std": lambda: LogMelStates(64, n_mfcc=40, deltas=2, std=True),
    **{f"log-mel 64, mean+std, random basis {k}": (lambda k=k: RotatedLogMel(k)) for k in range(3)},
}


def sklearn_accuracy(feats: dict, seed: int = 0) -> float:
    """Standardized pooled features -> multinomial logistic regression (C = 1) -> test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(split):
        f = feats[split]
        return f.x[:, 0].numpy().astype(np.float64), f.labels.numpy()

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, random_state=seed))
    clf.fit(*xy("train"))
    return float(clf.score(*xy("test")))


def evaluate(states, task: str, size: str, *, seeds=(0,), with_sklearn: bool = False) -> dict:
    """Probe one upstream on embedded:<task>:<size> with run_probe's classifier, one fit per probe seed
    (the features are extracted once). -> dict of test/valid accuracies (lists over seeds), sizes, timing."""
    from omnissl.eval.probe import extract_splits, fit_classifier
    from omnissl.eval.probe_data import load_probe_data

    spec = f"embedded:{task}:{size}"
    data = load_probe_data(spec, spec, spec)
    t0 = time.perf_counter()
    feats, _ = extract_splits(states, data)
    extract_s = time.perf_counter() - t0
    fits = [fit_classifier(feats["train"], feats["valid"], feats["test"], num_classes=len(data.classes), seed=s)
            for s in seeds]
    out = {"test": [r.test for r in fits], "valid": [r.valid for r in fits], "train": [r.train for r in fits],
           "dim": int(feats["train"].x.shape[-1]), "n_train": len(feats["train"]), "n_test": len(feats["test"]),
           "chance": 1.0 / len(data.classes), "extract_s": extract_s}
    if with_sklearn:
        out["sklearn"] = sklearn_accuracy(feats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "default"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--compare", action="store_true", help="measure every candidate baseline (CANDIDATES)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="probe seeds (head init and batch order)")
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING",
                    help="with --compare: only the candidates whose name contains one of these")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = list(CANDIDATES) if args.compare else ["baseline"]
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
        if not names:
            ap.error(f"--only {args.only} matches none of {list(CANDIDATES)}")
    for task in args.tasks:
        if args.compare:
            print(f"\n{task} ({args.size}): probe of `omnissl probe` (mean over {len(args.seeds)} probe seeds) | "
                  "sklearn LR\n\n| features | dim | valid acc | test acc | test acc, sklearn LR |\n"
                  "|---|---|---|---|---|")
        for name in names:
            r = evaluate(CANDIDATES[name](), task, args.size, seeds=args.seeds, with_sklearn=args.compare)
            test, valid = float(np.mean(r["test"])), float(np.mean(r["valid"]))
            if args.compare:
                print(f"| {name} | {r['dim']} | {valid:.3f} | {test:.3f} | {r['sklearn']:.3f} |", flush=True)
            print(f"RESULT name=baseline_speech task={task} features={name.replace(' ', '_')} acc={test:.4f} "
                  f"valid_acc={valid:.4f} chance={r['chance']:.4f} n_train={r['n_train']} n_test={r['n_test']} "
                  f"size={args.size}" + (f" sklearn_acc={r['sklearn']:.4f}" if "sklearn" in r else ""), flush=True)


if __name__ == "__main__":
    main()
