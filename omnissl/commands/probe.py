"""`omnissl probe`: SUPERB-style probe of a frozen encoder (package or checkpoint) from the command line.

    omnissl probe ENCODER --train embedded:keywords:small --valid ... --test ... [--report DIR [--wandb]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _describe(result) -> str:
    what = "accuracy" if result.metric == "accuracy" else "CER"
    extra = "".join(f", {k.upper()} {v:.4f}" for k, v in result.extra.items())
    valid = "" if result.valid is None else f", valid {result.valid:.4f}"
    return f"test {what} {result.test:.4f}{extra}{valid}, epoch {result.best_epoch}"


def main(argv: list[str] | None = None) -> int:
    import torch

    from omnissl.checkpoints import load_encoder, read_tokenizer
    from omnissl.commands import HelpFormatter
    from omnissl.datamodules.audio_io import AudioDataError
    from omnissl.eval.probe import run_probe
    from omnissl.eval.probe_data import load_probe_data, source_modality
    from omnissl.eval.report import log_report, write_report
    from omnissl.eval.tfidf import tfidf_baseline
    from omnissl.eval.upstream import EncoderStates, baseline_states, reinitialized
    from omnissl.progress import set_quiet
    from omnissl.train.loggers import wandb_mode

    parser = argparse.ArgumentParser(
        prog="omnissl probe", formatter_class=HelpFormatter,
        description="SUPERB-style probe of a frozen encoder (a package from omnissl export, or a checkpoint): all hidden "
                    "states, learned softmax layer weights, a small head trained on cached features. Prints the "
                    "test accuracy (classify) or CER (ctc) last.")
    parser.add_argument("encoder", help="encoder package directory (config.json + model.safetensors) or a "
                        "Lightning checkpoint of any objective (read weights-only)")
    parser.add_argument("--train", required=True, help="labeled manifest, folder, .jsonl, or embedded:... spec")
    parser.add_argument("--test", required=True, help="held-out split reported at the end")
    parser.add_argument("--valid", default=None, help="split that selects the epoch (none: the last epoch is kept)")
    parser.add_argument("--task", choices=["classify", "ctc"], default="classify",
                        help="utterance classification (mean pooling) or character CTC (speech + .ltr/.wrd)")
    parser.add_argument("--head", choices=["linear", "mlp", "lstm"], default=None,
                        help="classify: linear or mlp; ctc: linear or lstm (BiLSTM; GPU); none: linear")
    parser.add_argument("--layer", type=int, default=None,
                        help="probe one fixed hidden state (0 = trunk input); none: the learned weighted sum")
    parser.add_argument("--layer-norm", action="store_true", help="s3prl's per-frame LayerNorm of every state")
    parser.add_argument("--report", type=Path, default=None,
                        help="write probe.md and probe_layers.png here (adds one probe per layer)")
    parser.add_argument("--random-init", action="store_true",
                        help="also probe the same architecture re-initialized (seed --seed)")
    parser.add_argument("--baseline", action="store_true",
                        help="also probe the non-learned baseline (log-mel; text: TF-IDF + logistic regression; raw pixels)")
    parser.add_argument("--wandb", action="store_true",
                        help="log the report to a new W&B run (offline without credentials or with WANDB_MODE=offline; "
                             "skipped with WANDB_MODE=disabled)")
    parser.add_argument("--epochs", type=int, default=None, help="head training epochs (none: classify 60, ctc 40)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (none: classify 1e-2, ctc 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per extraction batch")
    parser.add_argument("--seed", type=int, default=0, help="head initialization, mini-batch order, --random-init")
    parser.add_argument("--device", default=None, help="none: cuda when available, else cpu")
    parser.add_argument("--tokenizer", default=None,
                        help="text: the pretraining tokenizer (none: the package's tokenizer.json or the "
                             "checkpoint's tokenizer)")
    parser.add_argument("--image-size", type=int, default=224, help="images: resize/crop size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    if args.wandb and args.report is None:
        parser.error("--wandb logs the report: add --report DIR")
    valid_heads = {"classify": ("linear", "mlp"), "ctc": ("linear", "lstm")}[args.task]
    if args.head is not None and args.head not in valid_heads:
        parser.error(f"--head {args.head} does not fit --task {args.task} (choose {' or '.join(valid_heads)})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder = load_encoder(args.encoder).to(device)
        tokenizer = args.tokenizer
        if tokenizer is None and source_modality(args.train) == "text":
            if (Path(args.encoder) / "tokenizer.json").is_file():
                tokenizer = str(Path(args.encoder) / "tokenizer.json")
            elif (text := read_tokenizer(args.encoder)) is not None:  # a checkpoint carries its run's tokenizer
                tokenizer = str(Path(tempfile.mkdtemp(prefix="omnissl-probe-")) / "tokenizer.json")
                Path(tokenizer).write_text(text, encoding="utf-8")
            else:
                raise ValueError(f"probing a text encoder needs its pretraining tokenizer: pass --tokenizer, or "
                                 f"export the checkpoint of a text run (its package holds tokenizer.json); "
                                 f"{args.encoder} carries none")
        data = load_probe_data(args.train, args.test, args.valid, task=args.task, batch_size=args.batch_size,
                               tokenizer=tokenizer, image_size=args.image_size)
        if data.modality == "text" and data.vocab_size > encoder.frontend.embed.num_embeddings:
            raise ValueError(f"the tokenizer has {data.vocab_size} tokens but the encoder embeds only "
                             f"{encoder.frontend.embed.num_embeddings}: not its pretraining tokenizer")
        print(f"probing {args.encoder}: {data.modality}, {encoder.num_layers + 1} hidden states of width "
              f"{encoder.dim}, {encoder.samples_per_token or '-'} samples per frame; task {args.task}; "
              f"train {data.sources['train']}, test {data.sources['test']}", flush=True)
        upstreams = [("pretrained", encoder)]
        if args.random_init:
            upstreams.append(("random init", reinitialized(encoder, args.seed).to(device)))
        opts = dict(task=args.task, head=args.head, layer=args.layer, layer_norm=args.layer_norm,
                    per_layer=args.report is not None, epochs=args.epochs, lr=args.lr, seed=args.seed, device=device)
        rows = []
        for name, enc in upstreams:
            rows.append(run_probe(EncoderStates(enc), data, name, **opts))
            print(f"{name}: {_describe(rows[-1].result)}; layer weights "
                  + " ".join(f"{w:.3f}" for w in rows[-1].result.layer_weights), flush=True)
        if args.baseline and data.modality == "text":  # TF-IDF + logistic regression (omnissl/eval/tfidf.py)
            rows.append(tfidf_baseline(data))
            print(f"{rows[-1].name}: {_describe(rows[-1].result)}", flush=True)
        elif args.baseline:
            base = baseline_states(data.modality, vocab_size=data.vocab_size)
            name = {"audio": "log-mel baseline", "image": "pixel baseline"}
            rows.append(run_probe(base, data, name[data.modality], **{**opts, "layer": None}))
            print(f"{rows[-1].name}: {_describe(rows[-1].result)}", flush=True)
    except (ValueError, FileNotFoundError, AudioDataError) as e:
        parser.exit(2, f"omnissl probe: error: {e}\n")
    if args.report is not None:
        title = f"{args.task} probe of {args.encoder} on {data.sources['train']} (test {data.sources['test']})"
        paths = write_report(rows, args.report, title=title)
        print(f"report: {paths['markdown']} {paths['plot']}", flush=True)
        mode = wandb_mode() if args.wandb else "disabled"
        if args.wandb and mode == "disabled":
            print("WANDB_MODE=disabled: not logging the report to W&B", flush=True)
        elif args.wandb:
            import wandb

            run = wandb.init(project="omnissl", job_type="probe", dir=str(args.report), mode=mode,
                             config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
            log_report(rows, paths, run)
            run.finish()
    main_result = rows[0].result
    what = "accuracy" if main_result.metric == "accuracy" else "CER"
    print(f"test {what}: {main_result.test:.4f}", file=sys.stdout, flush=True)
    return 0
