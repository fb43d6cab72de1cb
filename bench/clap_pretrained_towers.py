"""CLAP towers started from pretrained omnissl encoders vs from random init, same recipe, same budget, same seeds.

    python bench/clap_pretrained_towers.py [--audio audiomae|w2v|w2v_captions] [--pretrain-steps 600] [--steps 600]
                                           [--audio-pretrain-steps N] [--seeds 0,1,2] [--size small] [--arms pretrained,random] [--curve 0]

1. Pretrains the two encoders the CLAP recipe starts from, `--pretrain-steps` updates each (the audio tower
   `--audio-pretrain-steps` if given), seed 0: the audio tower
   (`--audio audiomae`, the default: AudioMAE on log-mel frame stacks, `recipes/audio/audiomae_frames_tiny_cpu.yaml`,
   on the audio of the captioned corpus's train split, for `recipes/audio_text/clap_from_audiomae_mlm_tiny_cpu.yaml`,
   a CLAP step as cheap as clap_tiny_cpu.yaml's; `--audio w2v`: wav2vec 2.0, `recipes/audio/wav2vec2_tiny_cpu.yaml`
   on embedded speech (4 x 128 on 64-bin log-mel frames), for `recipes/audio_text/clap_from_omnissl_tiny_cpu.yaml`;
   `--audio w2v_captions`: the same wav2vec 2.0 recipe in domain, on the audio of the captioned corpus's train
   clips (captions unused), for the same CLAP recipe) and a masked LM (`recipes/text/mlm_tiny_cpu.yaml`, embedded
   docstrings), exported as a package (its tokenizer comes with it).
2. Trains that CLAP recipe `--steps` updates per seed once per arm (`--arms`): "pretrained" (audio_init_from and
   text_init_from set), "random" (both null; the same architecture and the MLM run's tokenizer, so only the
   initial weights differ), "audio" (the pretrained audio tower, a random text tower) and "text" (a random audio
   tower, the MLM text tower), and evaluates each final model as bench/clap_zeroshot.py does: zero-shot accuracy
   on the held-out classes (200
   clips each at "small"; generalized: argmax over all 14 classes, and classic: over the 3 held-out ones), on the
   seen ones, and text->audio R@1 / R@5 on the test split (scenes that each hold a held-out combination).

Resumable: pretraining checkpoints stay in $CLAP_BENCH_RUNS/v<corpus version> (/tmp/clap_bench/v5) and each
finished CLAP run writes bench/results/clap/v<corpus version>/<prefix>_pt<pretrain steps>_<arm>_s<steps>_seed<k>.json (skipped when
present), so a later session continues where one stopped. The prefix names what an arm depends on: the CLAP
recipe for "random" and "text" (`omnissl` for the wav2vec 2.0 recipe, whichever `--audio` run; `omnissl_audiomae`),
the audio run for "pretrained" and "audio" (`omnissl`: speech, `omnissl_w2vcap`: in domain, `omnissl_audiomae`).
`--curve N` also keeps a checkpoint every N updates of a run and evaluates each (R@k over training; a finished
run without a curve is run again). The summary prints the mean over seeds, the sample std,
the 95 % t-interval and Welch's test of each arm - random (bench/learning.py). Run it with OMP_NUM_THREADS=1 on a
shared machine, or on a GPU (`--device` is the trainer's accelerator). `--size tiny --pretrain-steps 4 --steps 4
--seeds 0` is a smoke run of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clap_zeroshot import RESULTS, ROOT, RUNS, run_one  # noqa: E402

RECIPES = {"w2v": ROOT / "recipes" / "audio_text" / "clap_from_omnissl_tiny_cpu.yaml",
           "w2v_captions": ROOT / "recipes" / "audio_text" / "clap_from_omnissl_tiny_cpu.yaml",
           "audiomae": ROOT / "recipes" / "audio_text" / "clap_from_audiomae_mlm_tiny_cpu.yaml"}
PRETRAIN = {"w2v": ROOT / "recipes" / "audio" / "wav2vec2_tiny_cpu.yaml",
            "w2v_captions": ROOT / "recipes" / "audio" / "wav2vec2_tiny_cpu.yaml",
            "audiomae": ROOT / "recipes" / "audio" / "audiomae_frames_tiny_cpu.yaml",
            "mlm": ROOT / "recipes" / "text" / "mlm_tiny_cpu.yaml"}
IN_DOMAIN = ("audiomae", "w2v_captions")  # pretrained on the audio of the captioned corpus's train clips
# result-name prefix of the arms that hold the audio run ("pretrained", "audio") and of the ones that hold only the
# CLAP recipe and the MLM run ("random", "text"; shared by the --audio choices of one recipe)
AUDIO_PREFIX = {"w2v": "omnissl", "w2v_captions": "omnissl_w2vcap", "audiomae": "omnissl_audiomae"}
RECIPE_PREFIX = {"w2v": "omnissl", "w2v_captions": "omnissl", "audiomae": "omnissl_audiomae"}
ARMS = ("pretrained", "random", "audio", "text")


def pretrain(name: str, steps: int, accelerator: str, size: str = "small") -> Path:
    """`steps` updates of a pretraining recipe from seed 0 -> its checkpoint (cached). The in-domain runs
    (`IN_DOMAIN`) train on the audio of the captioned corpus of `size` (its train split's clips, one row each)."""
    in_domain = name in IN_DOMAIN
    ckpt = RUNS / f"pretrain_{name}{'' if size == 'small' or not in_domain else '_' + size}_s{steps}.ckpt"
    if ckpt.exists():
        return ckpt
    from omnissl.cli import lightning_cli

    run_dir = ckpt.with_suffix("")
    recipe = PRETRAIN[name]
    args = ["fit", "-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(recipe), "--trainer.max_steps", str(steps),
            "--trainer.accelerator", accelerator, "--trainer.logger.init_args.mode", "csv",
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--seed_everything", "0"]
    if in_domain:
        args += ["--data.init_args.train", f"embedded:captions:{size}"]  # validation is off (limit 0)
    text = recipe.read_text()
    if "total_steps:" in text:
        args += ["--model.init_args.lr_scheduler.init_args.total_steps", str(steps)]
    if "warmup_steps:" in text:
        args += ["--model.init_args.lr_scheduler.init_args.warmup_steps", str(max(1, steps // 10))]
    cli = lightning_cli(args)
    tmp = ckpt.with_suffix(".tmp")
    cli.trainer.save_checkpoint(tmp)
    tmp.rename(ckpt)
    return ckpt


def mlm_package(ckpt: Path) -> Path:
    out = ckpt.with_suffix("")  # the package directory beside the checkpoint
    if not (out / "tokenizer.json").is_file():
        from omnissl.commands import export

        export.main([str(ckpt), str(out), "--overwrite", "--quiet"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", default="audiomae", choices=sorted(RECIPES), help="the pretrained audio tower's run")
    p.add_argument("--arms", default="pretrained,random", help=f"comma-separated, of {ARMS}")
    p.add_argument("--curve", type=int, default=0, help="also evaluate a checkpoint every N updates of each run")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--audio-pretrain-steps", type=int, default=None,
                   help="the audio tower's pretraining updates (default: --pretrain-steps); the arms that hold it "
                        "are named pt<these>, and 'pretrained' also mlm<pretrain steps> when the two differ")
    p.add_argument("--steps", type=int, default=600, help="CLAP updates per run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", default="small", choices=("tiny", "small", "default"), help="captions corpus size")
    p.add_argument("--device", default="cpu", help="trainer accelerator (cpu, gpu)")
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    arms = a.arms.split(",")
    if any(k not in ARMS for k in arms) or "random" not in arms:
        p.error(f"--arms: comma-separated of {ARMS}, with random (the control); got {a.arms!r}")
    tag = "" if a.size == "small" else f"{a.size}_"
    audio_steps = a.audio_pretrain_steps or a.pretrain_steps
    mlm_tag = f"mlm{a.pretrain_steps}_" if audio_steps != a.pretrain_steps else ""
    names = {k: f"{AUDIO_PREFIX[a.audio]}_{tag}pt{audio_steps}_{mlm_tag if k == 'pretrained' else ''}{k}"
             if k in ("pretrained", "audio") else f"{RECIPE_PREFIX[a.audio]}_{tag}pt{a.pretrain_steps}_{k}" for k in arms}
    if not a.summary_only:
        audio = pretrain(a.audio, audio_steps, a.device, a.size)
        mlm = mlm_package(pretrain("mlm", a.pretrain_steps, a.device))
        common = ["--data.init_args.tokenizer", str(mlm), "--data.init_args.embedded_size", a.size,
                  "--trainer.accelerator", a.device]
        audio_from = {"pretrained": str(audio), "audio": str(audio), "random": "null", "text": "null"}
        text_from = {"pretrained": str(mlm), "text": str(mlm), "random": "null", "audio": "null"}
        for seed in seeds:
            for init in arms:
                res = run_one(names[init], RECIPES[a.audio], common + ["--model.init_args.audio_init_from",
                              audio_from[init], "--model.init_args.text_init_from", text_from[init]], a.steps, seed,
                              curve=a.curve)
                z, r = res["zeroshot"], res["retrieval"] or {}
                print(f"{init} seed={seed}: held-out {z.get('zeroshot_acc_heldout', float('nan')):.3f} seen "
                      f"{z.get('zeroshot_acc_seen', float('nan')):.3f} test t2a R@1 {r.get('t2a_R@1', float('nan')):.3f} "
                      f"R@5 {r.get('t2a_R@5', float('nan')):.3f} ({res['wall_s']} s, load {res['load_avg']:.1f})",
                      flush=True)
    from learning import compare, fmt, seed_interval

    print(f"load average now {os.getloadavg()}")
    rows = {k: [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{v}_s{a.steps}_seed*.json"))]
            for k, v in names.items()}
    metrics = {"heldout": lambda r: r["zeroshot"].get("zeroshot_acc_heldout", float("nan")),
               "heldout_among_heldout": lambda r: r["zeroshot"].get("zeroshot_acc_heldout_among_heldout", float("nan")),
               "heldout_auc": lambda r: r["zeroshot"].get("zeroshot_auc_heldout", float("nan")),
               "seen": lambda r: r["zeroshot"].get("zeroshot_acc_seen", float("nan")),
               "t2a_R@1": lambda r: (r["retrieval"] or {}).get("t2a_R@1", float("nan")),
               "t2a_R@5": lambda r: (r["retrieval"] or {}).get("t2a_R@5", float("nan"))}
    for m, get in metrics.items():
        vals = {k: [get(r) for r in rs] for k, rs in rows.items()}
        if not vals["random"]:
            continue
        print(f"{m:8s} random ({names['random']}) {fmt(seed_interval(vals['random']))}")
        for k in arms:
            if k == "random" or not vals[k]:
                continue
            c = compare(vals[k], vals["random"])
            print(f"{m:8s} {k} ({names[k]}) {fmt(seed_interval(vals[k]))}; - random {c['diff']:+.3f} (Welch p {c['p']:.3f})")
            print(f"RESULT name=clap_pretrained_towers metric={m} steps={a.steps} arm={names[k]} "
                  f"value={sum(vals[k]) / len(vals[k]):.4f} random={sum(vals['random']) / len(vals['random']):.4f} "
                  f"seeds={min(len(vals[k]), len(vals['random']))}")
    print_curves(names, a.steps)
    return 0


def print_curves(names: dict[str, str], steps: int) -> None:
    """R@k over training of the arms whose runs kept a curve: mean ± std over seeds at each kept update, update 0
    from the untrained runs (`<name>_s0_seed<k>.json`, bench/clap_zeroshot.py's --steps 0) where they exist."""
    from learning import fmt, seed_interval

    keys = ("t2a_R@1", "t2a_R@5", "a2t_R@1", "a2t_R@5")
    for arm, name in names.items():
        runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{name}_s{steps}_seed*.json"))]
        runs = [r for r in runs if r.get("curve")]
        if not runs:
            continue
        by_step: dict[int, list[dict]] = {}
        for f in sorted(RESULTS.glob(f"{name}_s0_seed*.json")):
            by_step.setdefault(0, []).append(json.loads(f.read_text()))
        for r in runs:
            for pt in r["curve"]:
                by_step.setdefault(int(pt["step"]), []).append(pt)
        print(f"\n{name} over training (test split retrieval; mean ± std [95 % t-interval] over seeds):\n\n| update | "
              + " | ".join(f"test {k}" for k in keys) + " | held-out acc, generalized | held-out acc, classic |\n"
              + "|---" * (len(keys) + 3) + "|")
        for step in sorted(by_step):
            pts = by_step[step]
            cells = [fmt(seed_interval([(p["retrieval"] or {})[k] for p in pts])) for k in keys]
            cells += [fmt(seed_interval([p["zeroshot"][k] for p in pts])) for k in
                      ("zeroshot_acc_heldout", "zeroshot_acc_heldout_among_heldout")]
            print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
