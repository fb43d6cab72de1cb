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
        [--export DIR] [--report DIR]

With one seed there is no seed-to-seed interval: the pretrained and random-init points then carry the test set's
binomial 95 % interval, marked as such (`make demo`); the learning curve (bench/learning_curve.py) has the
intervals over seeds. --report DIR writes DIR/headline.md (this table, and the committed learning-curve picture
of bench/results/learning_curve/<--curve-tag>/ copied beside it as learning_curve.png).

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
    ap.add_argument("--report", default=None, help="write the headline table (+ the learning-curve PNG) here")
    ap.add_argument("--curve-tag", default="recipes", help="bench/results/learning_curve/<tag> for --report's PNG")
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

    head = (f"objective {args.objective}, {args.steps} pretraining steps per seed ({sum(walls) / len(walls):.0f} s "
            f"mean wall), seeds {args.seeds}; test accuracy, mean ± std [95 % t-interval over seeds] "
            f"(one seed: [binomial 95 %] of the test set)")
    table = ["| task | pretrained | random init | log-mel baseline [binomial 95 %] | best layer per seed |",
             "|---|---|---|---|---|"]
    lines = []
    for task in args.tasks:
        s = scores[task]
        base = learning.baseline(task, args.size)
        half = 1.96 * base["se"]
        pre = learning.seed_interval(s["pretrained"], base["n_test"])
        rnd = learning.seed_interval(s["random"], base["n_test"])
        table.append(f"| {task} | **{learning.fmt(pre)}** | {learning.fmt(rnd)} | {base['test']:.3f} "
                     f"[{base['test'] - half:.3f}, {base['test'] + half:.3f}] | "
                     f"{' '.join(map(str, s['best_layer']))} |")
        lines.append(f"RESULT name=learning_check objective={args.objective} task={task} steps={args.steps} "
                     f"seeds={len(args.seeds)} probe_pretrained={pre['mean']:.4f} probe_random={rnd['mean']:.4f} "
                     f"baseline={base['test']:.4f} ci_pretrained={pre['lo']:.4f},{pre['hi']:.4f} "
                     f"ci_random={rnd['lo']:.4f},{rnd['hi']:.4f} "
                     f"ci_baseline={base['test'] - half:.4f},{base['test'] + half:.4f}"
                     f"{' ci=binomial' if pre.get('binomial') else ''}")
    print(f"\n{head}\n\n" + "\n".join(table) + "\n")
    if args.report:
        write_headline(Path(args.report), head, table, args.curve_tag)
    print("\n".join(lines))


def write_headline(out: Path, head: str, table: list[str], tag: str) -> None:
    """out/headline.md: the pretrained vs random init vs log-mel table, and the learning curves over seeds
    (the committed PNG and table of bench/learning_curve.py, copied beside it)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    curve = learning.ROOT / "bench" / "results" / "learning_curve" / tag
    text = ["# Does pretraining help? (this run)\n", head + "\n", *table, ""]
    if (curve / "learning_curve.png").exists():
        shutil.copy(curve / "learning_curve.png", out / "learning_curve.png")
        text += ["## Learning curves over seeds (bench/learning_curve.py, committed results)\n",
                 "![learning curves](learning_curve.png)\n", f"Table: {curve.relative_to(learning.ROOT)}/results.md\n"]
    (out / "headline.md").write_text("\n".join(text))
    print(f"headline: {out / 'headline.md'}")


if __name__ == "__main__":
    main()
