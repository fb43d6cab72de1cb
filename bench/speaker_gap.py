"""Why do the tiny speech encoders score far below log-mel on the speaker task? One probe per variant.

Every row probes one pooled upstream on the embedded speaker task (--tasks adds keywords) with the classifier
of `omnissl probe` (omnissl.eval.probe.fit_classifier: weighted sum of the states, linear head, epoch chosen
on valid), on features extracted once per encoder and split:

  * extractor norm: the wav2vec 2.0 conv extractor's first-layer GroupNorm (per channel over time, fairseq
    extractor_mode "default", the tiny recipes) vs extractor_mode "layer_norm" (per-frame LayerNorm over
    channels after every conv, conv bias; LARGE) vs no norm at all (a diagnostic, not a paper option);
  * pooling: the time mean of every state (the probe; SUPERB SID) vs mean + std (statistics pooling, as the
    log-mel baseline's), the same for every upstream;
  * per-utterance waveform normalization (zero mean, unit variance; fairseq `normalize`, HF do_normalize);
  * --baselines: the log-mel baseline as is and with every frame normalized over its bands (what a per-frame
    LayerNorm after a log-mel frontend keeps);
  * stage: the trunk's hidden states (h_0 = trunk input ... h_L) vs the frontend's output alone (before
    the feature LayerNorm and projection), after that LayerNorm, after the projection (before positions), and
    the conv extractor's first conv layer before its norm, as a log energy per channel (a random 64-filter
    "filterbank": log compression, no normalization).

    python bench/speaker_gap.py [--seeds 0 1] [--tasks speakers keywords] [--package runs/.../encoder ...]
    python bench/speaker_gap.py --seeds 0 --norms --baselines --no-normalize --package runs/.../encoder  # log-mel

Random-init encoders are the tiny recipes' architecture (omnissl.backbones.builders.tiny: 4 x 128, 64-channel
extractor) from each seed; --package adds pretrained encoders (save_backbone packages). Prints a markdown table
and RESULT lines, with the load average (timings are not the point here; accuracies do not depend on load).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402
from omnissl.eval.upstream import LogMelStates  # noqa: E402


class FrameNormedLogMel(LogMelStates):
    """The log-mel baseline (mean + std pooling) with every frame first normalized over its bands (zero mean, unit
    variance): what a per-frame LayerNorm of the frames keeps."""

    def frames(self, x):
        f = super().frames(x)[:, : self.n_mels]
        f = (f - f.mean(1, keepdim=True)) / (f.std(1, unbiased=False, keepdim=True) + 1e-5)
        return torch.cat([f, f.std(0, unbiased=False).expand_as(f)], dim=1)


def tiny_encoder(seed: int, norm: str) -> nn.Module:
    """The tiny recipes' audio encoder from `seed`, with the extractor's norm "group" (the recipes),
    "layer" (extractor_mode layer_norm, conv bias) or "none" (group mode with its GroupNorm removed)."""
    from omnissl.backbones.builders import tiny
    from omnissl.backbones.config import build_module, module_config
    from omnissl.eval.upstream import seeded

    with seeded(seed):
        enc = tiny("audio", dim=128, depth=4, heads=4)
    if norm == "layer":
        cfg = module_config(enc)
        cfg["args"]["frontend"]["args"].update(mode="layer", bias=True)
        with seeded(seed):
            enc = build_module(cfg)
    elif norm == "none":
        enc.frontend.norms[0] = nn.Identity()
    return enc.eval()


def _stats(h, valid):
    """h (B, N, S, D), valid (B, N) -> mean, std over valid frames: (B, S, D) each."""
    w = valid[:, :, None, None].float()
    n = w.sum(1).clamp(min=1)
    mean = (h * w).sum(1) / n
    std = (((h - mean[:, None]) ** 2 * w).sum(1) / n).clamp(min=0).sqrt()
    return mean, std


@torch.no_grad()
def pooled(encoder: nn.Module, loader, *, normalize: bool) -> dict:
    """One pass of `encoder` over `loader` -> variant name -> (U, S, D) pooled features, plus "labels", "ids"."""
    from omnissl.eval.upstream import EncoderStates

    def valid_of(lengths, n):
        return torch.arange(n)[None] < lengths[:, None]

    states, fe = EncoderStates(encoder), encoder.frontend
    out: dict[str, list] = {}
    for batch in loader:
        x = batch.inputs["audio"]
        lengths = batch.lengths.get("audio", torch.full((x.shape[0],), x.shape[1]))
        if normalize:
            v = valid_of(lengths, x.shape[1]).float()
            n = v.sum(1, keepdim=True)
            mean = (x * v).sum(1, keepdim=True) / n
            var = (((x - mean) * v) ** 2).sum(1, keepdim=True) / n
            x = (x - mean) / (var + 1e-5).sqrt() * v
            batch = dataclasses.replace(batch, inputs={**batch.inputs, "audio": x})
        hs, valid = states(batch)
        m, s = _stats(hs, valid)
        tokens = encoder.embed(x, lengths)  # raw: the frontend's output; features: after its LayerNorm
        pad = tokens.padding_mask
        tvalid = torch.ones(tokens.x.shape[:2], dtype=torch.bool) if pad is None else ~pad
        fm, fs = _stats(tokens.raw[:, :, None].float(), tvalid)
        nm, ns = _stats(tokens.features[:, :, None].float(), tvalid)
        pm, ps = _stats(tokens.x[:, :, None].float(), tvalid)
        rows = [("trunk, mean", m), ("trunk, mean+std", torch.cat([m, s], -1)),
                ("extractor output, mean", fm), ("extractor output, mean+std", torch.cat([fm, fs], -1)),
                ("extractor output after the feature LayerNorm, mean", nm),
                ("extractor output after the feature LayerNorm, mean+std", torch.cat([nm, ns], -1)),
                ("projected (the trunk's input before positions), mean", pm),
                ("projected (the trunk's input before positions), mean+std", torch.cat([pm, ps], -1))]
        if hasattr(fe, "convs"):  # the conv extractor (a log-mel frontend has no first conv)
            _, k, st = fe.layers[0]
            h1 = fe.convs[0](x[:, None]).transpose(1, 2)  # first conv, before its norm: (B, N1, C)
            v1 = valid_of((lengths - k) // st + 1, h1.shape[1])
            e1, _ = _stats(h1[:, :, None].float() ** 2, v1)
            rows.append(("first conv before norm, log energy", torch.log(e1 + 1e-8)))
        for name, val in rows + [("labels", batch.targets["label"]), ("ids", batch.ids)]:
            out.setdefault(name, []).append(val.cpu())
    ids = torch.cat(out.pop("ids"))
    order = torch.argsort(ids)
    return {k: torch.cat(v)[order] for k, v in out.items()} | {"ids": ids[order]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--tasks", nargs="+", default=["speakers"], choices=learning.TASKS)
    ap.add_argument("--norms", nargs="*", default=["group", "none", "layer"],
                    help="random-init extractor norms (none given: only the --package encoders)")
    ap.add_argument("--package", action="append", default=[], help="a pretrained encoder package (repeatable)")
    ap.add_argument("--no-normalize", action="store_true", help="skip the waveform-normalized pass")
    ap.add_argument("--baselines", action="store_true",
                    help="also the log-mel baseline as is and with every frame normalized over its bands")
    args = ap.parse_args()
    from omnissl.checkpoints import load_backbone
    from omnissl.eval.probe import extract_splits, fit_classifier
    from omnissl.eval.upstream import Features, frozen

    results: dict[tuple[str, str], list[float]] = {}
    encoders = [(f"random init, extractor norm {norm}", seed, lambda s=seed, n=norm: tiny_encoder(s, n))
                for norm in args.norms for seed in args.seeds]
    encoders += [(f"pretrained {p}", 0, lambda p=p: load_backbone(p).eval()) for p in args.package]
    for task in args.tasks:
        data = learning.probe_data(task)
        for label, states in ((("log-mel (the baseline), mean+std", LogMelStates()),
                               ("log-mel, frames normalized over bands, mean+std", FrameNormedLogMel()))
                              if args.baselines else ()):
            f, _ = extract_splits(states, data)  # once; one probe fit per seed
            for seed in args.seeds:
                r = fit_classifier(f["train"], f["valid"], f["test"], num_classes=len(data.classes), seed=seed)
                results.setdefault((task, label), []).append(r.test)
                print(f"  {task} | {label} | seed {seed}: test {r.test:.3f} (valid {r.valid:.3f})", flush=True)
        for name, seed, make in encoders:
            encoder = make()
            for normalize in ([False] if args.no_normalize or "norm none" in name or "norm layer" in name
                              else [False, True]):
                with frozen(encoder):
                    splits = {s: pooled(encoder, loader, normalize=normalize) for s, loader in data.loaders.items()}
                for variant in [k for k in splits["train"] if k not in ("labels", "ids")]:
                    f = {s: Features(d[variant], d["ids"], d["labels"], source=f"{task} {s}")
                         for s, d in splits.items()}
                    r = fit_classifier(f["train"], f["valid"], f["test"], num_classes=len(data.classes), seed=seed)
                    label = f"{name}, {variant}{', waveform normalized' if normalize else ''}"
                    results.setdefault((task, label), []).append(r.test)
                    print(f"  {task} | {label} | seed {seed}: test {r.test:.3f} (valid {r.valid:.3f})", flush=True)

    print(f"\nload average {os.getloadavg()[0]:.2f}\n\n| task | upstream, stage, pooling | test accuracy per seed "
          "| mean |\n|---|---|---|---|")
    for (task, label), scores in results.items():
        print(f"| {task} | {label} | {' '.join(f'{s:.3f}' for s in scores)} | {statistics.fmean(scores):.3f} |")
    for (task, label), scores in results.items():
        print(f"RESULT name=speaker_gap task={task} upstream=\"{label}\" mean={statistics.fmean(scores):.4f} "
              f"n={len(scores)}")


if __name__ == "__main__":
    main()
