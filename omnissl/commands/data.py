"""`omnissl data ...`: generate the embedded corpora, write and inspect manifests.

    omnissl data generate {speech,keywords,speakers,captions,text,images,labeled_text,labeled_images}
                          --size {tiny,small,default} --out DIR [--seed N]
    omnissl data manifest FOLDER --out FILE [--on-error {raise,skip}]
    omnissl data inspect MANIFEST [--on-error {raise,skip}] [--png FILE] [--workers N]
    omnissl data tokenizer --corpus PATH|embedded:text --kind {bpe,wordpiece} --vocab-size N --out DIR
    omnissl data shard MANIFEST_OR_FOLDER --out DIR_OR_URI [--kind {audio,text,image,labeled_text}]
                       [--docs {line,blank}] [--units EXT] [--audio-format {pcm,flac}] [--chunk-bytes 64MB]
                       [--workers N] [--on-error {raise,skip}]

omnissl/cli.py dispatches `omnissl data <argv>` to `main(argv)`; the return value is the exit status.
The corpora are the registry `omnissl.datamodules.corpora.CORPORA` (the names `embedded:<name>` specs take).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omnissl.commands import HelpFormatter
from omnissl.datamodules.corpora import CORPORA

def parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="omnissl data", description="Embedded corpora and manifests.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an embedded corpus (nothing is downloaded)", formatter_class=fmt)
    g.add_argument("kind", choices=list(CORPORA), help="which corpus (keywords, speakers: labeled speech tasks)")
    g.add_argument("--size", choices=["tiny", "small", "default"], default="small",
                   help="tiny: for tests; small: minutes of data; default: the full embedded corpus")  # fmt: skip
    g.add_argument("--out", type=Path, required=True, help="output folder (manifests + files)")
    g.add_argument("--seed", type=int, default=0, help="generation seed")

    m = sub.add_parser("manifest", help="scan a folder of audio files into a fairseq-style manifest",
                       formatter_class=fmt)
    m.add_argument("folder", type=Path, help="folder scanned recursively for audio files")
    m.add_argument("--out", type=Path, required=True, help="manifest file to write (.tsv)")
    m.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="raise: stop at the first unreadable file; skip: leave it out (logged)")
    m.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")

    i = sub.add_parser("inspect", help="decode every item of an audio manifest (or folder) and report",
                       formatter_class=fmt)
    i.add_argument("manifest", type=Path, help="manifest (.tsv) or folder of audio files")
    i.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="raise: exit 1 at the first bad item; skip: list them all, exit 0")  # fmt: skip
    i.add_argument("--png", type=Path, default=None, help="save a duration histogram here (needs matplotlib)")
    i.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for decoding")
    t = sub.add_parser("tokenizer", help="train a subword tokenizer (HF tokenizers) -> DIR/tokenizer.json",
                       formatter_class=fmt)
    t.add_argument("--corpus", required=True, help="folder of .txt files, .tsv manifest, text file, or embedded:text")
    t.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                   help="byte-level BPE (RoBERTa) or WordPiece (BERT)")
    t.add_argument("--vocab-size", type=int, default=32_768, help="tokens before padding to a multiple of 64")
    t.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    t.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="none: no for bpe, yes for wordpiece")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--embedded-size", choices=["tiny", "small", "default"], default="small",
                   help="size of embedded:text")
    t.add_argument("--seed", type=int, default=0, help="seed of embedded:text")
    t.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="what to do with files that are not UTF-8")
    s = sub.add_parser("shard", help="write a manifest, folder or text corpus as litdata shards (streamed training)",
                       formatter_class=fmt)
    s.add_argument("source", help="audio/image manifest (.tsv) or folder; a text file, folder of .txt or manifest of "
                                  "them; or embedded:<corpus>[:<size>] (its train split)")
    s.add_argument("--out", required=True, help="output folder or object-store URI (s3://..., gs://...)")
    s.add_argument("--kind", choices=["audio", "text", "image", "labeled_text"], default=None,
                   help="default: from the files (labeled_text: a .jsonl, or a manifest of .txt with labels)")
    s.add_argument("--docs", choices=["line", "blank"], default="line",
                   help="text documents: one per line, or separated by blank lines")
    s.add_argument("--units", default=None, help="audio: also store HuBERT units from <manifest stem>.<EXT>")
    s.add_argument("--audio-format", choices=["pcm", "flac"], default="pcm",
                   help="audio: 16-bit PCM in zstd chunks (fast to read) or 16-bit FLAC (smallest)")
    s.add_argument("--chunk-bytes", default="64MB", help="target size of one chunk file")
    s.add_argument("--workers", type=int, default=1, help="encoding processes")
    s.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="raise: stop at the first bad item, naming it; skip: leave it out (counted, listed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.command == "generate":
        try:
            return _generate(args)
        except (ValueError, FileExistsError, OSError) as e:
            p.exit(2, f"omnissl data generate: error: {e}\n")
    if args.command == "manifest":
        return _manifest(args)
    if args.command == "shard":
        return _shard(args)
    if args.command == "tokenizer":
        try:
            return _tokenizer(args)
        except (ValueError, FileNotFoundError) as e:
            p.exit(2, f"omnissl data tokenizer: error: {e}\n")
    return _inspect(args)


def _tokenizer(args: argparse.Namespace) -> int:
    from omnissl.datamodules.common import is_embedded
    from omnissl.datamodules.corpora import embedded_corpus
    from omnissl.datamodules.documents import ReadStats, list_documents, read_documents
    from omnissl.datamodules.tokenizers import tokenizer_info, train_tokenizer

    corpus = args.corpus
    if is_embedded(corpus):
        corpus = embedded_corpus(corpus, size=args.embedded_size, seed=args.seed)["train"]
    stats = ReadStats()
    texts = read_documents(list_documents(corpus), on_error=args.on_error, stats=stats, progress="training tokenizer")
    tok = train_tokenizer(texts, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          lowercase=args.lowercase)
    if stats.files - stats.empty - len(stats.skipped) == 0:
        raise ValueError(f"no documents in {args.corpus}: {stats.describe()}")
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    info = tokenizer_info(tok)
    print(f"wrote {args.out / 'tokenizer.json'}: {info.kind}, {info.num_tokens} tokens (padded vocab_size "
          f"{info.vocab_size}), pad_id={info.pad_id} mask_id={info.mask_id} special_ids={info.special_ids}; "
          f"{stats.describe()}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from omnissl.datamodules.audio_io import AudioDataError
    from omnissl.datamodules.common import is_embedded
    from omnissl.datamodules.corpora import embedded_corpus
    from omnissl.datamodules.labeled import write_labeled_text_shards
    from omnissl.datamodules.shards import ShardDataError, guess_kind, write_shards

    t0 = time.perf_counter()
    source = args.source
    try:
        if is_embedded(source):
            source = embedded_corpus(source, size="small")["train"]
        if (args.kind or guess_kind(Path(source))) == "labeled_text":
            meta = write_labeled_text_shards(source, args.out, on_error=args.on_error, chunk_bytes=args.chunk_bytes,
                                             num_workers=args.workers)
        else:
            meta = write_shards(source, args.out, kind=args.kind, docs=args.docs, units=args.units,
                                on_error=args.on_error, chunk_bytes=args.chunk_bytes, num_workers=args.workers,
                                audio_format=args.audio_format)
    except (AudioDataError, ShardDataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"omnissl data shard: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {meta['count']} {meta['kind']} items of {source} to {args.out} in {time.perf_counter() - t0:.1f} s; "
          f"skipped {len(meta['skipped'])}")
    for where, why in list(meta["skipped"].items())[:20]:
        print(f"skipped: {where}: {why}")
    print(f"train on them with  train: shards:{args.out}")
    return 0 if meta["count"] else 1


def _generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    paths = CORPORA[args.kind].generate(args.out, size=args.size, seed=args.seed).values()
    print(f"generated {args.kind} ({args.size}, seed {args.seed}) in {time.perf_counter() - t0:.1f} s:")
    for p in paths:
        print(f"  {p}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from omnissl.datamodules.audio_io import AudioDataError, write_audio_manifest
    from omnissl.progress import set_quiet

    set_quiet(args.quiet)
    if not args.folder.is_dir():
        print(f"omnissl data manifest: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        n = write_audio_manifest(args.folder, args.out, on_error=args.on_error)
    except AudioDataError as e:
        print(f"omnissl data manifest: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {n} audio files under {args.folder.resolve()}")
    return 0 if n else 1


def _identity(item: dict) -> dict:
    return item


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from omnissl.batch import SAMPLE_RATE
    from omnissl.datamodules.audio import AudioDataset
    from omnissl.datamodules.audio_io import AudioDataError, read_audio_manifest

    try:
        manifest = read_audio_manifest(args.manifest, on_error=args.on_error)
    except (AudioDataError, FileNotFoundError) as e:
        print(f"omnissl data inspect: error: {e}", file=sys.stderr)
        return 1
    ds = AudioDataset(manifest, max_samples=None, min_samples=0, crop="center", on_error="skip")
    loader = DataLoader(ds, batch_size=None, num_workers=args.workers, collate_fn=_identity)
    durations, bad = [], list(manifest.skipped)  # lines or files already left out while reading (skip)
    for item in tqdm(loader, total=len(ds), desc="decoding", unit="file", file=sys.stderr):
        if "error" in item:
            bad.append(item["error"])
            if args.on_error == "raise":
                print(f"omnissl data inspect: error: bad item: {item['error']}", file=sys.stderr)
                return 1
            continue
        durations.append(len(item["audio"]) / SAMPLE_RATE)
    d = np.asarray(durations)
    print(f"manifest: {manifest.source}")
    print(f"items: {len(manifest) + len(manifest.skipped)}  decoded: {len(d)}  bad: {len(bad)}")
    if len(d):
        print(f"total: {d.sum() / 3600:.3f} h  duration (s): min {d.min():.2f}  mean {d.mean():.2f}  "
              f"median {np.median(d):.2f}  max {d.max():.2f}")  # fmt: skip
        edges = np.array([0, 1, 2, 4, 8, 16, 32, np.inf])
        counts, _ = np.histogram(d, edges)
        print("histogram (s): " + "  ".join(f"[{lo:g},{hi:g}): {c}" for lo, hi, c in zip(edges, edges[1:], counts)))
    if manifest.labels is not None:
        labels, counts = np.unique(manifest.labels, return_counts=True)
        print(f"labels: {len(labels)}  " + "  ".join(f"{lab}={c}" for lab, c in zip(labels, counts)))
    for msg in bad:
        print(f"skipped: {msg}")
    if args.png is not None and len(d):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("omnissl data inspect: error: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(d, bins=50)
        ax.set_xlabel("duration (s)")
        ax.set_ylabel("utterances")
        ax.set_title(f"{Path(manifest.source).name}: {len(d)} items, {d.sum() / 3600:.2f} h")
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=100)
        plt.close(fig)
        print(f"histogram: {args.png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
