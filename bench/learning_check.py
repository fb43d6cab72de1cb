"""Learning check: does pretraining help downstream?

A short CPU pretraining run of one objective on the embedded speech corpus (its `*_tiny_cpu.yaml` recipe with
recipes/trainer/cpu.yaml), then a linear probe (the first probe version, kept here: mean-pooled frozen features
from omnissl/eval/upstream.py, one scikit-learn logistic regression per layer) on the embedded keyword-spotting
task (held-out voices, noise, reverb), for
  - the pretrained encoder,
  - the same architecture at its random initialization (the very weights pretraining started from),
  - the non-learned baseline (pooled log-mel + logistic regression, bench/baseline_speech.py).
The probe layer is chosen on the valid split; test accuracy at that layer is reported.

    python bench/learning_check.py --objective wav2vec2 [--steps 600] [--size small] [--export DIR]

Ends with: RESULT name=learning_check objective=... probe_pretrained=... probe_random=... baseline=...
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from omnissl.batch import Batch
from omnissl.eval.upstream import EncoderStates, batch_modality, extract, frozen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def pooled_features(encoder: nn.Module, batches: Iterable[Batch], modality: str) -> tuple[Tensor, Tensor]:
    """Mean-pool every layer's output over valid tokens (CLS excluded). -> ((U, L + 1, D) float32, (U,) labels),
    in dataset-id order. The encoder runs frozen (see `omnissl.eval.upstream.frozen`)."""
    def checked(batches: Iterable[Batch]) -> Iterator[Batch]:
        for b in batches:
            if batch_modality(b) != modality:
                raise ValueError(f"expected {modality} batches, got {batch_modality(b)}")
            yield b

    with frozen(encoder):
        feats = extract(EncoderStates(encoder), checked(batches), frames=False)
    return feats.x, feats.labels


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, c: float = 1.0,
                          seed: int = 0) -> float:
    """Standardized features -> multinomial logistic regression (L2, strength 1/c) -> test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    unseen = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen} never occur in the training split")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(train_x.numpy().astype(np.float64), train_y.numpy())
    return float(clf.score(test_x.numpy().astype(np.float64), test_y.numpy()))


def pick_layer(encoder, dm) -> tuple[int, float, float, dict[int, float]]:
    """-> (layer chosen on valid, its test accuracy, its valid accuracy, valid accuracy per layer)."""
    tr_x, tr_y = pooled_features(encoder, dm.train_dataloader(), "audio")
    va_x, va_y = pooled_features(encoder, dm.val_dataloader(), "audio")
    te_x, te_y = pooled_features(encoder, dm.test_dataloader(), "audio")
    valid = {k: linear_probe_accuracy(tr_x[:, k], tr_y, va_x[:, k], va_y) for k in range(tr_x.shape[1])}
    best = max(valid, key=valid.get)
    return best, linear_probe_accuracy(tr_x[:, best], tr_y, te_x[:, best], te_y), valid[best], valid


def summarize_training(log_dir: str | None) -> None:
    """Print how the logged training metrics moved: mean of the first and last 10 % of logged steps."""
    import csv

    files = list(Path(log_dir).glob("**/metrics.csv")) if log_dir else []
    if not files:
        return
    rows = list(csv.DictReader(files[0].open()))
    keys = [k for k in rows[0] if k.startswith("train/") and k != "train/grad_norm"] + ["train/grad_norm"]
    print("\n| metric | first 10 % of steps | last 10 % of steps |\n|---|---|---|")
    for key in keys:
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if len(vals) >= 4:
            k = max(1, len(vals) // 10)
            print(f"| {key} | {sum(vals[:k]) / k:.4g} | {sum(vals[-k:]) / k:.4g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", required=True, help="recipe stem: recipes/audio/<objective>_tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "default"], help="labeled task size")
    ap.add_argument("--task", default="keywords", choices=["keywords", "speakers"])
    ap.add_argument("--export", default=None, help="also save the pretrained encoder as a package in this folder "
                    "(omnissl.checkpoints.save_backbone), e.g. for `omnissl probe DIR --report ...`")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more LightningCLI argument for the pretraining run, e.g. --extra=--model.init_args.x=1")
    args = ap.parse_args()

    from omnissl.cli import lightning_cli
    from omnissl.datamodules.audio import AudioDataModule

    recipe = ROOT / "recipes" / "audio" / f"{args.objective}_tiny_cpu.yaml"
    if not recipe.exists():
        raise SystemExit(f"no CPU recipe {recipe}")
    spec = f"embedded:{args.task}:{args.size}"
    probe_dm = AudioDataModule(train=spec, valid=spec, test=spec, max_samples=None,
                               min_samples=0, max_tokens=None, batch_size=16, num_workers=0)
    probe_dm.prepare_data()
    probe_dm.setup()

    if args.objective.startswith("hubert"):  # iteration-1 MFCC k-means units, as the recipe's header says
        from omnissl.commands import hubert_units

        hubert_units.main(["--manifest", "embedded:small", "--valid", "embedded:small", "--iteration", "1", "--clusters",
                    "50", "--sample-fraction", "0.5", "--seed", "0", "--out-ext", "km50"])
    common = ["-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(recipe), "--trainer.max_steps",
              str(args.steps), "--trainer.logger.init_args.mode", "csv"]
    if "total_steps:" in recipe.read_text():  # the LR schedule must end with the run, not freeze it midway
        common += ["--model.init_args.lr_scheduler.init_args.total_steps", str(args.steps)]
    common += args.extra
    t0 = time.perf_counter()
    init = lightning_cli(common, run=False).model  # same seed -> the exact starting weights
    random_encoder = copy.deepcopy(init.encoder)
    cli = lightning_cli(["fit", *common])
    pretrain_s = time.perf_counter() - t0
    pretrained = cli.model.encoder
    if args.export:
        from omnissl.checkpoints import save_backbone

        print(f"pretrained encoder package: {save_backbone(pretrained, args.export)}")
    summarize_training(cli.trainer.log_dir)
    # (not just the first parameter: data2vec 2.0 never uses the mask embedding, which stays at its init)
    assert any(not torch.equal(a, b) for a, b in zip(pretrained.parameters(), random_encoder.parameters()))

    rows = []
    for name, enc in (("pretrained", pretrained), ("random", random_encoder)):
        layer, test_acc, valid_acc, per_layer = pick_layer(enc, probe_dm)
        rows.append((name, layer, valid_acc, test_acc))
        print(f"{name}: valid acc per layer " + " ".join(f"{k}:{v:.3f}" for k, v in per_layer.items()), flush=True)

    import baseline_speech

    base = baseline_speech.run(args.task, args.size, 0, None)
    print(f"\nobjective {args.objective}, {args.steps} pretraining steps ({pretrain_s:.0f} s), task {args.task} "
          f"({args.size})\n")
    print("| encoder | layer (chosen on valid) | valid acc | test acc |")
    print("|---|---|---|---|")
    for name, layer, va, te in rows:
        print(f"| {name} | {layer} | {va:.3f} | {te:.3f} |")
    print(f"| log-mel + LR baseline | - | {base['valid_acc']:.3f} | {base['acc']:.3f} |")
    print(f"RESULT name=learning_check objective={args.objective} task={args.task} steps={args.steps} "
          f"probe_pretrained={rows[0][3]:.4f} probe_random={rows[1][3]:.4f} baseline={base['acc']:.4f}")


if __name__ == "__main__":
    main()
