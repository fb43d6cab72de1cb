"""TextDataModule break_mode="documents": whole documents packed into rows with per-token document ids, the
same items as packing=False (each `<s>` + document + `</s>`), best-fit decreasing into rows of block_size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from omnissl.datamodules.text import TextDataModule
from omnissl.datamodules.token_cache import pack_rows

DOCS = [
    "Return the sum of a and b.\n\nBoth arguments must be numbers; the result has the wider type.",
    "A short one.",
    "Open a file and return a stream. Raise OSError upon failure.\n" * 6,  # longer than a block: pieces
    "Yes.",
    "Split the string at the first separator and return a 3-tuple.",
    "No.",
    "Return a new sorted list from the items in iterable; key and reverse as for list.sort.",
    "The last document of the corpus, ending without a newline",
]


TEXT_SIZES = dict(block_size=48, batch_size=3)
pytestmark = pytest.mark.usefixtures("data_root")  # corpus, make, data_root: tests/datamodules/conftest.py


def test_packed_rows_hold_the_unpacked_items_whole(corpus, make):
    packed, single = make(corpus, break_mode="documents"), make(corpus, packing=False)
    items = [tuple(single.dataset("train")[i]["text"].tolist()) for i in range(len(single.dataset("train")))]
    ds = packed.dataset("train")
    found = []
    for r in range(len(ds)):
        it = ds[r]
        ids, seg = it["text"], it["segments"]
        assert len(ids) <= packed.block_size and seg.shape == ids.shape and seg.dtype == torch.int64
        assert (seg[1:] - seg[:-1]).ge(0).all() and (seg[1:] - seg[:-1]).le(1).all() and seg[0] == 0
        for k in range(int(seg.max()) + 1):
            doc = ids[seg == k].tolist()
            assert doc[0] == packed.bos_id  # every document (or piece of a long one) its own <s>
            assert doc[-1] == packed.eos_id or len(doc) == packed.block_size  # ... </s>, or a cut piece
            found.append(tuple(doc))
    assert Counter(found) == Counter(items)  # the same items, each exactly once
    assert len(ds) < len(items) and any(int(ds[r]["segments"].max()) > 0 for r in range(len(ds)))
    batch = next(iter(packed.train_dataloader()))
    seg, n = batch.segments["text"], batch.lengths["text"]
    assert seg.shape == batch.inputs["text"].shape
    valid = torch.arange(seg.shape[1])[None] < n[:, None]
    assert (seg[~valid] == -1).all() and (seg[valid] >= 0).all()
    assert "text" not in single.collate([single.dataset("train")[0]]).segments  # other modes: no segments


def test_pack_rows_is_a_best_fit_packing_of_every_item_once():
    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.geometric(1 / 40, size=500), 128)  # heavy-tailed, as docstrings
    order, rows = pack_rows(sizes, 128)
    assert sorted(order.tolist()) == list(range(len(sizes)))
    fill = np.add.reduceat(sizes[order], rows[:-1])
    assert (fill <= 128).all() and fill.sum() == sizes.sum()
    # any-fit: a row was opened only for an item no open row could take, so no two rows fit into one
    assert (np.sort(fill)[0] + np.sort(fill)[1]) > 128
    assert len(fill) <= int(np.ceil(sizes.sum() / 128 * 1.02)) + 1  # within 2 % of the tokens' lower bound
    for r in range(len(fill)):  # corpus order inside a row
        members = order[rows[r]:rows[r + 1]]
        assert (np.diff(members) > 0).all()
    with pytest.raises(ValueError, match="block_size"):
        pack_rows(np.array([3, 129]), 128)


def test_streamed_shards_refuse_packed_rows():
    with pytest.raises(ValueError, match="documents"):
        TextDataModule(train="shards:/nonexistent", tokenizer="x.json", break_mode="documents")
