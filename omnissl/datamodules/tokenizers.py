"""Subword tokenizers (HF `tokenizers`): the two special-token layouts, training, loading, and the cache of
trained tokenizers that the text DataModules share.

A byte-level BPE (RoBERTa: specials `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3 `<mask>`=4) or a WordPiece (BERT:
`[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4, lowercased). `vocab_size` is padded up to a multiple of 64
(tensor-core friendly, as MosaicBERT); rows past the tokenizer's own size are never produced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omnissl.datamodules.common import atomic_dir, file_fingerprint, publish
from omnissl.datamodules.documents import read_documents

KINDS = ("bpe", "wordpiece")
# role -> token; both layouts put the five specials at ids 0..4 (RoBERTa's and BERT's orders)
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bpe": {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"},
}
VOCAB_MULTIPLE = 64
CACHE_VERSION = 1


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


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


def word_boundaries(tok, size: int | None = None) -> list[bool]:
    """Which token ids begin a word, for whole-word masking: `size` (default the tokenizer's own size) bools.
    Byte-level BPE: the token's text begins with whitespace (the "Ġ" space marker, a newline, ...), so a word is
    its leading whitespace and what follows up to the next such token ("Ġ" + "b" is one word, " b"; punctuation
    joins the word before it, as fairseq's `mask_whole_words`); WordPiece: the token has no "##" prefix. Special
    tokens and ids past the tokenizer's size (which never occur) are marked as beginning a word."""
    info = tokenizer_info(tok)
    n = tok.get_vocab_size()
    size = n if size is None else size
    if size < n:
        raise ValueError(f"word_boundaries: size {size} is smaller than the tokenizer's {n} tokens")
    specials = set(info.special_ids)
    starts = [True] * size
    for i in range(n):
        if i in specials:
            continue
        if info.kind == "wordpiece":
            starts[i] = not tok.id_to_token(i).startswith("##")
        else:  # byte-level: decode the token's bytes (a split UTF-8 character decodes to U+FFFD, not a space)
            starts[i] = tok.decode([i], skip_special_tokens=False)[:1].isspace()
    return starts

def expected_info(tokenizer: str | None, kind: str, vocab_size: int) -> TokenizerInfo:
    """The TokenizerInfo a DataModule will have, known at construction: the given tokenizer's, or that of a
    tokenizer of `kind` and `vocab_size` still to be trained."""
    return tokenizer_info(load_tokenizer(tokenizer)) if tokenizer else kind_info(kind, vocab_size)


def set_token_ids(dm: object, info: TokenizerInfo) -> None:
    """Give `dm` the attributes a model links to: `info`, `vocab_size` (padded), `pad_id`, `mask_id`, `bos_id`,
    `eos_id`, `unk_id`, `special_ids`."""
    dm.info = info  # type: ignore[attr-defined]
    for name in ("vocab_size", "pad_id", "mask_id", "bos_id", "eos_id", "unk_id", "special_ids"):
        setattr(dm, name, getattr(info, name))


def check_tokenizer(path: Path, expected: TokenizerInfo):
    """Load the tokenizer at `path`; raise when it disagrees with what the DataModule announced (`expected`)."""
    tok = load_tokenizer(path)
    info = tokenizer_info(tok)
    if info.vocab_size > expected.vocab_size or info.pad_id != expected.pad_id or info.mask_id != expected.mask_id:
        raise ValueError(f"tokenizer {path} ({info}) disagrees with this DataModule's vocab_size/pad_id/mask_id "
                         f"({expected.vocab_size}/{expected.pad_id}/{expected.mask_id})")
    return tok


# ---------------------------------------------------------------------------------------------------- cache


def cache_key(*parts: object) -> str:
    """A short stable hash of `parts` (JSON), naming cache folders."""
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
    digest = cache_key(key, kind, vocab_size, min_frequency, lowercase, CACHE_VERSION)
    path = Path(cache_dir) / "tokenizers" / f"{name}-{kind}-{vocab_size}-{digest}" / "tokenizer.json"
    if not path.is_file():
        tok = train_tokenizer(texts(), kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                              lowercase=lowercase)
        tmp = atomic_dir(path.parent)
        tok.save(str(tmp / "tokenizer.json"))
        publish(tmp, path.parent)
    return path
