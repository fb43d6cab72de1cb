"""Learning check: does pretraining help downstream?

Short CPU pretraining runs of one objective on the embedded speech corpus (its `*_tiny_cpu.yaml` recipe with
recipes/trainer/cpu.yaml), one per seed, then the probe of `omnissl probe` (omnissl.eval.probe.run_probe:
weighted sum of all hidden states, linear head, epoch chosen on valid; bench/learning.py) on the embedded
keyword-spotting and/or speaker task (held-out voices and accents, noise, reverb; >= 1,100 test clips), for
  - the pretrained encoder,
  - the same architecture at its random initialization (the very weights each run started from),
  - the non-learned baseline of `omnissl probe --baseline` (`baseline_states("audio")`: log-mel, mean + std).
Seeds and intervals are reported as everywhere in the benches (bench/learning.py): mean ± std [95 %
t-interval over seeds]; the baseline's interval is binomial (its features are deterministic).

    python bench/learning_check.py --objective wav2vec2 [--steps 600] [--seeds 0 1 2] [--tasks keywords speakers]
        [--export DIR]

Ends with one line per task:
    RESULT name=learning_check objective=... task=... steps=... seeds=3 probe_pretrained=<mean> probe_random=<mean>
        baseline=... ci_pretrained=<lo>,<hi> ci_random=<lo>,<hi> ci_baseline=<lo>,<hi>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", required=True, help="recipe stem: recipes/audio/<objective>_tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining (and probe) seeds")
    ap.add_argument("--tasks", nargs="+", default=["keywords"], choices=learning.TASKS)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "default"], help="labeled task size")
    ap.add_argument("--export", default=None, help="also save the first seed's pretrained encoder as a package in "
                    "this folder (omnissl.checkpoints.save_backbone), e.g. for `omnissl probe DIR --report ...`")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more LightningCLI argument for the pretraining run, e.g. --extra=--model.init_args.x=1")
    args = ap.parse_args()
    learning.recipe_path(args.objective)  # a typo fails before any work

    scores = {t: {"pretrained": [], "random": [], "best_layer": [], "per_layer": []} for t in args.tasks}
    walls = []
    for i, seed in enumerate(args.seeds):
        with tempfile.TemporaryDirectory(prefix="learning-check-") as tmp:
            run = learning.pretrain(args.objective, args.steps, seed, Path(tmp), args.extra)
            print(f"\nseed {seed}: {run['steps']} steps in {run['wall_s']:.0f} s", flush=True)
            learning.print_training_summary(run["log_dir"])
        walls.append(run["wall_s"])
        if args.export and i == 0:
            from omnissl.checkpoints import save_backbone

            print(f"pretrained encoder package: {save_backbone(run['encoder'], args.export)}")
        for task in args.tasks:
            pre = learning.probe(run["encoder"], task, args.size, seed=seed, name="pretrained")
            rnd = learning.probe(run["initial"], task, args.size, seed=seed, name="random init")
            s = scores[task]
            s["pretrained"].append(pre["test"])
            s["random"].append(rnd["test"])
            s["best_layer"].append(pre["best_layer"])
            s["per_layer"].append(pre["per_layer_test"])
            print(f"seed {seed} {task}: pretrained {pre['test']:.3f} (per layer "
                  f"{' '.join(f'{x:.3f}' for x in pre['per_layer_test'])}), random init {rnd['test']:.3f}", flush=True)

    print(f"\nobjective {args.objective}, {args.steps} pretraining steps per seed ({sum(walls) / len(walls):.0f} s "
          f"mean wall), seeds {args.seeds}; mean ± std [95 % t-interval] (seeds)\n")
    print("| task | pretrained | random init | log-mel baseline (binomial 95 %) | best layer per seed |")
    print("|---|---|---|---|---|")
    lines = []
    for task in args.tasks:
        s = scores[task]
        base = learning.baseline(task, args.size)
        half = 1.96 * base["se"]
        pre, rnd = learning.t_interval(s["pretrained"]), learning.t_interval(s["random"])
        print(f"| {task} | {learning.fmt(pre)} | {learning.fmt(rnd)} | {base['test']:.3f} "
              f"[{base['test'] - half:.3f}, {base['test'] + half:.3f}] | {' '.join(map(str, s['best_layer']))} |")
        lines.append(f"RESULT name=learning_check objective={args.objective} task={task} steps={args.steps} "
                     f"seeds={len(args.seeds)} probe_pretrained={pre['mean']:.4f} probe_random={rnd['mean']:.4f} "
                     f"baseline={base['test']:.4f} ci_pretrained={pre['lo']:.4f},{pre['hi']:.4f} "
                     f"ci_random={rnd['lo']:.4f},{rnd['hi']:.4f} "
                     f"ci_baseline={base['test'] - half:.4f},{base['test'] + half:.4f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
