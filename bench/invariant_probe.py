"""The learning curve's claims under a second probe, one that does not depend on the features' basis.

The probe of `omnissl probe` (and of bench/learning_curve.py) standardizes every feature dimension and trains its
head with Adam: both act per coordinate, so the same information in another orthonormal basis scores differently
(bench/baseline_speech.py --only "64, mean+std": the log-mel baseline gains 0.01 on keywords and 0.025 on speakers
in a random basis). This bench probes the same pooled features with a probe that is exactly invariant to any
rotation of them: the train mean removed, one scalar scale for all dimensions (the RMS over the train clips),
then L2-regularized multinomial logistic regression (sklearn, L-BFGS, to convergence; its optimum is unique and
rotates with the features), with the regularization C chosen on valid from a grid. Per hidden state, the state
chosen on valid ("best state"), and the mean of all states.

It re-probes the encoders that bench/learning_curve.py kept under runs/learning_curve/<tag>/ (only those of the
configuration its JSONs record) and the log-mel baseline; every (tag, objective, minutes, seed, task) lands as a
JSON under bench/results/invariant_probe/ and is skipped when run again.

    python bench/invariant_probe.py --tag bf16-default --objectives data2vec2 [--minutes 20] [--seeds 0 1 2]

Reports per task the baseline and, per objective, mean ± std [95 % t-interval over seeds] under both probes, and
the ratio to the baseline under each. Ends with lines
    RESULT name=invariant_probe tag=... task=... objective=... minutes=... mean=... lo=... hi=... baseline=... n=...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402
import learning_curve as lc  # noqa: E402

RESULTS = lc.ROOT / "bench" / "results" / "invariant_probe"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
PROBE = ["center, one scalar scale, sklearn LogisticRegression(lbfgs, max_iter=3000), C on valid", list(C_GRID)]


def logistic(train, valid, test) -> dict:
    """(x, y) per split, x (N, D) float64 -> {"test", "valid", "C"}: the C of best valid accuracy (the first of
    a tie), on features centered by the train mean and divided by one scalar (rotation-invariant)."""
    from sklearn.linear_model import LogisticRegression

    mean = train[0].mean(0)
    scale = float(np.sqrt(((train[0] - mean) ** 2).mean())) or 1.0
    xs = [((x - mean) / scale, y) for x, y in (train, valid, test)]
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000).fit(*xs[0])
        v, t = model.score(*xs[1]), model.score(*xs[2])
        if best is None or v > best["valid"]:
            best = {"valid": float(v), "test": float(t), "C": c}
    return best


def probe_states(states, task: str, encoder=None) -> dict:
    """Every hidden state of `states` on `task`, pooled as the probe pools them -> {"per_state": [...], "best_state"
    (by valid), "test" (of the best state), "valid", "state_mean": {...}}."""
    import contextlib

    from omnissl.eval.probe import extract_splits
    from omnissl.eval.upstream import frozen

    data = learning.probe_data(task)
    with frozen(encoder) if encoder is not None else contextlib.nullcontext():
        feats, _ = extract_splits(states, data)
    splits = ("train", "valid", "test")

    def split(name, pick):
        return pick(feats[name].x.double()).numpy(), feats[name].labels.numpy()

    per_state = [logistic(*(split(s, lambda x, i=i: x[:, i]) for s in splits)) for i in range(feats["train"].x.shape[1])]
    best = max(range(len(per_state)), key=lambda i: per_state[i]["valid"])
    state_mean = logistic(*(split(s, lambda x: x.mean(1)) for s in splits))
    return {"test": per_state[best]["test"], "valid": per_state[best]["valid"], "best_state": best,
            "per_state": per_state, "state_mean": state_mean, "n_test": len(feats["test"].labels)}


def baseline(task: str) -> dict:
    from omnissl.eval.upstream import baseline_states

    path = RESULTS / f"baseline-{task}.json"
    key = lc.baseline_key(()) + "-" + json.dumps(PROBE)
    if lc.fresh(path, key):  # made with this configuration: reused
        return json.loads(path.read_text())
    res = probe_states(baseline_states("audio"), task)
    return json.loads(lc.write_json(path, {"config": key, "task": task, **res}).read_text())


def point(tag: str, objective: str, minutes: float, seed: int, task: str) -> dict | None:
    """The invariant probe of the encoder behind learning_curve's JSON of this point (None, with a message, when
    that JSON or its kept encoder is missing)."""
    from omnissl.checkpoints import load_backbone
    from omnissl.eval.upstream import EncoderStates

    primary_path = lc.result_path(tag, objective, minutes, seed, task)
    if not primary_path.exists():
        print(f"{primary_path.relative_to(lc.ROOT)}: no learning-curve result; skipped", flush=True)
        return None
    primary = json.loads(primary_path.read_text())
    key = primary["config"] + "-" + json.dumps(PROBE)
    path = RESULTS / tag / objective / primary_path.name
    if lc.fresh(path, key):  # made with this configuration: reused
        return json.loads(path.read_text())
    package = lc.RUNS / tag / objective / f"{minutes:g}min-seed{seed}-{primary['config']}" / "encoder"
    if not package.exists():
        print(f"{package.relative_to(lc.ROOT)}: encoder not kept on this machine; skipped", flush=True)
        return None
    t0 = time.perf_counter()
    encoder = load_backbone(package)
    res = probe_states(EncoderStates(encoder), task, encoder)
    record = {"config": key, "tag": tag, "objective": objective, "minutes": minutes, "seed": seed, "task": task,
              "primary_test": primary["probe"]["test"], "primary_best_layer": primary["probe"]["best_layer"],
              **res, "probe_s": round(time.perf_counter() - t0, 1)}
    print(f"{tag} {objective} {minutes:g} min seed {seed} {task}: invariant {res['test']:.3f} (state "
          f"{res['best_state']}), primary {primary['probe']['test']:.3f}", flush=True)
    return json.loads(lc.write_json(path, record).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--objectives", nargs="+", default=list(lc.OBJECTIVES), choices=lc.OBJECTIVES)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--tasks", nargs="+", default=list(learning.TASKS), choices=learning.TASKS)
    args = ap.parse_args()
    primary_base = {t: json.loads((lc.RESULTS / args.tag / f"baseline-{t}.json").read_text())["probe"]["test"]
                    for t in args.tasks if (lc.RESULTS / args.tag / f"baseline-{t}.json").exists()}
    for task in args.tasks:
        base = baseline(task)
        print(f"\n{task}: log-mel baseline, invariant probe {base['test']:.3f} (primary probe "
              f"{primary_base.get(task, float('nan')):.3f})")
        print("| objective | seeds | primary probe | x baseline | invariant probe | x baseline | state mean |")
        print("|---|---|---|---|---|---|---|")
        for objective in args.objectives:
            recs = [r for s in args.seeds if (r := point(args.tag, objective, args.minutes, s, task))]
            if not recs:
                continue
            prim = learning.seed_interval([r["primary_test"] for r in recs], recs[0]["n_test"])
            inv = learning.seed_interval([r["test"] for r in recs], recs[0]["n_test"])
            mean_state = learning.seed_interval([r["state_mean"]["test"] for r in recs], recs[0]["n_test"])
            print(f"| {lc.NAMES[objective]} | {' '.join(str(r['seed']) for r in recs)} | {learning.fmt(prim)} | "
                  f"{prim['mean'] / primary_base.get(task, float('nan')):.2f} | {learning.fmt(inv)} | "
                  f"{inv['mean'] / base['test']:.2f} | {mean_state['mean']:.3f} |")
            print(f"RESULT name=invariant_probe tag={args.tag} task={task} objective={objective} "
                  f"minutes={args.minutes:g} mean={inv['mean']:.4f} lo={inv['lo']:.4f} hi={inv['hi']:.4f} "
                  f"baseline={base['test']:.4f} n={len(recs)}", flush=True)


if __name__ == "__main__":
    main()
