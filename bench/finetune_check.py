"""Fine-tuning check: does a pretrained encoder fine-tune better than the same architecture from scratch?

Full fine-tuning with recipes/audio/finetune_keywords_tiny_cpu.yaml (mean pooling + linear head, layer-wise lr
decay, extractor frozen, encoder frozen for the first updates, tri-stage lr) on the embedded keyword-spotting
task (`small`: 12 keywords, held-out voices and accents in test; chance 0.083), twice with the same seed: once
from a pretraining checkpoint (its `encoder.*` weights), once from random initialization. Test accuracy of the
last weights on the test split.

    python bench/finetune_check.py --pretrained runs/cpu/<run>/checkpoints/last.ckpt [--steps 300]

Ends with: RESULT name=finetune_check steps=... test_acc_pretrained=... test_acc_random=...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/audio/finetune_keywords_tiny_cpu.yaml"


def run(pretrained: str | None, steps: int, extra: list[str]) -> dict:
    from omnissl.cli import lightning_cli

    args = ["-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(RECIPE), "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.mode", "csv", "--trainer.val_check_interval", str(steps),
            "--model.init_args.lr_scheduler.init_args.total_steps", str(steps),
            "--model.init_args.pretrained", "null" if pretrained is None else pretrained, *extra]
    t0 = time.perf_counter()
    cli = lightning_cli(["fit", *args])
    fit_s = time.perf_counter() - t0
    valid = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    train_loss = float(cli.trainer.callback_metrics.get("train/loss", float("nan")))
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"fit_s": fit_s, "train_loss": train_loss, "valid_acc": valid.get("val/acc", float("nan")),
            "test_acc": test["test/acc"], "test_loss": test["test/loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True, help="Lightning checkpoint of a tiny_cpu pretraining run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--extra", action="append", default=[], help="one more LightningCLI argument for both runs")
    args = ap.parse_args()
    rows = {name: run(ckpt, args.steps, args.extra) for name, ckpt in (("pretrained", args.pretrained),
                                                                        ("random", None))}
    print(f"\nfine-tuning on keywords (small), {args.steps} steps, from {args.pretrained} or from scratch\n")
    print("| encoder | last train loss | valid acc | test acc | test loss | fit time |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_loss']:.3f} | {r['valid_acc']:.3f} | {r['test_acc']:.3f} | {r['test_loss']:.3f} "
              f"| {r['fit_s']:.0f} s |")
    print(f"RESULT name=finetune_check steps={args.steps} test_acc_pretrained={rows['pretrained']['test_acc']:.4f} "
          f"test_acc_random={rows['random']['test_acc']:.4f}")


if __name__ == "__main__":
    main()
