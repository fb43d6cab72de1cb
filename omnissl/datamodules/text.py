"""`TextDataModule`: a text corpus, a trained subword tokenizer, a pre-tokenized memmap, packed blocks.

Modules: `documents` (reading), `tokenizers` (training, loading, cache), `token_cache` (pre-tokenization and
block packing); this one holds the DataModule (the `omnissl data tokenizer` command is omnissl/commands/data.py).

Pipeline (RoBERTa pretraining data, fairseq `examples/roberta`):
Streamed (`train: shards:<folder or URI>` from `omnissl data shard CORPUS --docs {line,blank}`, with
`tokenizer` given): one item per document, `<s>` + a `block_size` window of its tokens + `</s>` (random window
for train), no packing; docs/streaming.md.

1. Documents (`train`, `valid`, `test`): a corpus is a folder (every `*.txt` below it, sorted; one document
   per file), a manifest (`.tsv`: root line, then `relpath[<TAB>...]`), a single text file (one document), or `"embedded:text"`
   (the standard library's docstrings, generated into `$OMNISSL_DATA` on first use; see
   `omnissl.datamodules.corpora`). Files must be UTF-8: by default an undecodable file stops preparation with
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
   A document longer than a block is cut into block-sized pieces. `break_mode="documents"` (packed rows with
   per-document attention): the items of `packing=False` (each `<s>` + a document or piece + `</s>`) packed
   whole into rows of at most `block_size` tokens (best-fit decreasing, `token_cache.pack_rows`), each token
   carrying its document's index in the row (`segments`); the encoder restarts positions at every document
   and attends within it, so a document gets the outputs it would get alone, with (almost) no padding.

Items are {"id", "text": (N,) int64[, "segments": (N,) int64]}; `Collate(text_pad_id=pad_id)` pads them into
a `Batch` with `inputs["text"]` (B, N), `lengths["text"]` (B,)[ and `segments["text"]` (B, N), -1 at padding].
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnissl.datamodules.base import DataModule, pretraining_splits
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (atomic_file, check_data_args, crop_start, data_root, file_fingerprint,
                                        file_sha1)
from omnissl.datamodules.documents import list_documents
from omnissl.datamodules.shards import ShardItems, is_shards, read_meta
from omnissl.datamodules.token_cache import BREAK_MODES, TokenBlockDataset, block_ranges, pack_rows, pretokenize
from omnissl.datamodules.tokenizers import (CACHE_VERSION, cache_key, check_tokenizer, expected_info,
                                            load_tokenizer, resolve_tokenizer, set_token_ids, word_boundaries)


@dataclass
class TextShardDecoder:
    """`ShardItems` decode of a text shard item (one document): {"id", "text": (N,) int64 `<s>` + window},
    the window of at most `block_size - 1` tokens of "tokens + `</s>`" (random from (seed, epoch, id) or
    centred). The tokenizer is loaded once per process."""

    tokenizer: str
    block_size: int
    bos_id: int
    eos_id: int
    crop: str
    seed: int

    def __call__(self, raw: dict, epoch: int) -> dict:
        tok = self.__dict__.get("loaded")
        if tok is None:
            tok = self.__dict__["loaded"] = load_tokenizer(self.tokenizer)
            tok.no_padding()
            tok.no_truncation()
        i = int(raw["id"])
        stream = np.append(np.asarray(tok.encode(raw["text"]).ids, dtype=np.int64), self.eos_id)
        body = self.block_size - 1
        if len(stream) > body:
            start = crop_start(len(stream), body, step=1, crop=self.crop, seed=self.seed, epoch=epoch, i=i)
            stream = stream[start : start + body]
        return {"id": i, "text": torch.from_numpy(np.concatenate([[self.bos_id], stream]).astype(np.int64))}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "loaded"}


class TextDataModule(DataModule):
    """Text corpus -> tokenizer -> pre-tokenized memmap -> packed blocks of `block_size` tokens (see module doc).

    train / valid / test: a corpus each (see the module doc); without `valid`, a fixed `valid_fraction` of the
    train documents. Attributes known at construction (for linking into a model): `vocab_size` (padded to a
    multiple of 64), `pad_id`, `mask_id`, `bos_id`, `eos_id`, `unk_id`, `special_ids`. After `setup()`, besides
    the `DataModule` surface: `stats` (documents, tokens, blank and skipped files per split), `tokenizer_path`.
    """

    def __init__(
        self,
        *,
        train: str = "embedded:text",
        valid: str | None = None,
        test: str | None = None,
        valid_fraction: float = 0.01,
        embedded_size: str = "small",
        tokenizer: str | None = None,
        tokenizer_kind: str = "bpe",
        vocab_size: int = 32_768,  # BERT's 30 522 rounded to a power of two; RoBERTa's GPT-2 BPE has 50 265
        min_frequency: int = 2,
        lowercase: bool | None = None,  # None: False for bpe, True for wordpiece
        block_size: int = 512,  # RoBERTa base `tokens_per_sample`
        packing: bool = True,
        break_mode: str = "complete",  # RoBERTa base `sample_break_mode`; "documents": packed rows, see module doc
        batch_size: int = 16,  # RoBERTa base: 16 sequences per GPU (x 8 GPUs x update_freq 16)
        num_workers: int = 2,
        seed: int = 0,
        on_error: str = "raise",
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(skipping="text file")
        check_data_args(on_error, train, embedded_size)
        if break_mode not in BREAK_MODES:
            raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if packing and break_mode == "documents" and is_shards(train):
            raise ValueError("break_mode='documents' (packed rows) reads the pre-tokenized cache: a streamed "
                             f"shard set ({train}) is read one document per item; leave break_mode unset")
        self.train, self.valid, self.test, self.valid_fraction = train, valid, test, valid_fraction
        self.embedded_size, self.tokenizer = embedded_size, tokenizer
        self.tokenizer_kind, self.min_frequency, self.lowercase = tokenizer_kind, min_frequency, lowercase
        self.block_size, self.packing, self.break_mode = block_size, packing, break_mode
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.on_error, self.progress = on_error, progress
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cache"
        set_token_ids(self, expected_info(tokenizer, tokenizer_kind, vocab_size))
        self._vocab_arg = vocab_size
        self.collate = Collate(text_pad_id=self.pad_id)
        self.tokenizer_path: Path | None = None
        self.stats: dict[str, dict] = {}

    # files ----------------------------------------------------------------------------------------------

    def split_files(self) -> dict[str, list[Path]]:
        """{"train": files, "valid": files[, "test": files]} (generating the embedded corpus if needed)."""
        return pretraining_splits(self.train, self.valid, self.test, corpus="text", size=self.embedded_size,
                                  valid_fraction=self.valid_fraction, read=list_documents)

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
            key = cache_key(file_fingerprint(fs), tok_hash, self.on_error, CACHE_VERSION)
            caches[split] = self.cache_dir / "text" / key
            pretokenize(fs, self.tokenizer_path, caches[split], on_error=self.on_error, progress=self.progress)
        return caches

    def word_boundaries(self) -> list[bool]:
        """Whether each token id begins a word, `vocab_size` long, of this module's tokenizer (tokenizers.word_boundaries),
        for whole-word masking. Trains or finds the tokenizer first if `setup()` has not run."""
        if self.tokenizer_path is None:
            self._prepare()
        return word_boundaries(load_tokenizer(self.tokenizer_path), self.vocab_size)

    # Lightning hooks ------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if is_shards(self.train):
            self._shard_tokenizer()
            return
        self._prepare()

    def _shard_tokenizer(self) -> Path:
        """The given tokenizer of streamed text (a shard set is not read whole to train one)."""
        if self.tokenizer is None:
            raise ValueError(f"train={self.train!r} is streamed: give `tokenizer` (a tokenizer.json or its folder; "
                             "`omnissl data tokenizer --corpus ...` trains one on a sample)")
        path = Path(self.tokenizer)
        self.tokenizer_path = path / "tokenizer.json" if path.is_dir() else path
        check_tokenizer(self.tokenizer_path, self.info)
        return self.tokenizer_path

    def _setup_shards(self) -> None:
        """Streamed documents: one item per document, `<s>` + its tokens + `</s>`, cut to a `block_size` window
        (random per (seed, epoch, item) for train, centred otherwise)."""
        # NOTE(ref): RoBERTa packs documents into full blocks (`sample_break_mode: complete`); a stream is read
        # one document per item here (packing=False semantics), so each item's place is exact for resume.
        path = self._shard_tokenizer()
        given = {"train": self.train, "valid": self.valid, "test": self.test}
        plain = [s for s, spec in given.items() if spec is not None and not is_shards(spec)]
        if plain:
            raise ValueError(f"TextDataModule: train is a shard set, so {plain} must be too (shards:<folder or URI>)")
        self.datasets = {}
        for split, spec in given.items():
            if spec is None:
                continue
            kind = read_meta(spec).get("kind")
            if kind not in (None, "text"):
                raise ValueError(f"{split} data {spec} holds {kind} shards, not text")
            decode = TextShardDecoder(str(path), block_size=self.block_size, bos_id=self.bos_id,
                                      eos_id=self.eos_id, crop="random" if split == "train" else "center",
                                      seed=self.seed)
            self.datasets[split] = ShardItems(spec, decode=decode, shuffle=split == "train", seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if is_shards(self.train):
            self._setup_shards()
            return
        caches = self._prepare()
        check_tokenizer(self.tokenizer_path, self.info)
        self.datasets = {}
        for split, cache in caches.items():
            meta = json.loads((cache / "meta.json").read_text())
            self.stats[split] = meta
            for path, reason in meta["skipped"].items():
                self.skips.add(path, reason, warn=False)
            if meta["skipped"]:
                names = ", ".join(list(meta["skipped"])[:3])
                warnings.warn(f"{split}: skipped {len(meta['skipped'])} undecodable file(s) of "
                              f"{meta['files']} (on_error='skip'), e.g. {names}", stacklevel=2)
            if meta["num_docs"] == 0:
                if split == "train":
                    raise ValueError(f"no training documents left in text corpus {self.train!r}: "
                                     f"{meta['files']} files read, {meta['empty']} blank, "
                                     f"{len(meta['skipped'])} skipped as undecodable (on_error={self.on_error!r})")
                if meta["files"]:  # files were given, but none is left
                    warnings.warn(f"text corpus {self.train!r}: no {split} documents left ({meta['files']} "
                                  f"files, {meta['empty']} blank, {len(meta['skipped'])} skipped); no {split} split",
                                  stacklevel=2)
                continue
            lengths = np.diff(np.load(cache / "offsets.npy"))
            ranges, rows = self._ranges(cache, lengths), None
            if self.packing and self.break_mode == "documents":  # whole documents packed into rows
                order, rows = pack_rows(ranges[:, 1] - ranges[:, 0] + 1, self.block_size)
                ranges = ranges[order]
            self.datasets[split] = TokenBlockDataset(cache, ranges, bos_id=self.bos_id, eos_id=self.eos_id,
                                                     rows=rows)

    def _ranges(self, cache: Path, lengths: np.ndarray) -> np.ndarray:
        mode = self.break_mode if self.packing else "documents"  # "documents": single-document items
        path = cache / f"ranges-{mode}-{self.block_size}.npy"
        if path.is_file():
            return np.load(path)
        ranges = block_ranges(lengths, self.block_size, packing=self.packing, break_mode=self.break_mode)
        with atomic_file(path) as tmp:
            np.save(tmp, ranges)
        return ranges


# ------------------------------------------------------------------------------------------------------ CLI
