"""`TextDataModule`: a text corpus, a trained subword tokenizer, a pre-tokenized memmap, packed blocks.

Pipeline (RoBERTa pretraining data, fairseq `examples/roberta`):
1. Documents: a corpus is a folder (every `*.txt` below it, sorted; one document per file), a manifest
   (`.tsv`: root line, then `relpath[<TAB>...]`), a single text file (one document), or `"embedded:text"`
   (the standard library's docstrings, generated into `$OMNISSL_DATA` on first use; see
   `omnissl.datamodules.common`). Files must be UTF-8: by default an undecodable file stops preparation with
   an error naming it; `on_error="skip"` leaves such files out and reports how many. Blank documents are
   dropped; if nothing is left, `setup()` fails saying why.
2. Tokenizer: a byte-level BPE (RoBERTa: specials `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3 `<mask>`=4) or a
   WordPiece (BERT: `[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4, lowercased) trained with HF
   `tokenizers` on the train documents, or a given `tokenizer.json`. `vocab_size` is padded up to a multiple
   of 64 (tensor-core friendly, as MosaicBERT); rows past the tokenizer's own size are never produced.
3. Pre-tokenization, once per (documents, tokenizer): token ids of all documents, without specials, in one
   flat memmap (`tokens.bin`, uint16 when the vocabulary fits, else uint32) plus document boundaries
   (`offsets.npy`, int64 (num_docs + 1,)). The cache folder is keyed by the files' (path, size, mtime) and
   the tokenizer file's hash, so one corpus costs one pass however many runs read it (no per-run cache
   blow-up as with `datasets`, transformers#10204).
4. Items: the token stream is read as the documents each followed by `</s>`. With `packing=True` it is cut
   into blocks of at most `block_size` tokens, each opened by `<s>` (fairseq `TokenBlockDataset` +
   `PrependTokenDataset`): `break_mode="complete"` (RoBERTa's `sample_break_mode: complete`) packs whole
   documents and lets a block span several documents, separated by `</s>`; `break_mode="none"` cuts at
   exactly `block_size` (HF `group_texts`). With `packing=False` each document is its own padded item.
   A document longer than a block is cut into block-sized pieces.

Items are {"id", "text": (N,) int64}; `Collate(text_pad_id=pad_id)` pads them into a `Batch` with
`inputs["text"]` (B, N) and `lengths["text"]` (B,).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (check_on_error, check_size, data_root, embedded_corpus, file_fingerprint,
                                        file_sha1, holdout, is_embedded, read_manifest, split_loader)

KINDS = ("bpe", "wordpiece")
# role -> token; both layouts put the five specials at ids 0..4 (RoBERTa's and BERT's orders)
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bpe": {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"},
}
VOCAB_MULTIPLE = 64
CACHE_VERSION = 1
BREAK_MODES = ("complete", "none")


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


# -------------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """Special ids and sizes of a tokenizer. `vocab_size` is padded to a multiple of 64; `num_tokens` is the
    tokenizer's own size (ids >= num_tokens never occur). `special_ids` are the ids a corruption must never
    draw as random replacements (fairseq zeroes their weights)."""

    kind: str
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    mask_id: int
    vocab_size: int
    num_tokens: int

    @property
    def special_ids(self) -> list[int]:
        return sorted({self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id})


def kind_info(kind: str, vocab_size: int) -> TokenizerInfo:
    """The TokenizerInfo a tokenizer of `kind` trained with `vocab_size` will have (known before training)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer_kind must be one of {KINDS}, got {kind!r}")
    minimum = 256 + len(SPECIAL_TOKENS[kind]) if kind == "bpe" else 2 * VOCAB_MULTIPLE
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for {kind} (byte-level BPE starts from 256 bytes "
                         f"plus 5 specials), got {vocab_size}")
    ids = {role: i for i, role in enumerate(SPECIAL_TOKENS[kind])}
    return TokenizerInfo(kind, ids["pad"], ids["bos"], ids["eos"], ids["unk"], ids["mask"],
                         round_up(vocab_size), vocab_size)


def tokenizer_info(tok) -> TokenizerInfo:
    """Read the special ids of a trained `tokenizers.Tokenizer` (either layout)."""
    for kind, roles in SPECIAL_TOKENS.items():
        ids = {role: tok.token_to_id(token) for role, token in roles.items()}
        if all(i is not None for i in ids.values()):
            n = tok.get_vocab_size()
            return TokenizerInfo(kind, ids["pad"], ids["bos"], ids["eos"], ids["unk"], ids["mask"], round_up(n), n)
    raise ValueError("the tokenizer has neither RoBERTa's special tokens (<s> <pad> </s> <unk> <mask>) "
                     "nor BERT's ([PAD] [UNK] [CLS] [SEP] [MASK])")


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))


def train_tokenizer(texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 32_768, min_frequency: int = 2,
                    lowercase: bool | None = None):
    """Train a `tokenizers.Tokenizer` of `kind` on `texts`; specials at ids 0..4 (see SPECIAL_TOKENS).

    bpe: byte-level BPE as RoBERTa/GPT-2 (no normalization, lossless decoding); wordpiece: BERT's
    normalizer (lowercased and accents stripped unless `lowercase=False`) and pre-tokenizer. Encoding with
    specials gives `<s> x </s>` / `[CLS] x [SEP]`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    kind_info(kind, vocab_size)  # validates
    specials = list(SPECIAL_TOKENS[kind].values())
    roles = SPECIAL_TOKENS[kind]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        lower = True if lowercase is None else lowercase
        tok = Tokenizer(models.WordPiece(unk_token=roles["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lower, strip_accents=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        # BERT's limit of 1 000 initial characters (rarer ones become [UNK]), capped so that the alphabet
        # cannot push the vocabulary past vocab_size
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, limit_alphabet=min(1000, vocab_size // 2),
                                            show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = roles["bos"], roles["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    info = tokenizer_info(tok)
    expected = kind_info(kind, vocab_size)
    assert (info.pad_id, info.mask_id) == (expected.pad_id, expected.mask_id), info
    return tok


# -------------------------------------------------------------------------------------------------- documents


def list_documents(corpus: str | os.PathLike) -> list[Path]:
    """The document files of a corpus path: a folder (`*.txt` below it), a `.tsv` manifest, or one file."""
    path = Path(corpus)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    if path.suffix == ".tsv":
        root, rows = read_manifest(path)
        return [root / row[0] for row in rows]
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"text corpus {corpus} does not exist (expected a folder of .txt files, a .tsv "
                            f"manifest, a text file, or 'embedded:text')")


@dataclass
class ReadStats:
    """What reading a list of document files found."""

    files: int = 0
    empty: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason (on_error="skip")

    def describe(self) -> str:
        return f"{self.files} files read, {self.empty} blank, {len(self.skipped)} skipped as undecodable"


def decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8 or pass "
                         f"on_error='skip' to leave such files out") from None


def read_documents(files: Sequence[Path], *, on_error: str = "raise", stats: ReadStats | None = None,
                   progress: str | None = None) -> Iterator[str]:
    """Yield the text of each non-blank document file; undecodable ones raise or are counted in `stats`."""
    check_on_error(on_error)
    stats = stats if stats is not None else ReadStats()
    for path in tqdm(files, desc=progress, unit="doc", disable=progress is None, mininterval=1.0):
        stats.files += 1
        try:
            text = decode_utf8(path, Path(path).read_bytes())
        except (ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(str(e) if isinstance(e, ValueError) else f"{path}: cannot read: {e}") from None
            stats.skipped[str(path)] = str(e)
            continue
        if not text.strip():
            stats.empty += 1
            continue
        yield text


# ------------------------------------------------------------------------------------------ pre-tokenization


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    try:
        if final.exists():  # a concurrent writer finished the same key first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def pretokenize(files: Sequence[Path], tokenizer_file: Path, out: Path, *, on_error: str = "raise",
                batch_docs: int = 1024, progress: bool = True) -> dict:
    """Tokenize every document once into `out/` (tokens.bin, offsets.npy, meta.json) -> meta.

    Ids are stored without specials; `offsets[i]:offsets[i+1]` are document i's tokens.
    """
    out = Path(out)
    if (out / "meta.json").is_file():
        return json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(tokenizer_file)
    tok.no_padding()
    tok.no_truncation()
    info = tokenizer_info(tok)
    dtype = token_dtype(info.vocab_size)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets needed: faster when available
    tmp = _atomic_dir(out)
    stats = ReadStats()
    offsets = [0]
    n_bytes = 0

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in read_documents(files, on_error=on_error, stats=stats,
                                   progress="pre-tokenizing" if progress else None):
            batch.append(text)
            if len(batch) >= batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    def write(f, encodings) -> None:
        for enc in encodings:
            ids = np.asarray(enc.ids, dtype=dtype)
            f.write(ids.tobytes())
            offsets.append(offsets[-1] + len(ids))

    try:  # encoding (Rust, GIL released) runs in a thread while the next batch of files is read
        with open(tmp / "tokens.bin", "wb") as f, ThreadPoolExecutor(1) as pool:
            pending = None
            for batch in batches():
                n_bytes += sum(len(t.encode("utf-8")) for t in batch)
                job = pool.submit(encode, batch, add_special_tokens=False)
                if pending is not None:
                    write(f, pending.result())
                pending = job
            if pending is not None:
                write(f, pending.result())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    meta = {"version": CACHE_VERSION, "dtype": dtype.name, "num_docs": len(offsets) - 1, "num_tokens": offsets[-1],
            "num_bytes": n_bytes, "files": stats.files, "empty": stats.empty, "skipped": stats.skipped,
            "tokenizer": str(tokenizer_file), "kind": info.kind}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _publish(tmp, out)
    return json.loads((out / "meta.json").read_text())


# -------------------------------------------------------------------------------------------------- blocks


def stream_starts(offsets: np.ndarray) -> np.ndarray:
    """Start of each document in the stream "doc0 </s> doc1 </s> ...": offsets[:-1] + doc index."""
    return offsets[:-1] + np.arange(len(offsets) - 1, dtype=np.int64)


def block_ranges(lengths: np.ndarray, block_size: int, *, packing: bool = True,
                 break_mode: str = "complete") -> np.ndarray:
    """Item ranges (M, 2) int64 [start, end) in the stream of documents each followed by `</s>`.

    Each item holds at most `block_size - 1` stream tokens (one place is left for the leading `<s>`).
    complete: whole documents, greedily packed, a block may span documents; a document longer than a block
    is cut into full pieces and its remainder packed like a document. none: cut every block_size - 1 tokens.
    packing=False: one item per document (long documents cut into pieces).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    if break_mode not in BREAK_MODES:
        raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
    cap = block_size - 1
    units = lengths.astype(np.int64) + 1  # each document with its </s>
    ends = np.cumsum(units)
    starts = ends - units
    total = int(ends[-1]) if len(ends) else 0
    if not packing or break_mode == "none":
        if packing:
            s = np.arange(0, total, cap, dtype=np.int64)
            return np.stack([s, np.minimum(s + cap, total)], axis=1)
        pieces = -(-units // cap)
        doc = np.repeat(np.arange(len(units)), pieces)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        s = starts[doc] + k * cap
        return np.stack([s, np.minimum(s + cap, ends[doc])], axis=1)
    out: list[tuple[int, int]] = []
    cur_start, cur_len = 0, 0
    for s, u in zip(starts.tolist(), units.tolist()):
        if cur_len + u <= cap:
            if cur_len == 0:
                cur_start = s
            cur_len += u
            continue
        if cur_len:
            out.append((cur_start, cur_start + cur_len))
        p = s
        while u - (p - s) > cap:  # pieces of an over-long document
            out.append((p, p + cap))
            p += cap
        cur_start, cur_len = p, s + u - p
    if cur_len:
        out.append((cur_start, cur_start + cur_len))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


class TokenBlockDataset(Dataset):
    """Items `<s>` + stream[start:end) read from a pre-tokenized cache: {"id", "text": (N,) int64}."""

    def __init__(self, cache: Path, ranges: np.ndarray, *, bos_id: int, eos_id: int) -> None:
        meta = json.loads((Path(cache) / "meta.json").read_text())
        self.cache, self.ranges = Path(cache), ranges
        self.bos_id, self.eos_id = bos_id, eos_id
        self.dtype, self.num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        offsets = np.load(self.cache / "offsets.npy")
        self.doc_starts = stream_starts(offsets)
        self.doc_lengths = np.diff(offsets)
        self._tokens: np.ndarray | None = None  # opened lazily in each worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = (np.memmap(self.cache / "tokens.bin", dtype=self.dtype, mode="r")
                            if self.num_tokens else np.zeros(0, self.dtype))
        return self._tokens

    def __len__(self) -> int:
        return len(self.ranges)

    def stream(self, start: int, end: int) -> np.ndarray:
        """stream[start:end) as int64, with `</s>` after every document."""
        d0 = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        d1 = int(np.searchsorted(self.doc_starts, end - 1, side="right")) - 1
        eos = self.doc_starts[d0:d1 + 1] + self.doc_lengths[d0:d1 + 1]
        eos = eos[(eos >= start) & (eos < end)] - start
        out = np.full(end - start, self.eos_id, dtype=np.int64)
        keep = np.ones(end - start, dtype=bool)
        keep[eos] = False
        real = start - d0  # tokens before `start`, less the </s> of the d0 earlier documents
        out[keep] = self.tokens[real:real + int(keep.sum())]
        return out

    def __getitem__(self, i: int) -> dict:
        start, end = (int(x) for x in self.ranges[i])
        ids = np.concatenate([np.array([self.bos_id], dtype=np.int64), self.stream(start, end)])
        return {"id": i, "text": torch.from_numpy(ids)}


# ---------------------------------------------------------------------------------------------- DataModule


def _key(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_tokenizer(tokenizer: str | None, *, train_files: Sequence[Path], kind: str, vocab_size: int,
                      min_frequency: int, lowercase: bool | None, on_error: str, cache_dir: Path,
                      progress: bool = True) -> Path:
    """The given tokenizer file, or one trained on `train_files` (cached by their fingerprint and the args)."""
    if tokenizer is not None:
        path = Path(tokenizer)
        return path / "tokenizer.json" if path.is_dir() else path
    return cached_tokenizer(
        lambda: read_documents(train_files, on_error=on_error, progress="training tokenizer" if progress else None),
        key=(file_fingerprint(train_files), on_error), name="docs", kind=kind, vocab_size=vocab_size,
        min_frequency=min_frequency, lowercase=lowercase, cache_dir=cache_dir)


def cached_tokenizer(texts: Callable[[], Iterable[str]], *, key: object, name: str, kind: str, vocab_size: int,
                     min_frequency: int = 2, lowercase: bool | None = None, cache_dir: Path) -> Path:
    """`cache_dir/tokenizers/<name>-<kind>-<vocab>-<hash>/tokenizer.json`, trained on `texts()` the first time.

    `key` identifies the training texts (a file fingerprint, a digest of the captions, ...); the hash also
    covers the training arguments, so a different setting never reuses a stale tokenizer."""
    digest = _key(key, kind, vocab_size, min_frequency, lowercase, CACHE_VERSION)
    path = Path(cache_dir) / "tokenizers" / f"{name}-{kind}-{vocab_size}-{digest}" / "tokenizer.json"
    if not path.is_file():
        tok = train_tokenizer(texts(), kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                              lowercase=lowercase)
        tmp = _atomic_dir(path.parent)
        tok.save(str(tmp / "tokenizer.json"))
        _publish(tmp, path.parent)
    return path


class TextDataModule(L.LightningDataModule):
    """Text corpus -> tokenizer -> pre-tokenized memmap -> packed blocks of `block_size` tokens (see module doc).

    Attributes known at construction (for linking into a model): `vocab_size` (padded to a multiple of 64),
    `pad_id`, `mask_id`, `bos_id`, `eos_id`, `unk_id`, `special_ids`. After `setup()`: `stats` (documents,
    tokens, blank and skipped files per split) and `tokenizer_path`.
    """

    def __init__(
        self,
        *,
        corpus: str = "embedded:text",
        valid_corpus: str | None = None,
        valid_fraction: float = 0.01,
        embedded_size: str = "small",
        tokenizer: str | None = None,
        tokenizer_kind: str = "bpe",
        vocab_size: int = 32_768,  # BERT's 30 522 rounded to a power of two; RoBERTa's GPT-2 BPE has 50 265
        min_frequency: int = 2,
        lowercase: bool | None = None,  # None: False for bpe, True for wordpiece
        block_size: int = 512,  # RoBERTa base `tokens_per_sample`
        packing: bool = True,
        break_mode: str = "complete",  # RoBERTa base `sample_break_mode`
        batch_size: int = 16,  # RoBERTa base: 16 sequences per GPU (x 8 GPUs x update_freq 16)
        num_workers: int = 2,
        seed: int = 0,
        on_error: str = "raise",
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if is_embedded(corpus):
            check_size(embedded_size)
        if break_mode not in BREAK_MODES:
            raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.corpus, self.valid_corpus, self.valid_fraction = corpus, valid_corpus, valid_fraction
        self.embedded_size, self.tokenizer = embedded_size, tokenizer
        self.tokenizer_kind, self.min_frequency, self.lowercase = tokenizer_kind, min_frequency, lowercase
        self.block_size, self.packing, self.break_mode = block_size, packing, break_mode
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.on_error, self.progress = on_error, progress
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cache"
        info = tokenizer_info(load_tokenizer(tokenizer)) if tokenizer else kind_info(tokenizer_kind, vocab_size)
        self.info = info
        self.vocab_size, self.pad_id, self.mask_id = info.vocab_size, info.pad_id, info.mask_id
        self.bos_id, self.eos_id, self.unk_id = info.bos_id, info.eos_id, info.unk_id
        self.special_ids = info.special_ids
        self._vocab_arg = vocab_size
        self.tokenizer_path: Path | None = None
        self.stats: dict[str, dict] = {}
        self.train_set: TokenBlockDataset | None = None
        self.val_set: TokenBlockDataset | None = None

    # files ----------------------------------------------------------------------------------------------

    def split_files(self) -> dict[str, list[Path]]:
        """{"train": files, "valid": files} (generating the embedded corpus if needed)."""
        if is_embedded(self.corpus):
            if self.corpus != "embedded:text":
                raise ValueError(f"TextDataModule reads 'embedded:text', not {self.corpus!r}")
            manifests = embedded_corpus(self.corpus, size=self.embedded_size)
            train = list_documents(manifests["train"])
            valid = list_documents(self.valid_corpus or manifests["valid"])
            return {"train": train, "valid": valid}
        train = list_documents(self.corpus)
        if self.valid_corpus is not None:
            return {"train": train, "valid": list_documents(self.valid_corpus)}
        keep, held = holdout(len(train), self.valid_fraction, 0)  # fixed: the seed orders, it does not split
        return {"train": [train[i] for i in keep], "valid": [train[i] for i in held]}

    def _prepare(self) -> dict[str, Path]:
        """Tokenizer + pre-tokenized caches (idempotent) -> {split: cache folder}."""
        files = self.split_files()
        self.tokenizer_path = resolve_tokenizer(
            self.tokenizer, train_files=files["train"], kind=self.tokenizer_kind, vocab_size=self._vocab_arg,
            min_frequency=self.min_frequency, lowercase=self.lowercase, on_error=self.on_error,
            cache_dir=self.cache_dir, progress=self.progress)
        tok_hash = file_sha1(self.tokenizer_path)
        caches = {}
        for split, fs in files.items():
            key = _key(file_fingerprint(fs), tok_hash, self.on_error, CACHE_VERSION)
            caches[split] = self.cache_dir / "text" / key
            pretokenize(fs, self.tokenizer_path, caches[split], on_error=self.on_error, progress=self.progress)
        return caches

    # Lightning hooks ------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        caches = self._prepare()
        info = tokenizer_info(load_tokenizer(self.tokenizer_path))
        if info.vocab_size > self.vocab_size or info.pad_id != self.pad_id or info.mask_id != self.mask_id:
            raise ValueError(f"tokenizer {self.tokenizer_path} ({info}) disagrees with this DataModule's "
                             f"vocab_size/pad_id/mask_id ({self.vocab_size}/{self.pad_id}/{self.mask_id})")
        sets = {}
        for split, cache in caches.items():
            meta = json.loads((cache / "meta.json").read_text())
            self.stats[split] = meta
            if meta["skipped"]:
                names = ", ".join(list(meta["skipped"])[:3])
                warnings.warn(f"{split}: skipped {len(meta['skipped'])} undecodable file(s) of "
                              f"{meta['files']} (on_error='skip'), e.g. {names}", stacklevel=2)
            if meta["num_docs"] == 0:
                if split == "train":
                    raise ValueError(f"no training documents left in text corpus {self.corpus!r}: "
                                     f"{meta['files']} files read, {meta['empty']} blank, "
                                     f"{len(meta['skipped'])} skipped as undecodable (on_error={self.on_error!r})")
                if meta["files"]:  # files were given, but none is left
                    warnings.warn(f"text corpus {self.corpus!r}: no validation documents left ({meta['files']} "
                                  f"files, {meta['empty']} blank, {len(meta['skipped'])} skipped); no validation",
                                  stacklevel=2)
                continue
            lengths = np.diff(np.load(cache / "offsets.npy"))
            ranges = self._ranges(cache, lengths)
            sets[split] = TokenBlockDataset(cache, ranges, bos_id=self.bos_id, eos_id=self.eos_id)
        self.train_set, self.val_set = sets.get("train"), sets.get("valid")

    def _ranges(self, cache: Path, lengths: np.ndarray) -> np.ndarray:
        mode = self.break_mode if self.packing else "documents"
        path = cache / f"ranges-{mode}-{self.block_size}.npy"
        if path.is_file():
            return np.load(path)
        ranges = block_ranges(lengths, self.block_size, packing=self.packing, break_mode=self.break_mode)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
        np.save(tmp, ranges)
        os.replace(tmp, path)
        return ranges

    def _loader(self, ds: Dataset | None, train: bool) -> DataLoader | list:
        return split_loader(self, ds, train, Collate(text_pad_id=self.pad_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, False)


# ------------------------------------------------------------------------------------------------------ CLI


def tokenizer_main(argv: list[str]) -> int:
    """`omnissl data tokenizer --corpus PATH|embedded:text --kind bpe --vocab-size N --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="omnissl data tokenizer",
        description="Train a subword tokenizer (HF tokenizers) on a text corpus and write DIR/tokenizer.json.")
    parser.add_argument("--corpus", required=True,
                        help="folder of .txt files, .tsv manifest, text file, or embedded:text")
    parser.add_argument("--kind", choices=KINDS, default="bpe", help="byte-level BPE (RoBERTa) or WordPiece (BERT)")
    parser.add_argument("--vocab-size", type=int, default=32_768)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                        help="default: no for bpe, yes for wordpiece")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--embedded-size", choices=("tiny", "small", "default"), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="what to do with files that are not UTF-8")
    args = parser.parse_args(argv)
    try:
        if is_embedded(args.corpus):
            files = list_documents(embedded_corpus(args.corpus, size=args.embedded_size, seed=args.seed)["train"])
        else:
            files = list_documents(args.corpus)
        stats = ReadStats()
        texts = read_documents(files, on_error=args.on_error, stats=stats, progress="training tokenizer")
        tok = train_tokenizer(texts, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                              lowercase=args.lowercase)
    except (ValueError, FileNotFoundError) as e:
        print(f"omnissl data tokenizer: error: {e}", file=sys.stderr)
        return 1
    if stats.files - stats.empty - len(stats.skipped) == 0:
        print(f"omnissl data tokenizer: error: no documents in {args.corpus}: {stats.describe()}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    info = tokenizer_info(tok)
    print(f"wrote {out / 'tokenizer.json'}: {info.kind}, {info.num_tokens} tokens (padded vocab_size "
          f"{info.vocab_size}), pad_id={info.pad_id} mask_id={info.mask_id} special_ids={info.special_ids}; "
          f"{stats.describe()}")
    return 0
