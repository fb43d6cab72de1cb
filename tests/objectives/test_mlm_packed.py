"""MaskedLM on packed rows (`Batch.segments`, TextDataModule break_mode="documents"): the loss of given masks
equals the padded batch's on the same documents, masking never selects the documents' `<s>` / `</s>`, and an
objective that does not read segments refuses such a batch. Tiny models."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.datamodules.collate import pad_right
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.mlm import MaskedLM

SPECIALS = [0, 1, 2, 3, 4]  # <s> <pad> </s> <unk> <mask>


def documents(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(5, vocab, (n,), generator=g)
        d[0], d[-1] = 0, 2
        docs.append(d)
    return docs


def pack(docs: list[torch.Tensor], rows: list[list[int]], pad: int = 1):
    """Documents into rows -> (tensor (R, N), lengths (R,), segments (R, N), -1 at padding)."""
    ids, lengths = pad_right([torch.cat([docs[d] for d in r]) for r in rows], pad)
    seg, _ = pad_right([torch.cat([torch.full((len(docs[d]),), k) for k, d in enumerate(r)]) for r in rows], -1)
    return ids, lengths, seg


def unpack(x: torch.Tensor, lengths: torch.Tensor, rows: list[list[int]], n_docs: int) -> list[torch.Tensor]:
    """The inverse of pack for a (R, N) tensor: each document's slice, in document order."""
    out: list[torch.Tensor | None] = [None] * n_docs
    for r, members in enumerate(rows):
        start = 0
        for d in members:
            out[d] = x[r, start:start + int(lengths[d])]
            start += int(lengths[d])
    return out  # type: ignore[return-value]


def model(**kw) -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(tiny("text", vocab_size=128, dim=32, depth=3, heads=4), mask_id=4, special_ids=SPECIALS,
                    num_tokens=128, **kw).train()


def test_packed_loss_and_gradients_equal_the_padded_batch():
    """`step` on a packed batch (masks drawn on the packed rows) against `masked_step` on the padded batch of the
    same documents with the same masks and corruption: the same loss and gradients."""
    m = model()
    lengths = [14, 30, 9, 22, 17, 6, 25]
    rows = [[0, 1, 2], [3, 4, 5], [6]]  # 53, 45 and 25 tokens: rows 1 and 2 padded
    docs = documents(lengths)
    ids, row_lengths, seg = pack(docs, rows)
    doc_lengths = torch.tensor(lengths)

    m.zero_grad(set_to_none=True)
    m.generator = lambda device=None: torch.Generator().manual_seed(7)
    out = m.step(Batch({"text": ids}, {"text": row_lengths}, segments={"text": seg}))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    corrupted, selected = m.corrupt(ids, row_lengths, torch.Generator().manual_seed(7))  # the step's draws
    assert int(selected.sum()) >= 10
    alone_ids, _ = pad_right(docs, 1)
    alone_corrupted, _ = pad_right(unpack(corrupted, doc_lengths, rows, len(docs)), 1)
    alone_selected, _ = pad_right(unpack(selected, doc_lengths, rows, len(docs)), False)
    m.zero_grad(set_to_none=True)
    ref = m.masked_step(alone_ids, alone_corrupted, alone_selected, doc_lengths)
    ref.loss.backward()
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) <= 1e-5
    assert abs(float(out.metrics["accuracy"]) - float(ref.metrics["accuracy"])) <= 1e-6
    assert grads.keys() == {n for n, p in m.named_parameters() if p.grad is not None} and len(grads) > 10
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the check can fail: the same rows without segments (RoBERTa `complete`) give another loss
    m.generator = lambda device=None: torch.Generator().manual_seed(7)
    with torch.no_grad():
        mixed = m.step(Batch({"text": ids}, {"text": row_lengths}))
    assert abs(float(mixed.loss) - float(ref.loss)) > 1e-3


@pytest.mark.parametrize("span", [1, 3])
def test_masking_packed_rows_never_selects_separators(span):
    m = model(span=span, mask_prob=0.3)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 20, (60,), generator=g).tolist()
    docs = documents(lengths, seed=1)
    rows, cur, size = [], [], 0
    for d, n in enumerate(lengths):  # next-fit into rows of 64
        if size + n > 64:
            rows.append(cur)
            cur, size = [], 0
        cur.append(d)
        size += n
    rows.append(cur)
    ids, row_lengths, seg = pack(docs, rows)
    special = torch.isin(ids, torch.tensor(SPECIALS))
    candidates = ~special
    picked, total = 0, 0
    for draw in range(20):
        corrupted, selected = m.corrupt(ids, row_lengths, torch.Generator().manual_seed(draw))
        assert not (selected & special).any()  # never <s>, </s> or padding
        assert (corrupted[special] == ids[special]).all()  # separators and padding never changed
        assert not torch.isin(corrupted[selected & (corrupted != ids)], torch.tensor([0, 1, 2, 3])).any()
        picked, total = picked + int(selected.sum()), total + int(candidates.sum())
    if span == 1:  # the realized rate: fairseq's exact count per row, int(p·n + U)
        rate = picked / total
        assert abs(rate - 0.3) < 3 * (0.3 * 0.7 / total) ** 0.5 + 0.5 * len(rows) / total, rate


def test_an_objective_that_ignores_segments_refuses_packed_rows():
    enc = tiny("text", vocab_size=64)
    d2v = Data2Vec(enc, modality="text", mask_prob=0.35, mask_length=4, min_spans=1, top_k=2)
    ids = torch.randint(5, 64, (2, 16))
    batch = Batch({"text": ids}, {"text": torch.tensor([16, 16])}, segments={"text": torch.zeros(2, 16).long()})
    with pytest.raises(ValueError, match="does not read packed rows"):
        d2v.training_step(batch, 0)
    with pytest.raises(ValueError, match="does not read packed rows"):
        d2v.validation_step(batch, 0)
    with pytest.raises(ValueError, match="segments"):  # the Batch checks their shape
        Batch({"text": ids}, segments={"text": torch.zeros(2, 15).long()})
