"""`omnissl zeroshot`: zero-shot classification and audio-text retrieval of a CLAP model (omnissl/eval/zeroshot.py).

    omnissl zeroshot CKPT_OR_PACKAGE [--data embedded:captions[:SIZE] | --captions MANIFEST]
                     [--zeroshot MANIFEST|none] [--prompt "This is a sound of {label}."] [--report DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from omnissl.commands import HelpFormatter, device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnissl zeroshot", formatter_class=HelpFormatter,
        description="Evaluate a CLAP model (a checkpoint of `omnissl fit` with the CLAP objective, or a package "
                    "exported from one with --heads): text<->audio retrieval with several captions per clip "
                    "(R@1/5/10, mAP@10, LAION-CLAP's protocol) and zero-shot classification by prompts of the class "
                    "names. With the embedded corpus, retrieval runs on its test split (held-out factor "
                    "combinations) and classification on its zero-shot clips (14 classes, 3 held out).",
    )  # fmt: skip
    p.add_argument("model", help="CLAP Lightning checkpoint (.ckpt, read weights-only) or CLAP package directory")
    p.add_argument("--data", default="embedded:captions",
                   help="embedded:captions[:SIZE] (its test split and zero-shot clips) or a caption manifest "
                        "(relpath<TAB>num_samples<TAB>caption; rows sharing a file are captions of one clip)")
    p.add_argument("--captions", default=None,
                   help="caption manifest to retrieve on (none: the embedded corpus's test split, or --data itself)")
    p.add_argument("--zeroshot", default=None,
                   help="labeled audio manifest (relpath<TAB>num_samples<TAB>label) to classify, or 'none' (none: "
                        "the embedded corpus's zero-shot clips)")
    p.add_argument("--prompt", default=None, help="zero-shot template with {label} (none: the model's)")
    p.add_argument("--max-samples", type=int, default=160_000, help="audio window per clip (centred), in samples")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    p.add_argument("--report", default=None, help="write zeroshot.md and zeroshot_similarity.png into this folder")
    p.add_argument("--device", default=None, help="none: cuda when available, else cpu")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.prompt is not None and "{label}" not in a.prompt:
        p.error(f"--prompt must contain {{label}}, got {a.prompt!r}")
    if a.batch_size < 1 or a.max_samples < 1:
        p.error("--batch-size and --max-samples must be positive")

    from omnissl.datamodules.audio_text import AudioTextDataModule
    from omnissl.datamodules.common import is_embedded
    from omnissl.eval.zeroshot import evaluate, load_clap, write_report

    try:
        model, tokenizer = load_clap(a.model)
        if tokenizer is None:
            raise ValueError(f"{a.model} carries no tokenizer for its text tower")
        with tempfile.TemporaryDirectory() as tmp:
            tok = Path(tmp) / "tokenizer.json"
            tok.write_text(tokenizer, encoding="utf-8")
            embedded = is_embedded(a.data)
            size = a.data.split(":")[2] if embedded and a.data.count(":") == 2 else "small"
            train = "embedded:captions" if embedded else a.data
            captions = a.captions or (None if embedded else a.data)
            dm = AudioTextDataModule(train=train, valid=captions if not embedded else None, test=captions,
                                     zeroshot=a.zeroshot, embedded_size=size, tokenizer=str(tok),
                                     max_samples=a.max_samples, batch_size=a.batch_size, num_workers=0)
            dm.setup("test")
            results = evaluate(model, dm, split="test" if dm.dataset("test") is not None else "valid",
                               prompt=a.prompt, device=device(a.device))
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"omnissl zeroshot: error: {e}\n")
    flat = {**results.get("retrieval", {}), **(results.get("zeroshot") or {})}
    if "chance" in results:
        flat["zeroshot_chance"] = results["chance"]
    if "chance_among_heldout" in results:
        flat["zeroshot_chance_among_heldout"] = results["chance_among_heldout"]
    if a.json:
        print(json.dumps(flat))
    else:
        for k, v in flat.items():
            print(f"{k:24s} {v:.4f}")
    if a.report:
        paths = write_report(results, a.report, title=f"CLAP zero-shot and retrieval: {a.model}")
        print(f"report: {paths['markdown']}")
    print("RESULT name=zeroshot " + " ".join(f"{k.replace('@', '_at_')}={v:.4f}" for k, v in flat.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
