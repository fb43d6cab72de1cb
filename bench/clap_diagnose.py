"""Why do seen prompts win the argmax on held-out clips? Diagnostics of trained CLAP checkpoints on the embedded
captioned corpus's zero-shot clips.

    python bench/clap_diagnose.py CKPT [CKPT ...] [--json out.json]

For each checkpoint (or CLAP package): the class that wins the argmax over all 14 prompts on each held-out class's
clips, the classic 3-way accuracy (argmax over the held-out prompts only), and two composition tests of the
Latin square, one per tower: for a held-out class h = (pitch p, sound s) and the seen classes (p, s'), (p', s),
(p', s'), the "analogy" e(p, s') + e(p', s) - e(p', s') is compared (cosine, rank among the 14 classes) with e(h),
where e is the text tower's prompt embedding ("This is a sound of {label}.") or the audio tower's class-mean
embedding of the zero-shot clips. A tower that composes pitch and sound additively ranks h first; one that keeps
each combination apart does not. Last, cos(held-out prompt, mean audio embedding of its clips) against the same
for the seen classes. Evaluation only (a few seconds per checkpoint on a CPU).

    python bench/clap_diagnose.py --factor-probe ENC [ENC ...] [--json out.json]

Factor probe of audio towers, before or after CLAP: does a tower's clip embedding (mean over its last layer's
valid frames) carry pitch and sound as factors that transfer to unseen combinations? On the zero-shot clips of the
9 pitch x sound classes, a logistic regression (standardized features) is fit on the 6 seen classes' clips (20
each at "small") to name the pitch word, another the sound word, and both are scored on the 600 clips of the 3
held-out combinations (chance 1/3 each; "both": the pair right). ENC: an omnissl checkpoint or package (a CLAP
checkpoint gives its audio tower), `random:<recipe>[:<seed>]` (the recipe's model.init_args.encoder, freshly
initialized), or `logmel` (mean and std over time of 64-bin log-mel frames: the baseline without a tower).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

F = torch.nn.functional
# held-out class -> the seen classes (p, s'), (p', s), (p', s') of its analogy
ANALOGIES = {"low pure tone": ("low buzzy tone", "mid-pitched pure tone", "mid-pitched buzzy tone"),
             "mid-pitched buzzy tone": ("mid-pitched pure tone", "high-pitched buzzy tone", "high-pitched pure tone"),
             "high-pitched beeps": ("high-pitched pure tone", "mid-pitched beeps", "mid-pitched pure tone")}


@torch.no_grad()
def diagnose(path: str, size: str = "small") -> dict:
    from omnissl.datamodules.audio_text import AudioTextDataModule
    from omnissl.eval.zeroshot import load_clap

    model, tok = load_clap(path)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tok_path.write_text(tok or "", encoding="utf-8")
        dm = AudioTextDataModule(train="embedded:captions", tokenizer=str(tok_path), embedded_size=size,
                                 max_samples=64000, batch_size=64, num_workers=0)
        dm.setup("test")
        loader, classes, tokenize, held = dm.zeroshot_data()
        embs, labels = [], []
        for b in loader:
            embs.append(F.normalize(model.embed_audio(b.inputs["audio"], b.lengths.get("audio")).float(), dim=-1))
            labels.append(b.targets["label"])
        audio, labels = torch.cat(embs), torch.cat(labels)
        prompts = model.embed_texts(tokenize([model.prompt.format(label=c) for c in classes]))
    scores = audio @ prompts.t()
    index = {c: i for i, c in enumerate(classes)}
    held_ids = [i for i, h in enumerate(held) if h]
    means = torch.stack([F.normalize(audio[labels == k].mean(0), dim=0) for k in range(len(classes))])
    out: dict = {"checkpoint": str(path), "heldout": {}}
    for h in held_ids:
        sel = labels == h
        wins = torch.bincount(scores[sel].argmax(-1), minlength=len(classes))
        among = torch.tensor(held_ids)[scores[sel][:, held_ids].argmax(-1)]
        row = {"wins": {classes[k]: int(wins[k]) for k in wins.argsort(descending=True)[:3] if wins[k] > 0},
               "acc_among_heldout": float((among == h).float().mean()),
               "prompt_vs_audio_mean": float(prompts[h] @ means[h])}
        name = classes[h]
        if name in ANALOGIES:
            a, b, c = (index[x] for x in ANALOGIES[name])
            for tower, e in (("audio", means), ("text", prompts)):
                guess = F.normalize(e[a] + e[b] - e[c], dim=0)
                sims = e @ guess
                row[f"{tower}_analogy_cos"] = float(sims[h])
                row[f"{tower}_analogy_rank"] = int((sims > sims[h]).sum())
        out["heldout"][name] = row
    out["seen_prompt_vs_audio_mean"] = float(sum(float(prompts[k] @ means[k]) for k in range(len(classes))
                                                 if not held[k]) / (len(classes) - len(held_ids)))
    return out


def factor_labels(name: str) -> tuple[str, str] | None:
    """"mid-pitched buzzy tone" -> ("mid-pitched", "buzzy tone"); None for a class outside the pitch x sound square."""
    from omnissl.datamodules.corpora.captions import PITCH_BANDS

    for pitch in PITCH_BANDS:
        sound = name[len(pitch) + 1:] if name.startswith(pitch + " ") else None
        if sound in ("pure tone", "buzzy tone", "beeps"):
            return pitch, sound
    return None


def load_tower(spec: str):
    """An audio tower by `--factor-probe` spec -> a callable (audio (B, T), lengths) -> (B, D) clip features."""
    import importlib

    import torchaudio
    import yaml

    from omnissl.ops import mean_pool

    if spec == "logmel":
        mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=64)

        def logmel(audio, lengths):
            x = (mel(audio) + 1e-6).log().transpose(1, 2)  # (B, frames, 64)
            n = 1 + (lengths if lengths is not None else torch.full((len(audio),), audio.shape[1])) // 160
            mask = torch.arange(x.shape[1])[None] >= n.clamp(max=x.shape[1])[:, None]  # True: padding
            mean = mean_pool(x, mask)
            var = mean_pool((x - mean[:, None]) ** 2, mask)
            return torch.cat([mean, var.sqrt()], -1)
        return logmel
    if spec.startswith("random:"):
        recipe, _, seed = spec[len("random:"):].partition(":")
        cfg = yaml.safe_load(Path(recipe).read_text())["model"]["init_args"]["encoder"]
        module, _, name = cfg["class_path"].rpartition(".")
        torch.manual_seed(int(seed or 0))
        encoder = getattr(importlib.import_module(module), name)(**cfg.get("init_args", {}))
    else:
        from omnissl.checkpoints import load_encoder

        encoder = load_encoder(spec)
    encoder.eval()

    def tower(audio, lengths):
        out = encoder(audio, lengths)
        return mean_pool(out.last, out.padding_mask, encoder.num_prefix)
    return tower


@torch.no_grad()
def factor_probe(spec: str, size: str = "small") -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from omnissl.datamodules.audio_text import AudioTextDataModule

    tower = load_tower(spec)
    dm = AudioTextDataModule(train="embedded:captions", embedded_size=size, max_samples=64000, batch_size=64,
                             num_workers=0)
    dm.setup("test")
    loader, classes, _, held = dm.zeroshot_data()
    feats, labels = [], []
    for b in loader:
        feats.append(tower(b.inputs["audio"], b.lengths.get("audio")).float())
        labels.append(b.targets["label"])
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    out: dict = {"encoder": spec, "chance": 1 / 3}
    factors = {k: factor_labels(c) for k, c in enumerate(classes)}
    train = [i for i, k in enumerate(y) if factors[k] and not held[k]]
    test = [i for i, k in enumerate(y) if factors[k] and held[k]]
    right = {}
    for f, name in ((0, "pitch"), (1, "sound")):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        clf.fit(x[train], [factors[y[i]][f] for i in train])
        right[name] = clf.predict(x[test]) == [factors[y[i]][f] for i in test]
        out[f"heldout_{name}_acc"] = float(right[name].mean())
    out["heldout_both_acc"] = float((right["pitch"] & right["sound"]).mean())
    out["num_train"], out["num_test"] = len(train), len(test)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--size", default="small")
    p.add_argument("--json", default=None, help="write every checkpoint's diagnosis to this file")
    p.add_argument("--factor-probe", action="store_true",
                   help="the arguments are audio towers (or random:<recipe>[:seed], logmel): probe their factors")
    a = p.parse_args(argv)
    if a.factor_probe:
        results = [factor_probe(spec, a.size) for spec in a.checkpoints]
        for r in results:
            print(f"{r['encoder']}: held-out combinations ({r['num_test']} clips; fit on {r['num_train']} seen): pitch "
                  f"{r['heldout_pitch_acc']:.3f}, sound {r['heldout_sound_acc']:.3f}, both {r['heldout_both_acc']:.3f} "
                  f"(chance 1/3, 1/9)")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    results = []
    for path in a.checkpoints:
        d = diagnose(path, a.size)
        results.append(d)
        print(path)
        for name, r in d["heldout"].items():
            print(f"  {name:24s} argmax winners {r['wins']}; among held-out {r['acc_among_heldout']:.2f}; analogy "
                  f"audio cos {r.get('audio_analogy_cos', float('nan')):.2f} rank {r.get('audio_analogy_rank', '-')}, "
                  f"text cos {r.get('text_analogy_cos', float('nan')):.2f} rank {r.get('text_analogy_rank', '-')}; "
                  f"cos(prompt, its audio mean) {r['prompt_vs_audio_mean']:.2f}")
        print(f"  seen classes: cos(prompt, its audio mean) {d['seen_prompt_vs_audio_mean']:.2f} (mean)")
    if len(results) > 1:
        print("mean over checkpoints:")
        for name in results[0]["heldout"]:
            rows = [r["heldout"][name] for r in results]
            avg = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
            first = lambda k: sum(r[k] == 0 for r in rows)  # noqa: E731
            print(f"  {name:24s} audio analogy cos {avg('audio_analogy_cos'):.2f} (ranked first {first('audio_analogy_rank')}"
                  f"/{len(rows)}), text analogy cos {avg('text_analogy_cos'):.2f} (first {first('text_analogy_rank')}/"
                  f"{len(rows)}); cos(prompt, its audio mean) {avg('prompt_vs_audio_mean'):.2f}")
        print(f"  seen: cos(prompt, its audio mean) {sum(r['seen_prompt_vs_audio_mean'] for r in results) / len(results):.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
