"""Zero-shot on held-out classes of the embedded captioned corpus: CLAP CPU recipes over seeds, against chance and
the same evaluation of the untrained model.

    python bench/clap_zeroshot.py [--variants tiny,...] [--seeds 0,1,2] [--steps 600] [--untrained]

Each run trains a variant (a recipe plus LightningCLI overrides, `VARIANTS`) for `--steps` updates from a seed
(model init, data order, caption draws), then evaluates its final weights with `omnissl.eval.zeroshot.evaluate`:
zero-shot accuracy on the zero-shot clips (14 classes; the 3 held-out ones, whose combination of attributes no
training clip holds, have 200 clips each at size "small") and retrieval on the test split (scenes that each hold
a held-out combination). Every finished run writes bench/results/clap/v<corpus version>/<variant>_s<steps>_seed<k>.json
(the captioned corpus's `VERSION`: runs on another version of the corpus are other results; v4/ holds the
version-4 history) and is skipped when run again (resumable: a later session continues where this one stopped). `--untrained` evaluates
each variant's initial weights (steps 0), the non-learned baseline. The summary prints, per variant, the mean over
seeds with its sample standard deviation and 95 % Student-t interval (`bench/learning.py`), and each seed's
binomial standard error on the held-out clips. Runs go to /tmp/clap_bench/v<corpus version>/; use OMP_NUM_THREADS=1
on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from omnissl.datamodules.corpora.captions import VERSION as CORPUS_VERSION  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "clap" / f"v{CORPUS_VERSION}"  # results of one corpus version together
RUNS = Path(os.environ.get("CLAP_BENCH_RUNS", "/tmp/clap_bench")) / f"v{CORPUS_VERSION}"
TINY = ROOT / "recipes" / "audio_text" / "clap_tiny_cpu.yaml"
FROM_OMNISSL = ROOT / "recipes" / "audio_text" / "clap_from_omnissl_tiny_cpu.yaml"


def recipe_part(recipe: Path, *keys: str) -> str:
    """One part of a recipe (e.g. "model", "init_args", "encoder") as a JSON string for a LightningCLI argument."""
    import yaml

    node = yaml.safe_load(recipe.read_text())
    for k in keys:
        node = node[k]
    return json.dumps(node)


# clap_from_omnissl_tiny_cpu.yaml's random-init arm as bench/clap_pretrained_towers.py runs it (its
# omnissl_pt600_random results): the 600-update MLM run's tokenizer, no tower loaded
OMNISSL_RANDOM = ["--data.init_args.tokenizer", str(RUNS / "pretrain_mlm_s600"), "--model.init_args.audio_init_from",
                  "null", "--model.init_args.text_init_from", "null"]

# name -> (recipe, extra LightningCLI arguments)
TEXT = "--model.init_args.text_encoder.init_args."
VARIANTS: dict[str, tuple[Path, list[str]]] = {
    "tiny": (TINY, []),  # the recipe: both towers 2 x 128 from scratch, mean-pooled
    "bow": (TINY, [TEXT + "depth", "0"]),  # text tower without blocks: mean of token + position embeddings, MLP
    "frozen_text": (TINY, ["--model.init_args.freeze_text_layers", "-1"]),  # random frozen text tower
    "dropout": (TINY, [TEXT + "dropout", "0.1", "--model.init_args.encoder.init_args.trunk.init_args.dropout", "0.1"]),
    # + 2 coarse captions per train clip with a tone or beeps event (each such event named by its pitch or its
    # sound only: AudioTextDataModule(coarse_captions=2))
    "coarse": (TINY, ["--data.init_args.coarse_captions", "2"]),
    # bag-of-words text tower with CLIP's linear projections (the text embedding is additive in the words)
    "bow_linear": (TINY, [TEXT + "depth", "0", "--model.init_args.projection", "linear"]),
    "coarse_bow_linear": (TINY, [TEXT + "depth", "0", "--model.init_args.projection", "linear",
                                 "--data.init_args.coarse_captions", "2"]),
    "coarse_bow": (TINY, [TEXT + "depth", "0", "--data.init_args.coarse_captions", "2"]),
    # the from_omnissl random-init arm with clap_tiny_cpu.yaml's audio tower (2 x 128 pre-LN over 40 ms log-mel
    # stacks, sin-cos positions) in place of its own (4 x 128 post-LN over 20 ms stacks, conv positions): which
    # of the two recipes' differences matters (compare with --baseline omnissl_pt600_random)
    "omnissl_random_tinyaudio": (FROM_OMNISSL, OMNISSL_RANDOM + [
        "--model.init_args.encoder", recipe_part(TINY, "model", "init_args", "encoder")]),
}


def cli_args(recipe: Path, extra: list[str], steps: int, seed: int, run_dir: Path) -> list[str]:
    steps = steps or 600  # steps 0 (the untrained model) builds the module of a 600-step run
    args = ["-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(recipe), "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.mode", "csv", "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    if "total_steps:" in recipe.read_text():  # the schedule spans the run: warmup 10 % (the recipes' 60 of 600)
        args += ["--model.init_args.lr_scheduler.init_args.total_steps", str(steps),
                 "--model.init_args.lr_scheduler.init_args.warmup_steps", str(steps // 10)]
    return args + list(extra)


PROMPTS = ("This is a sound of {label}.", "A {label}.")  # LAION-CLAP's; the form of a one-event caption


def evaluate_model(model, datamodule) -> dict:
    """Zero-shot and test-split retrieval of a CLAP model with its DataModule's tokenizer and corpus (zero-shot
    with the model's prompt, and with each of `PROMPTS` under "zeroshot_prompts")."""
    from omnissl.eval.zeroshot import evaluate

    datamodule.setup("test")
    res = evaluate(model, datamodule, split="test", device="cpu")
    others = {}
    for prompt in PROMPTS:
        z = res["zeroshot"] if prompt == res["prompt"] else evaluate(model, datamodule, split="none",
                                                                    prompt=prompt, device="cpu")["zeroshot"]
        others[prompt] = z
    n_held = sum(n for _, h, n, _ in res["per_class"] if h)
    n_seen = sum(n for _, h, n, _ in res["per_class"] if not h)
    heldout_classes = [c for c, h, _, _ in res["per_class"] if h]
    # chance among the classes: 1/C; a constant guesser of one held-out class gets 1/3 of the held-out clips
    return {"retrieval": res.get("retrieval"), "zeroshot": res["zeroshot"], "per_class": res["per_class"],
            "chance": res["chance"], "prompt": res["prompt"], "num_heldout_clips": n_held, "num_seen_clips": n_seen,
            "heldout_classes": heldout_classes, "num_test_clips": res.get("num_clips"), "zeroshot_prompts": others,
            "per_class_auc": res.get("per_class_auc"), "chance_among_heldout": res.get("chance_among_heldout"),
            "heldout_wins": res.get("heldout_wins")}


def curve_args(run_dir: Path, every: int) -> list[str]:
    """LightningCLI arguments for a second ModelCheckpoint that keeps a checkpoint every `every` updates."""
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.init_args.dirpath={run_dir / 'curve'}",
            f"--trainer.callbacks.init_args.every_n_train_steps={every}",
            "--trainer.callbacks.init_args.save_top_k=-1", "--trainer.callbacks.init_args.filename=u{step}"]


def evaluate_curve(run_dir: Path, datamodule) -> list[dict]:
    """Each checkpoint `curve_args` kept, evaluated like the final model: [{"step", "zeroshot", "retrieval"}]."""
    from omnissl.checkpoints import read_checkpoint
    from omnissl.eval.zeroshot import load_clap

    points = []
    for ckpt in (run_dir / "curve").glob("*.ckpt"):
        model, _ = load_clap(ckpt)
        res = evaluate_model(model, datamodule)
        points.append({"step": read_checkpoint(ckpt).global_step, "zeroshot": res["zeroshot"],
                       "retrieval": res["retrieval"]})
    return sorted(points, key=lambda p: p["step"])


def run_one(variant: str, recipe: Path, extra: list[str], steps: int, seed: int, *, force: bool = False,
            curve: int = 0) -> dict:
    """Train (steps > 0) or just build (steps 0) one variant from a seed and evaluate it; cached as JSON. curve > 0:
    also keep a checkpoint every `curve` updates and evaluate each ("curve" in the JSON; a finished run without
    one is run again)."""
    out = RESULTS / f"{variant}_s{steps}_seed{seed}.json"
    if out.exists() and not force:
        cached = json.loads(out.read_text())
        if not (curve and steps) or cached.get("curve"):
            return cached
    from omnissl.cli import lightning_cli
    from omnissl.eval.zeroshot import load_clap

    run_dir = RUNS / f"{variant}_s{steps}_seed{seed}"
    if curve and steps and out.exists():  # its run kept no checkpoints along the way: train it again beside it
        run_dir = run_dir.with_name(f"{run_dir.name}_curve{curve}")
    args = cli_args(recipe, extra, steps, seed, run_dir) + (curve_args(run_dir, curve) if curve and steps else [])
    t0 = time.perf_counter()
    if steps == 0:
        cli = lightning_cli(args, run=False)
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
        cli.model.setup("fit")  # as a fit's first step sees it: towers from audio_init_from / text_init_from
        model, done = cli.model.eval(), 0
    else:
        cli = lightning_cli(["fit", *args])
        plan = getattr(cli, "run_plan", None) or {}
        done, model = int(cli.trainer.global_step), cli.model
        if plan.get("finished"):  # `omnissl fit` found the run done and trained nothing: evaluate its checkpoint
            done, (model, _) = int(plan["step"]), load_clap(plan["ckpt_path"])
    wall = time.perf_counter() - t0
    res = evaluate_model(model, cli.datamodule)
    res.update(variant=variant, recipe=str(recipe.relative_to(ROOT)), extra=extra, steps=done, seed=seed,
               corpus_version=CORPUS_VERSION,
               wall_s=round(wall, 1), load_avg=os.getloadavg()[0], threads=int(os.environ.get("OMP_NUM_THREADS", 0)))
    if curve and steps:
        res["curve"] = evaluate_curve(run_dir, cli.datamodule)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def reevaluate(path: Path) -> dict:
    """Evaluate a finished run again with the current evaluation (its final checkpoint, or for steps 0 the
    initial weights of its seed), keeping its training record; the JSON is rewritten."""
    from omnissl.cli import lightning_cli
    from omnissl.eval.zeroshot import load_clap

    res = json.loads(path.read_text())
    recipe, steps, seed = ROOT / res["recipe"], int(res["steps"]), int(res["seed"])
    run_dir = RUNS / path.stem
    cli = lightning_cli(cli_args(recipe, res["extra"], steps, seed, run_dir), run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    model = cli.model.eval()
    if steps > 0:
        ckpts = sorted(run_dir.glob("**/checkpoints/last.ckpt"))
        if not ckpts:
            raise SystemExit(f"{path}: no checkpoint under {run_dir} to evaluate again")
        model, _ = load_clap(ckpts[-1])
    keep = {k: res[k] for k in ("variant", "recipe", "extra", "steps", "seed", "wall_s", "load_avg", "threads")}
    res = {**evaluate_model(model, cli.datamodule), **keep}
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def summarize(rows: list[dict], key: str = "zeroshot_acc_heldout") -> dict:
    from learning import binomial_se, fmt, seed_interval

    vals = [r["zeroshot"][key] for r in rows if key in r["zeroshot"]]
    n = rows[0]["num_heldout_clips"] if key.endswith("heldout") else rows[0]["num_seen_clips"]
    ci = seed_interval(vals, n_test=n)
    ci["text"] = fmt(ci)
    ci["binomial_se"] = [round(binomial_se(v, n), 4) for v in vals]
    ci["values"] = vals
    return ci


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="tiny", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--untrained", action="store_true", help="also evaluate each variant's initial weights")
    p.add_argument("--summary-only", action="store_true", help="only summarize the finished runs")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate finished runs that lack the classic zero-shot accuracy again (from their checkpoints)")
    p.add_argument("--baseline", default="tiny",
                   help="the results each variant is compared with (Welch), e.g. omnissl_pt600_random")
    p.add_argument("--curve", type=int, default=0,
                   help="also keep a checkpoint every N updates of each new run and evaluate it (R@k over training)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    for name in names:
        for steps in ([0] if a.untrained else []) + [a.steps]:
            for seed in seeds:
                path = RESULTS / f"{name}_s{steps}_seed{seed}.json"
                if a.summary_only and not path.exists():
                    continue
                if a.reevaluate and path.exists() and \
                        "zeroshot_acc_heldout_among_heldout" not in json.loads(path.read_text())["zeroshot"]:
                    reevaluate(path)
                res = run_one(name, *VARIANTS[name], steps, seed, curve=a.curve)
                z, r = res["zeroshot"], res["retrieval"] or {}
                print(f"{name} steps={res['steps']} seed={seed}: held-out {z.get('zeroshot_acc_heldout', float('nan')):.3f} "
                      f"seen {z.get('zeroshot_acc_seen', float('nan')):.3f} all {z['zeroshot_acc']:.3f} test t2a R@1 "
                      f"{r.get('t2a_R@1', float('nan')):.3f} R@5 {r.get('t2a_R@5', float('nan')):.3f} "
                      f"({res['wall_s']} s, load {res['load_avg']:.1f})", flush=True)
    print(f"load average now {os.getloadavg()}")
    for name in names:
        for steps in ([0] if a.untrained else []) + [a.steps]:
            rows = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{name}_s{steps}_seed*.json"))]
            if not rows:
                continue
            held, seen = summarize(rows), summarize(rows, "zeroshot_acc_seen")
            aucs = [r["zeroshot"]["zeroshot_auc_heldout"] for r in rows if "zeroshot_auc_heldout" in r["zeroshot"]]
            if aucs:
                from learning import fmt, t_interval

                seen_auc = [r["zeroshot"]["zeroshot_auc_seen"] for r in rows if "zeroshot_auc_seen" in r["zeroshot"]]
                print(f"  per-class AUC (chance 0.5), held-out classes: {fmt(t_interval(aucs))}; seen: "
                      f"{fmt(t_interval(seen_auc))}")
            print(f"RESULT name=clap_zeroshot variant={name} steps={steps} seeds={len(rows)} "
                  f"heldout={held['mean']:.4f} heldout_std={held['std']:.4f} heldout_lo={held['lo']:.4f} "
                  f"heldout_hi={held['hi']:.4f} seen={seen['mean']:.4f} chance={rows[0]['chance']:.4f}")
            print(f"  held-out, generalized (argmax over all {len(rows[0]['per_class'])} classes, chance {rows[0]['chance']:.3f}; {rows[0]['num_heldout_clips']} clips/seed): "
                  f"{held['text']}; per-seed binomial SE {held['binomial_se']}; seen: {seen['text']}")
            if all("zeroshot_acc_heldout_among_heldout" in r["zeroshot"] for r in rows):
                classic = summarize(rows, "zeroshot_acc_heldout_among_heldout")
                print(f"  held-out, classic (argmax over the held-out classes only, chance "
                      f"{rows[0]['chance_among_heldout']:.3f}): {classic['text']}")
                print(f"RESULT name=clap_zeroshot_classic variant={name} steps={steps} seeds={len(rows)} "
                      f"heldout_among_heldout={classic['mean']:.4f} lo={classic['lo']:.4f} hi={classic['hi']:.4f} "
                      f"chance={rows[0]['chance_among_heldout']:.4f}")
    if a.baseline in names or (RESULTS / f"{a.baseline}_s{a.steps}_seed0.json").exists():
        from learning import compare

        base = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{a.baseline}_s{a.steps}_seed*.json"))]
        get = {"zeroshot_acc_heldout": lambda r: r["zeroshot"].get("zeroshot_acc_heldout"),
               "zeroshot_acc_heldout_among_heldout": lambda r: r["zeroshot"].get("zeroshot_acc_heldout_among_heldout"),
               "zeroshot_auc_heldout": lambda r: r["zeroshot"].get("zeroshot_auc_heldout"),
               "zeroshot_acc_seen": lambda r: r["zeroshot"].get("zeroshot_acc_seen"),
               "t2a_R@1": lambda r: (r["retrieval"] or {}).get("t2a_R@1"),
               "t2a_R@5": lambda r: (r["retrieval"] or {}).get("t2a_R@5")}
        for name in names:
            rows = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{name}_s{a.steps}_seed*.json"))]
            if name == a.baseline or len(rows) < 2 or len(base) < 2:
                continue
            for key, g in get.items():
                x = [g(r) for r in rows if g(r) is not None]
                y = [g(r) for r in base if g(r) is not None]
                if len(x) >= 2 and len(y) >= 2:
                    c = compare(x, y)
                    print(f"  {name} - {a.baseline} at {a.steps} updates, {key}: {c['diff']:+.3f} (Welch p {c['p']:.3f})")
    print("\n| variant | updates | seed | held-out acc (all classes) | held-out acc (among held-out) | seen acc | "
          "held-out AUC | seen AUC | test t2a R@1 | test t2a R@5 | held-out classes (acc) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for f in sorted(RESULTS.glob(f"{name}_s*_seed*.json")):
            r = json.loads(f.read_text())
            z, ret = r["zeroshot"], r["retrieval"] or {}
            per = ", ".join(f"{c} {acc:.2f}" for c, h, _, acc in r["per_class"] if h)
            g = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
            print(f"| {name} | {r['steps']} | {r['seed']} | {g(z, 'zeroshot_acc_heldout')} | "
                  f"{g(z, 'zeroshot_acc_heldout_among_heldout')} | {g(z, 'zeroshot_acc_seen')} | "
                  f"{g(z, 'zeroshot_auc_heldout')} | {g(z, 'zeroshot_auc_seen')} | {g(ret, 't2a_R@1')} | "
                  f"{g(ret, 't2a_R@5')} | {per} |")
    curves = [json.loads(f.read_text()) for name in names for f in sorted(RESULTS.glob(f"{name}_s*_seed*.json"))]
    curves = [r for r in curves if r.get("curve")]
    if curves:
        print("\nOver training (checkpoints of one run; test split retrieval, zero-shot clips):\n\n| variant | seed | update |"
              " test t2a R@1 | test t2a R@5 | test a2t R@5 | test t2a mAP@10 | held-out acc (all) | held-out acc (among "
              "held-out) | held-out AUC | seen acc |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in curves:
            for pt in r["curve"]:
                z, ret = pt["zeroshot"], pt["retrieval"] or {}
                g = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
                print(f"| {r['variant']} | {r['seed']} | {pt['step']} | {g(ret, 't2a_R@1')} | {g(ret, 't2a_R@5')} | "
                      f"{g(ret, 'a2t_R@5')} | {g(ret, 't2a_mAP@10')} | {g(z, 'zeroshot_acc_heldout')} | "
                      f"{g(z, 'zeroshot_acc_heldout_among_heldout')} | {g(z, 'zeroshot_auc_heldout')} | "
                      f"{g(z, 'zeroshot_acc_seen')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
