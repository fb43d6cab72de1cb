"""data2vec 2.0 vs wav2vec 2.0 on the same trunk and the same embedded speech: step time, and what each learns
in the same pretraining budget, over seeds, with intervals.

Both objectives run their small CPU recipes (recipes/audio/{wav2vec2,data2vec2}_tiny_cpu.yaml: the same 4 x 128
encoder on 64-bin log-mel frames, the same 4 s crops, 8 utterances per batch; `--extra` changes both alike, e.g.
the pretraining corpus).

1. Step time: full optimizer steps (forward, backward, AdamW, the EMA teacher update for data2vec 2.0) on the
   same fixed batches, the two objectives interleaved round by round in one process; median per objective.
   speedup = wav2vec 2.0's median / data2vec 2.0's median (> 1: data2vec 2.0 is faster per batch).
2. Equal budgets: the learning curve's points at `--minutes` (bench/learning_curve.py: a fixed number of steps
   per objective, calibrated to that many minutes of an idle 2-core VM, so the comparison does not depend on
   what else runs on the machine; the results are the curve's JSONs, made here when missing and reused when
   present), one pretraining run per seed, probed with the probe of `omnissl probe` on the embedded keyword
   task. Reported as mean ± std [95 % t-interval over seeds]; Welch's t-test says whether the difference is
   significant (p < 0.05).

    python bench/data2vec2_vs_wav2vec2.py [--minutes 5] [--seeds 0 1 2] [--task keywords] [--rounds 10]
    python bench/data2vec2_vs_wav2vec2.py --rounds 0 --report-only --history --tag recipes-2026-12-06
    python bench/data2vec2_vs_wav2vec2.py --rounds 0 --minutes 20 --tag default-corpus \
        --extra=--data.init_args.train=embedded:default

Ends with: RESULT name=data2vec2_vs_wav2vec2 speedup=... probe_d2v2=<mean> probe_w2v2=<mean> ci_d2v2=<lo>,<hi>
    ci_w2v2=<lo>,<hi> p=... significant=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402
import learning_curve  # noqa: E402

OBJECTIVES = ("wav2vec2", "data2vec2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="budget per run (idle-VM minutes: fixed steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", default="keywords", choices=learning.TASKS)
    ap.add_argument("--rounds", type=int, default=10, help="timing rounds (after one warm-up round); 0: no timing")
    ap.add_argument("--batches", type=int, default=2, help="fixed batches per timing round")
    ap.add_argument("--tag", default="recipes", help="learning-curve results folder (bench/learning_curve.py)")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more LightningCLI argument for both objectives' runs (as bench/learning_curve.py)")
    ap.add_argument("--commit", action="store_true", help="git-commit each new result JSON")
    ap.add_argument("--report-only", action="store_true", help="no pretraining: compare the points already there")
    ap.add_argument("--history", action="store_true", help="with --report-only: also points made with earlier "
                    "recipes (e.g. --tag recipes-2026-12-06)")
    args = ap.parse_args()
    if args.history and not args.report_only:
        raise SystemExit("--history compares old results; it goes with --report-only")

    speedup = float("nan")
    if args.rounds:
        torch.manual_seed(0)
        median = learning.step_times(OBJECTIVES, args.rounds, args.batches)
        speedup = median["wav2vec2"] / median["data2vec2"]
        print("\n| objective | median step (s), now | calibrated idle step (s) |\n|---|---|---|")
        for name in OBJECTIVES:
            print(f"| {name} | {median[name]:.3f} | {learning_curve.IDLE_STEP_S[name]:.3f} |")
        print(f"speedup (wav2vec2 / data2vec2 step time) = {speedup:.2f} (calibration: "
              f"{learning_curve.IDLE_STEP_S['wav2vec2'] / learning_curve.IDLE_STEP_S['data2vec2']:.2f})", flush=True)

    if not args.report_only:
        for seed in args.seeds:
            for name in OBJECTIVES:
                learning_curve.run_point(name, args.minutes, seed, [args.task], args.tag, args.extra, args.commit)
    points = learning_curve.collect(args.tag, args.history)
    acc = {name: [r["probe"]["test"] for r in points.get((args.task, name, args.minutes), [])
                  if r["seed"] in args.seeds] for name in OBJECTIVES}
    n_test = {name: next((r["probe"]["n_test"] for r in points.get((args.task, name, args.minutes), [])), None)
              for name in OBJECTIVES}
    ci = {name: learning.seed_interval(acc[name], n_test[name]) for name in OBJECTIVES}
    test = learning.compare(acc["data2vec2"], acc["wav2vec2"])
    if not all(acc.values()):
        raise SystemExit(f"no points for {[n for n in OBJECTIVES if not acc[n]]} at {args.minutes:g} min in tag "
                         f"{args.tag} (seeds {args.seeds})")
    steps = {name: learning_curve.steps_for(name, args.minutes) for name in OBJECTIVES}
    print(f"\nequal budgets of {args.minutes:g} idle-VM minutes, {args.task} (small), seeds {args.seeds}, tag "
          f"{args.tag}\n")
    print("| objective | steps | test accuracy: mean ± std [95 % t-interval] (seeds) |\n|---|---|---|")
    for name in OBJECTIVES:
        print(f"| {name} | {steps[name]} | {learning.fmt(ci[name])} |")
    better = "data2vec 2.0" if test["diff"] > 0 else "wav2vec 2.0"
    print(f"\n{better} is higher by {abs(test['diff']):.3f}; Welch's t-test p = {test['p']:.3f}: "
          f"{'significant' if test['significant'] else 'not significant'} at 0.05")
    print(f"RESULT name=data2vec2_vs_wav2vec2 speedup={speedup:.3f} probe_d2v2={ci['data2vec2']['mean']:.4f} "
          f"probe_w2v2={ci['wav2vec2']['mean']:.4f} ci_d2v2={ci['data2vec2']['lo']:.4f},{ci['data2vec2']['hi']:.4f} "
          f"ci_w2v2={ci['wav2vec2']['lo']:.4f},{ci['wav2vec2']['hi']:.4f} p={test['p']:.4f} "
          f"significant={int(test['significant'])}")


if __name__ == "__main__":
    main()
