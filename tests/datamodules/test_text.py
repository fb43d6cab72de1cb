"""TextDataModule: tokenizer, pre-tokenized memmap, packed blocks that decode back to the corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnissl.batch import Batch
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.documents import list_documents
from omnissl.commands.data import main as data_main
from omnissl.datamodules.text import TextDataModule
from omnissl.datamodules.token_cache import block_ranges
from omnissl.datamodules.tokenizers import load_tokenizer

DOCS = [
    "Return the sum of a and b.\n\nBoth arguments must be numbers; the result has the wider type.",
    "Ünïcödé text survives: naïve café, 東京, emoji 🙂 and tabs\tinside.",
    "A short one.",
    "Open a file and return a stream. Raise OSError upon failure.\n" * 12,  # longer than a block
    "   \n\t  ",  # blank: dropped
    "The last document of the corpus, ending without a newline",
]


TEXT_SIZES = dict(block_size=32, batch_size=4)
pytestmark = pytest.mark.usefixtures("data_root")  # corpus, make, data_root: tests/datamodules/conftest.py


def stream_of(dm: TextDataModule) -> np.ndarray:
    """All items in order, each without its leading <s>, concatenated."""
    ds = dm.dataset("train")
    parts = []
    for i in range(len(ds)):
        ids = ds[i]["text"].numpy()
        assert ids[0] == dm.bos_id and len(ids) <= dm.block_size
        parts.append(ids[1:])
    return np.concatenate(parts)


def decode_docs(dm: TextDataModule, stream: np.ndarray) -> list[str]:
    tok = load_tokenizer(dm.tokenizer_path)
    ends = np.flatnonzero(stream == dm.eos_id)
    assert ends[-1] == len(stream) - 1  # the stream ends with the last document's </s>
    return [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in np.split(stream, ends + 1)[:-1]]


@pytest.mark.parametrize("break_mode", ["complete", "none"])
def test_packed_blocks_decode_back_to_the_documents(corpus, make, break_mode):
    dm = make(corpus, break_mode=break_mode)
    expected = [d for d in DOCS if d.strip()]
    assert decode_docs(dm, stream_of(dm)) == expected
    lengths = [len(dm.dataset("train")[i]["text"]) for i in range(len(dm.dataset("train")))]
    if break_mode == "none":  # fixed-length blocks, only the last one shorter
        assert set(lengths[:-1]) == {dm.block_size}
    assert dm.stats["train"]["num_docs"] == 5 and dm.stats["train"]["empty"] == 1


def test_complete_blocks_keep_short_documents_whole(corpus, make):
    dm = make(corpus, break_mode="complete", block_size=128)
    tok = load_tokenizer(dm.tokenizer_path)
    short = {i: tok.encode(d, add_special_tokens=False).ids for i, d in enumerate(DOCS) if d.strip()}
    blocks = [dm.dataset("train")[i]["text"].tolist()[1:] for i in range(len(dm.dataset("train")))]
    for ids in short.values():
        if len(ids) + 1 <= dm.block_size - 1:  # fits a block: it must sit whole inside one
            assert any(_contains(b, ids + [dm.eos_id]) for b in blocks), ids
    # blocks span documents: some block holds more than one </s>
    assert any(b.count(dm.eos_id) > 1 for b in blocks)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_unpacked_items_are_single_documents(corpus, make):
    dm = make(corpus, packing=False, block_size=512)
    tok = load_tokenizer(dm.tokenizer_path)
    items = [dm.dataset("train")[i]["text"].tolist() for i in range(len(dm.dataset("train")))]
    assert [tok.decode(x) for x in items] == [d for d in DOCS if d.strip()]
    assert all(x[0] == dm.bos_id and x[-1] == dm.eos_id and x.count(dm.eos_id) == 1 for x in items)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.inputs["text"].dtype == torch.int64
    for row, n in zip(batch.inputs["text"], batch.lengths["text"]):
        assert (row[n:] == dm.pad_id).all() and (row[:n] != dm.pad_id).all()


def test_block_ranges_tile_the_stream():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=200)
    total = int((lengths + 1).sum())
    for kw in ({"break_mode": "complete"}, {"break_mode": "none"}, {"packing": False}):
        r = block_ranges(lengths, 16, **kw)
        assert r[0, 0] == 0 and r[-1, 1] == total
        assert (r[1:, 0] == r[:-1, 1]).all()  # contiguous, no overlap, nothing lost
        assert ((r[:, 1] - r[:, 0]) <= 15).all() and ((r[:, 1] - r[:, 0]) > 0).all()
    # complete: a block boundary falls inside a document only when the document is longer than a block
    starts = np.concatenate([[0], np.cumsum(lengths + 1)])
    r = block_ranges(lengths, 16, break_mode="complete")
    inside = np.searchsorted(starts, r[:, 0], side="right") - 1
    cut = r[:, 0] != starts[inside]
    assert (lengths[inside[cut]] + 1 > 15).all()


def test_memmap_cache_is_compact_and_reused(corpus, make, monkeypatch):
    dm = make(corpus)
    cache = dm.dataset("train").cache
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert (cache / "tokens.bin").stat().st_size == 2 * meta["num_tokens"]
    offsets = np.load(cache / "offsets.npy")
    assert offsets[0] == 0 and offsets[-1] == meta["num_tokens"] and (np.diff(offsets) > 0).all()
    import omnissl.datamodules.token_cache as token_cache
    import omnissl.datamodules.tokenizers as tokenizers

    def boom(*a, **k):
        raise AssertionError("read or trained again although the cache exists")

    with monkeypatch.context() as m:  # where they are called: the tokenizer cache and the token cache
        m.setattr(tokenizers, "train_tokenizer", boom)
        m.setattr(tokenizers, "read_documents", boom)
        m.setattr(token_cache, "read_documents", boom)
        again = make(corpus)
    assert again.dataset("train").cache == cache
    assert again.dataset("train")[0]["text"].tolist() == dm.dataset("train")[0]["text"].tolist()
    # a changed file changes the key
    (corpus / "02.txt").write_text("A different short one.", encoding="utf-8")
    assert make(corpus).dataset("train").cache != cache


def test_wordpiece_layout_and_padded_vocab(corpus, make):
    dm = make(corpus, tokenizer_kind="wordpiece", vocab_size=300)
    assert (dm.pad_id, dm.mask_id, dm.vocab_size) == (0, 4, 320)
    assert dm.special_ids == [0, 1, 2, 3, 4]
    tok = load_tokenizer(dm.tokenizer_path)
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[MASK]") == 4 and tok.get_vocab_size() <= 320
    item = dm.dataset("train")[0]["text"].tolist()
    assert item[0] == tok.token_to_id("[CLS]")
    assert tok.decode(stream_of(dm)[:20].tolist()).startswith("return the sum of a and b")


def test_bpe_layout_matches_roberta():
    dm = TextDataModule(vocab_size=50_265)
    assert (dm.bos_id, dm.pad_id, dm.eos_id, dm.unk_id, dm.mask_id) == (0, 1, 2, 3, 4)
    assert dm.vocab_size == 50_304 and dm.vocab_size % 64 == 0


def test_non_utf8_file_is_named_or_skipped(corpus, make):
    bad = corpus / "03b-latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"03b-latin1\.txt: not valid UTF-8"):
        make(corpus)
    with pytest.warns(UserWarning, match=r"skipped 1 undecodable file.*03b-latin1\.txt"):
        dm = make(corpus, on_error="skip")
    assert list(dm.stats["train"]["skipped"]) == [str(bad)]
    assert decode_docs(dm, stream_of(dm)) == [d for d in DOCS if d.strip()]


def test_empty_corpus_fails_in_setup_saying_why(tmp_path):
    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "a.txt").write_text("  \n")
    (folder / "b.txt").write_text("")
    (folder / "c.txt").write_bytes(b"\xff\xfe\x00")
    dm = TextDataModule(train=str(folder), valid_fraction=0.0, vocab_size=320, on_error="skip", progress=False)
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"no training documents left.*3 files read, 2 blank, 1 skipped"):
        with pytest.warns(UserWarning):
            dm.setup("fit")


def test_missing_corpus_is_named(tmp_path):
    dm = TextDataModule(train=str(tmp_path / "nope"), vocab_size=320, progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.prepare_data()


def test_shuffling_is_a_function_of_seed_and_epoch(corpus, make):
    def order(seed, epoch):
        dm = make(corpus, seed=seed, batch_size=2)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [int(i) for b in loader for i in b.ids]

    a = order(0, 0)
    assert a == order(0, 0) and sorted(a) == list(range(len(a)))
    assert order(0, 1) != a and order(0, 1) == order(0, 1)
    assert order(1, 0) != a


def test_workers_read_the_same_items(corpus, make):
    dm = make(corpus, num_workers=2, batch_size=3)
    with_workers = {int(i): row[:n].tolist() for b in dm.train_dataloader()
                    for i, row, n in zip(b.ids, b.inputs["text"], b.lengths["text"])}
    assert with_workers == {i: dm.dataset("train")[i]["text"].tolist() for i in range(len(dm.dataset("train")))}


def test_embedded_corpus_and_valid_split():

    dm = TextDataModule(embedded_size="tiny", vocab_size=512, block_size=64, num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    manifests = embedded_corpus("embedded:text", size="tiny", seed=0)
    for split in ("train", "valid"):
        assert dm.stats[split]["num_docs"] == len(read_manifest(manifests[split])[1]) > 0
    val = next(iter(dm.val_dataloader()))
    assert 0 < val.inputs["text"].shape[1] <= 64


def test_documents_from_manifest_and_single_file(corpus, tmp_path):
    manifest = tmp_path / "list.tsv"
    manifest.write_text(f"{corpus}\n00.txt\t10\n02.txt\t5\n")
    assert list_documents(manifest) == [corpus / "00.txt", corpus / "02.txt"]
    assert list_documents(corpus / "00.txt") == [corpus / "00.txt"]


def test_tokenizer_cli(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert data_main(["tokenizer", "--corpus", str(corpus), "--kind", "bpe", "--vocab-size", "300", "--out",
                      str(out)]) == 0
    assert "pad_id=1 mask_id=4" in capsys.readouterr().out
    dm = TextDataModule(train=str(corpus), tokenizer=str(out), valid_fraction=0.0, block_size=32,
                        num_workers=0, progress=False)
    assert dm.vocab_size == 320 and dm.pad_id == 1
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer_path == out / "tokenizer.json"
    with pytest.raises(SystemExit) as e:
        data_main(["tokenizer", "--corpus", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("omnissl data tokenizer: error: ") and "missing" in err


def test_flat_typed_arguments_parse_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_string("data:\n  train: embedded:text\n  block_size: 128\n  tokenizer_kind: wordpiece\n")
    assert cfg.data.block_size == 128 and cfg.data.tokenizer_kind == "wordpiece"
