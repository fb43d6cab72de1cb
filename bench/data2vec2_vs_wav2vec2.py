"""data2vec 2.0 vs wav2vec 2.0 on the same trunk and the same embedded speech: step time and what each learns
in the same wall-clock budget.

Both objectives run their small CPU recipes (recipes/audio/{wav2vec2,data2vec2}_tiny_cpu.yaml: the same 4 x 128
encoder with a 64-channel wav2vec 2.0 conv extractor, the same 4 s crops, 8 utterances per batch).

1. Step time: full optimizer steps (forward, backward, AdamW, the EMA teacher update for data2vec 2.0) on the
   same fixed batches, the two objectives interleaved round by round in one process; median per objective.
   speedup = wav2vec 2.0's median / data2vec 2.0's median (> 1: data2vec 2.0 is faster per batch).
2. Equal wall-clock budgets: each objective pretrains from the same seed for `--budget-s` seconds (the LR
   schedule spans the number of steps the measured step time allows; Lightning's `max_time` stops the run),
   then the frozen encoder gets the linear probe of bench/learning_check.py on the embedded keyword-spotting
   task (layer chosen on valid, test accuracy reported).

    python bench/data2vec2_vs_wav2vec2.py [--budget-s 240] [--rounds 10]

Ends with: RESULT name=data2vec2_vs_wav2vec2 speedup=... probe_d2v2=... probe_w2v2=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

OBJECTIVES = ("wav2vec2", "data2vec2")


def common_args(objective: str) -> list[str]:
    return ["-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(ROOT / f"recipes/audio/{objective}_tiny_cpu.yaml"),
            "--trainer.logger.init_args.mode", "csv"]


def timed_step(model, batch, step: int, optimizer) -> float:
    """One full optimizer step as the Trainer runs it, in seconds."""
    t0 = time.perf_counter()
    for module in model.modules():  # per-update state: EMA teacher update, Gumbel temperature
        if module is not model and hasattr(module, "set_num_updates"):
            module.set_num_updates(step)
    out = model.step(batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def step_times(rounds: int, batches: int) -> dict[str, float]:
    from omnissl.cli import lightning_cli

    models, optimizers, data = {}, {}, None
    for name in OBJECTIVES:
        cli = lightning_cli(common_args(name), run=False)
        models[name] = cli.model.train()
        optimizers[name] = cli.model.optimizer_factory(
            [p for p in cli.model.parameters() if p.requires_grad])
        data = data or cli.datamodule
    data.prepare_data()
    data.setup("fit")
    fixed = []
    for batch in data.train_dataloader():
        fixed.append(batch)
        if len(fixed) == batches:
            break
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    step = 0
    for r in range(rounds + 1):  # round 0 warms up (allocator, first-call costs)
        for name in (OBJECTIVES if r % 2 else OBJECTIVES[::-1]):  # alternate the order
            for batch in fixed:
                dt = timed_step(models[name], batch, step, optimizers[name])
                if r:
                    times[name].append(dt)
        step += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def pretrain_for(objective: str, budget_s: float, step_s: float):
    from omnissl.cli import lightning_cli

    steps = max(100, int(budget_s / step_s))  # the recipes warm up for 60 steps
    hms = time.strftime("%H:%M:%S", time.gmtime(budget_s))
    args = ["fit", *common_args(objective), "--trainer.max_steps", str(steps), "--trainer.max_time",
            f"00:{hms}", "--model.init_args.lr_scheduler.init_args.total_steps", str(steps),
            "--trainer.val_check_interval", str(max(1, steps // 3))]
    t0 = time.perf_counter()
    cli = lightning_cli(args)
    return cli.model.encoder, cli.trainer.global_step, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=240.0, help="pretraining wall-clock budget per objective")
    ap.add_argument("--rounds", type=int, default=10, help="timing rounds (after one warm-up round)")
    ap.add_argument("--batches", type=int, default=2, help="fixed batches per timing round")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "default"], help="labeled task size")
    args = ap.parse_args()

    from learning_check import pick_layer

    from omnissl.datamodules.audio import AudioDataModule

    torch.manual_seed(0)
    median = step_times(args.rounds, args.batches)
    speedup = median["wav2vec2"] / median["data2vec2"]
    print("\n| objective | median step (s) |\n|---|---|")
    for name in OBJECTIVES:
        print(f"| {name} | {median[name]:.3f} |")
    print(f"speedup (wav2vec2 / data2vec2 step time) = {speedup:.2f}", flush=True)

    spec = f"embedded:keywords:{args.size}"
    probe_dm = AudioDataModule(train=spec, valid=spec, test=spec, max_samples=None,
                               min_samples=0, max_tokens=None, batch_size=16, num_workers=0)
    probe_dm.prepare_data()
    probe_dm.setup()
    rows = {}
    for name in OBJECTIVES:
        encoder, steps, seconds = pretrain_for(name, args.budget_s, median[name])
        layer, test_acc, valid_acc, _ = pick_layer(encoder, probe_dm)
        rows[name] = (steps, seconds, layer, valid_acc, test_acc)
        print(f"{name}: {steps} steps in {seconds:.0f} s, probe layer {layer} valid {valid_acc:.3f} "
              f"test {test_acc:.3f}", flush=True)

    print(f"\nequal wall-clock budgets of {args.budget_s:.0f} s, keyword spotting ({args.size})\n")
    print("| objective | median step (s) | steps in budget | probe layer | valid acc | test acc |")
    print("|---|---|---|---|---|---|")
    for name in OBJECTIVES:
        steps, seconds, layer, va, te = rows[name]
        print(f"| {name} | {median[name]:.3f} | {steps} | {layer} | {va:.3f} | {te:.3f} |")
    print(f"RESULT name=data2vec2_vs_wav2vec2 speedup={speedup:.3f} probe_d2v2={rows['data2vec2'][4]:.4f} "
          f"probe_w2v2={rows['wav2vec2'][4]:.4f}")


if __name__ == "__main__":
    main()
