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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--size", default="small")
    p.add_argument("--json", default=None, help="write every checkpoint's diagnosis to this file")
    a = p.parse_args(argv)
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
