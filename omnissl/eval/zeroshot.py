"""Zero-shot classification and audio-text retrieval of a CLAP model (`omnissl zeroshot`,
omnissl/commands/zeroshot.py), and the CLAP package export (`omnissl export CLAP_CKPT DIR --heads`).

    model, tokenizer = load_clap(path)          # a CLAP checkpoint (weights only) or package
    results = evaluate(model, data)              # an AudioTextDataModule set up with the model's tokenizer
    write_report(results, out_dir, title=...)    # zeroshot.md + zeroshot_similarity.png

Retrieval follows LAION-CLAP's protocol with several captions per clip (`omnissl.ssl.clap.retrieval_metrics`);
zero-shot classification embeds one prompt per class ("This is a sound of {label}.", LAION-CLAP
`eval_zeroshot_classification.py`) and takes the most similar (cosine) for each clip.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import Tensor

from omnissl.checkpoints import read_checkpoint
from omnissl.eval.report import save_png
from omnissl.ssl.clap import CLAP, from_checkpoint, is_package, load_package, retrieval_metrics, zeroshot_accuracy

__all__ = ["load_clap", "export_clap", "evaluate", "class_auc", "write_report", "report_markdown"]


def load_clap(path: str | Path) -> tuple[CLAP, str | None]:
    """(CLAP in eval mode, the text tower's tokenizer JSON text or None) from a CLAP checkpoint or package."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no CLAP checkpoint or package at {path}")
    if path.is_dir():
        if not is_package(path):
            raise ValueError(f"{path} is not a CLAP package (clap.json missing); an audio tower alone cannot "
                             "classify by text: export the CLAP checkpoint with --heads")
        tok = path / "text" / "tokenizer.json"
        return load_package(path), tok.read_text(encoding="utf-8") if tok.is_file() else None
    ckpt = read_checkpoint(path)
    model = from_checkpoint(ckpt.encoder, ckpt.heads, ckpt.info)
    tok = ckpt.info.get("metadata", {}).get("text_tokenizer")
    return model, tok if isinstance(tok, str) else None


def export_clap(checkpoint: str | Path, out: str | Path, *, overwrite: bool = True) -> Path:
    """A CLAP checkpoint -> a CLAP package: the audio tower's package at `out` (loads as any encoder), the text
    tower's at `out/text` with its tokenizer, projections and logit scale as their heads, `out/clap.json`."""
    out = Path(out)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files")
    model, tok = load_clap(checkpoint)
    ckpt_step = read_checkpoint(checkpoint).global_step
    return model.save_package(out, tokenizer=tok, info={"checkpoint": str(checkpoint), "global_step": ckpt_step})


@torch.no_grad()
def _audio_embeddings(model: CLAP, loader, device) -> tuple[Tensor, Tensor, Tensor | None]:
    embs, ids, labels = [], [], []
    for batch in loader:
        lengths = batch.lengths.get("audio")
        a = model.embed_audio(batch.inputs["audio"].to(device), None if lengths is None else lengths.to(device))
        embs.append(torch.nn.functional.normalize(a.float(), dim=-1).cpu())
        ids.append(batch.ids)
        if "label" in batch.targets:
            labels.append(batch.targets["label"])
    return torch.cat(embs), torch.cat(ids), torch.cat(labels) if labels else None


def class_auc(scores: Tensor, labels: Tensor) -> dict[int, float]:
    """Per class c: the ROC AUC of the prompt score scores[:, c] separating the clips of class c from all other
    clips (P(score of a clip of c > score of another clip), ties counting 1/2; Mann-Whitney). Unlike accuracy it
    does not reward a model that puts every clip in one class: any score that ignores the audio gets 0.5."""
    out = {}
    for c in range(scores.shape[1]):
        pos, neg = scores[labels == c, c], scores[labels != c, c]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            out[c] = float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())
    return out


@torch.no_grad()
def evaluate(model: CLAP, data, *, split: str = "test", prompt: str | None = None, device: str = "cpu",
             examples: int = 8) -> dict:
    """Retrieval on `split` of `data` (an AudioTextDataModule after setup, every caption of each clip) and
    zero-shot classification on its zero-shot clips, when it has them.

    Returns {"retrieval": metrics, "num_clips", "num_captions", "zeroshot": metrics (accuracies, and the mean
    per-class ROC AUC `class_auc`: zeroshot_auc[_heldout|_seen]) | None, "per_class": [(class, held out?, n,
    accuracy)], "per_class_auc": {class: AUC}, "chance": 1 / classes, with held-out classes "chance_among_heldout":
    1 / held-out classes (the chance of `zeroshot_acc_heldout_among_heldout`) and "heldout_wins": {held-out class:
    {class winning the argmax over all classes: clips}}, "similarity": (E, E) cosines of the first E clips and their
    first captions, "example_captions": [str], "classes": [...]}."""
    model = model.to(device).eval()
    prompt = prompt or model.prompt
    out: dict = {"zeroshot": None, "per_class": [], "split": split}
    ds = data.dataset(split)
    if ds is not None:
        audio, ids, _ = _audio_embeddings(model, data.loader(split, shuffle=False), device)
        order = torch.argsort(ids)
        audio, ids = audio[order], ids[order]
        caps = data.eval_captions(split, ids.tolist())
        text = model.embed_texts([c.to(device) for cs in caps for c in cs]).cpu()
        out["retrieval"] = retrieval_metrics(audio, text, [len(cs) for cs in caps])
        out["num_clips"], out["num_captions"] = len(caps), sum(len(cs) for cs in caps)
        first = torch.tensor([0] + [len(cs) for cs in caps[:-1]]).cumsum(0)[:examples]
        out["similarity"] = (audio[:examples] @ text[first].t()).numpy()
        out["example_captions"] = [data.decode(caps[i][0].tolist()) for i in range(min(examples, len(caps)))]
    zs = data.zeroshot_data()
    if zs is not None:
        loader, classes, tokenize, heldout = zs
        cls = model.embed_texts([t.to(device) for t in tokenize([prompt.format(label=c) for c in classes])]).cpu()
        audio, _, labels = _audio_embeddings(model, loader, device)
        scores = audio @ cls.t()
        preds = scores.argmax(-1)
        out["zeroshot"] = zeroshot_accuracy(scores, labels, heldout)
        auc = class_auc(scores, labels)
        out["per_class_auc"] = {classes[c]: v for c, v in auc.items()}
        for name, want in (("", None), ("_heldout", True), ("_seen", False)):
            vals = [v for c, v in auc.items() if want is None or bool(heldout and heldout[c]) == want]
            if vals and (want is None or heldout):
                out["zeroshot"][f"zeroshot_auc{name}"] = sum(vals) / len(vals)
        out["classes"], out["chance"], out["prompt"] = list(classes), 1.0 / len(classes), prompt
        if heldout and any(heldout):
            out["chance_among_heldout"] = 1.0 / sum(bool(h) for h in heldout)
            # which class wins the argmax over all classes on each held-out class's clips
            out["heldout_wins"] = {classes[c]: {classes[int(k)]: int(n) for k, n in
                                                enumerate(torch.bincount(preds[labels == c], minlength=len(classes)))
                                                if n > 0}
                                   for c in range(len(classes)) if heldout[c] and bool((labels == c).any())}
        for c, name in enumerate(classes):
            sel = labels == c
            if bool(sel.any()):
                out["per_class"].append((name, bool(heldout[c]) if heldout else False, int(sel.sum()),
                                         float((preds[sel] == c).float().mean())))
    return out


def report_markdown(results: dict, *, title: str) -> str:
    lines = [f"# {title}", ""]
    if "retrieval" in results:
        r = results["retrieval"]
        lines += [f"Retrieval on split `{results['split']}`: {results['num_clips']} clips, {results['num_captions']} "
                  "captions (LAION-CLAP protocol: text->audio over every caption; audio->text by each clip's "
                  "best-ranked caption, mAP@10 over its captions).", "",
                  "| direction | R@1 | R@5 | R@10 | mAP@10 |", "|---|---|---|---|---|"]
        for d, name in (("a2t", "audio -> text"), ("t2a", "text -> audio")):
            lines.append(f"| {name} | {r[f'{d}_R@1']:.3f} | {r[f'{d}_R@5']:.3f} | {r[f'{d}_R@10']:.3f} | "
                         f"{r[f'{d}_mAP@10']:.3f} |")
        lines += ["", f"Chance R@1: {1 / max(results['num_clips'], 1):.3f} (text -> audio).", ""]
    z = results.get("zeroshot")
    if z is not None:
        lines += [f"Zero-shot classification, prompt `{results['prompt']}`, {len(results['classes'])} classes "
                  f"(chance {results['chance']:.3f}):", "", "| clips | accuracy |", "|---|---|"]
        for key, name in (("zeroshot_acc", "all"), ("zeroshot_acc_heldout", "held-out classes"),
                          ("zeroshot_acc_seen", "classes seen in training")):
            if key in z:
                lines.append(f"| {name} | {z[key]:.3f} |")
        if "zeroshot_acc_heldout_among_heldout" in z:
            lines += ["", "Classic zero-shot (the held-out clips, argmax over the held-out classes only, as when a "
                      f"dataset's whole label set is unseen; chance {results['chance_among_heldout']:.3f}): "
                      f"{z['zeroshot_acc_heldout_among_heldout']:.3f}. The table above is the generalized setting "
                      "(argmax over all classes, seen ones included)."]
        if results.get("heldout_wins"):
            lines += ["", "Winning class (argmax over all classes) on the clips of each held-out class: " + "; ".join(
                f"{c}: " + ", ".join(f"{k} {n}" for k, n in sorted(w.items(), key=lambda kv: -kv[1])[:3])
                for c, w in results["heldout_wins"].items())]
        if "zeroshot_auc" in z:
            lines += ["", "Per-class ROC AUC of the class prompt's score (its clips against all others; 0.5 for any "
                      "score that ignores the audio), mean: " + ", ".join(
                          f"{name} {z[key]:.3f}" for key, name in (("zeroshot_auc", "all"),
                                                                   ("zeroshot_auc_heldout", "held-out"),
                                                                   ("zeroshot_auc_seen", "seen")) if key in z)]
        lines += ["", "| class | held out | clips | accuracy |", "|---|---|---|---|"]
        lines += [f"| {c} | {'yes' if h else ''} | {n} | {a:.3f} |" for c, h, n, a in results["per_class"]]
        lines.append("")
    return "\n".join(lines)


def plot_similarity(results: dict, path: str | Path, *, title: str) -> Path:
    """PNG: cosine similarity of the first clips (rows) and their first captions (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = results["similarity"]
    caps = ["\n".join(textwrap.wrap(c, 38)) for c in results["example_captions"]]
    fig, ax = plt.subplots(figsize=(4 + 0.9 * len(caps), 2 + 0.9 * len(caps)))
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xticks(range(len(caps)))
    ax.set_xticklabels(caps, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(caps)))
    ax.set_yticklabels([f"clip {i}" for i in range(len(caps))], fontsize=7)
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if sim[i, j] < sim.max() * 0.7 else "black")
    ax.set_xlabel("caption")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def write_report(results: dict, out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write `zeroshot.md` (and `zeroshot_similarity.png` when there was retrieval) -> {"markdown", "plot"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    text = report_markdown(results, title=title)
    if "similarity" in results:
        paths["plot"] = plot_similarity(results, out / "zeroshot_similarity.png", title=title)
        text += f"\n![cosine similarity of clips and captions]({paths['plot'].name})\n"
    paths["markdown"] = out / "zeroshot.md"
    paths["markdown"].write_text(text, encoding="utf-8")
    return paths
