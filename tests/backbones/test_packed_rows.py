"""Packed rows (several documents per row, `Encoder.encode(segments=)`): positions restart at every document and
a token attends only within its own, so each document's outputs equal those it gets alone in a padded batch;
changing one document never moves the others. Tiny models, a few ms each."""

from __future__ import annotations

import pytest
import torch

from omnissl import ops
from omnissl.backbones.builders import tiny
from omnissl.backbones.transformer import Transformer
from omnissl.datamodules.collate import pad_right
from omnissl.ops import segment_runs

LENGTHS = [5, 9, 3, 12, 7, 4]  # documents, <s> and </s> included
ROWS = [[0, 1, 2], [3, 4], [5]]  # documents per packed row: 17, 19 and 4 tokens (row 2 padded)
# the unpadded blocks' attention (MLM queries): one row per document (6 x 12² scores < 3 x 19²), or the packed
# rows with the block-diagonal mask when those are fewer (one long document, five short ones: 2 x 15² < 6 x 12²)
LAYOUTS = {"documents": (LENGTHS, ROWS), "rows": ([12, 3, 3, 3, 3, 3], [[0], [1, 2, 3, 4, 5]])}


def documents(seed: int = 0, vocab: int = 128, lengths: list[int] = LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(5, vocab, (n,), generator=g)
        d[0], d[-1] = 0, 2  # <s> ... </s>
        docs.append(d)
    return docs


def pack(docs: list[torch.Tensor], layout: list[list[int]] = ROWS
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """-> ids (R, N), lengths (R,), segments (R, N) (-1 at padding), where[doc] = (row, start, length)."""
    rows, segs, where = [], [], {}
    for r, members in enumerate(layout):
        start = 0
        for k, d in enumerate(members):
            where[d] = (r, start, len(docs[d]))
            start += len(docs[d])
        rows.append(torch.cat([docs[d] for d in members]))
        segs.append(torch.cat([torch.full((len(docs[d]),), k) for k, d in enumerate(members)]))
    ids, lengths = pad_right(rows, 1)
    segments, _ = pad_right(segs, -1)
    return ids, lengths, segments, [where[d] for d in range(len(docs))]


def test_segment_runs_restart_positions_and_number_runs():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 3, 3, 3, 5, 5, 5]])
    pad = torch.tensor([[False] * 6 + [True] * 2, [False] * 8])
    runs, pos = segment_runs(seg, pad)
    assert runs.tolist() == [[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 1, 1, 1, 2, 2, 2]]  # a repeated id is a new run
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("attention", list(LAYOUTS))
def test_each_packed_document_equals_it_alone(pre_norm, attention):
    torch.manual_seed(0)
    enc = tiny("text", vocab_size=128, dim=32, depth=3, heads=4, pre_norm=pre_norm).eval()
    doc_lengths, rows = LAYOUTS[attention]
    docs = documents(lengths=doc_lengths)
    ids, lengths, segments, where = pack(docs, rows)
    valid = (segments >= 0).flatten().nonzero().squeeze(1)
    chosen, _ = Transformer.document_layout(segments, valid, (valid, *ids.shape), None)
    assert (chosen[0] is valid) == (attention == "rows")
    alone_ids, alone_lengths = pad_right(docs, 1)
    with torch.no_grad():
        alone = enc.encode(enc.embed(alone_ids, alone_lengths), return_layers=True)
        packed = enc.encode(enc.embed(ids, lengths), return_layers=True, segments=segments)
        mixed = enc.encode(enc.embed(ids, lengths), return_layers=True)  # RoBERTa `complete`: no masks
    for d, (r, s, n) in enumerate(where):
        for layer, (a, p) in enumerate(zip(alone.layers, packed.layers)):
            assert (p[r, s:s + n] - a[d, :n]).abs().max() <= 1e-5, (d, layer)
    r, s, n = where[1]  # the check can fail: without segments the second document of a row differs
    assert (mixed.last[r, s:s + n] - alone.last[1, :n]).abs().max() > 1e-2

    # the MLM path: queried last block, blocks before it unpadded (row 2 is padded), the same rows
    pick = [(d, i) for d in range(len(docs)) for i in range(1, len(docs[d]) - 1, 3)]
    q_alone = torch.zeros(len(docs), max(sum(1 for x, _ in pick if x == d) for d in range(6)), dtype=torch.long)
    q_packed = torch.zeros(len(rows), 8, dtype=torch.long)
    fill_a, fill_p, slots = [0] * 6, [0] * len(rows), []
    for d, i in pick:
        r, s, _ = where[d]
        q_alone[d, fill_a[d]] = i
        q_packed[r, fill_p[r]] = s + i
        slots.append((d, fill_a[d], r, fill_p[r]))
        fill_a[d] += 1
        fill_p[r] += 1
    assert max(fill_p) <= q_packed.shape[1]
    with torch.no_grad():
        qa = enc.encode(enc.embed(alone_ids, alone_lengths), queries=q_alone).last
        qp = enc.encode(enc.embed(ids, lengths), queries=q_packed, segments=segments).last
    for d, ja, r, jp in slots:
        assert (qp[r, jp] - qa[d, ja]).abs().max() <= 1e-5, (d, ja)
        assert (qp[r, jp] - alone.last[d, q_alone[d, ja]]).abs().max() <= 1e-5


@pytest.mark.parametrize("explicit", [True, False])
def test_changing_one_document_never_moves_the_others(explicit):
    """No token attends across a document boundary: in training with attention dropout (the explicit CPU path,
    or SDPA), for the same dropout draws, editing document 1 leaves every other document's outputs and their
    gradients unchanged."""
    torch.manual_seed(0)
    enc = tiny("text", vocab_size=128, dim=32, depth=2, heads=4).train()
    for block in enc.trunk.blocks:
        block.attn.dropout = 0.2
        block.attn.explicit_cpu = explicit
    docs = documents()
    ids, lengths, segments, where = pack(docs)
    edited = ids.clone()
    r1, s1, n1 = where[1]
    edited[r1, s1 + 1:s1 + n1 - 1] = torch.randint(5, 128, (n1 - 2,), generator=torch.Generator().manual_seed(9))

    def run(x: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
        torch.manual_seed(3)
        return enc.encode(enc.embed(x, lengths), segments=seg).last

    base, moved = run(ids, segments), run(edited, segments)
    for d, (r, s, n) in enumerate(where):
        diff = (base[r, s:s + n] - moved[r, s:s + n]).abs().max()
        assert diff > 1e-3 if d == 1 else diff <= 1e-6, (d, float(diff))
    # gradients: the loss of document 0 reaches no weight through document 1's tokens
    emb = enc.frontend.embed.weight
    r0, s0, n0 = where[0]
    g = [torch.autograd.grad(run(x, segments)[r0, s0:s0 + n0].pow(2).sum(), emb)[0] for x in (ids, edited)]
    assert (g[0] - g[1]).abs().max() <= 1e-6
    # the check can fail: without segments, editing document 1 moves document 0 (same row)
    with torch.no_grad():
        leak = (run(ids, None)[r0, s0:s0 + n0] - run(edited, None)[r0, s0:s0 + n0]).abs().max()
    assert leak > 1e-3


def test_explicit_cpu_path_equals_sdpa_with_the_block_diagonal_mask(monkeypatch):
    monkeypatch.setattr(ops, "fast_cpu_dropout", False)  # F.dropout's draws: SDPA's for the same seed
    torch.manual_seed(0)
    enc = tiny("text", vocab_size=128, dim=32, depth=2, heads=4).train()
    ids, lengths, segments, _ = pack(documents())
    w = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(1)) * (segments >= 0)[..., None]
    outs, grads = [], []
    for explicit in (True, False):
        for block in enc.trunk.blocks:
            block.attn.dropout = 0.25
            block.attn.explicit_cpu = explicit
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        y = enc.encode(enc.embed(ids, lengths), segments=segments).last
        (y * w).sum().backward()  # a random projection of the valid rows (post-LN: y² sums to a constant)
        outs.append(y.detach())
        grads.append(enc.trunk.blocks[0].attn.qkv.weight.grad.clone())
    valid = segments >= 0
    assert (outs[0][valid] - outs[1][valid]).abs().max() <= 1e-5
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[1].abs().max()
    assert bool(torch.isfinite(outs[0]).all())  # padding rows attend to padding only: finite


def test_segments_need_absolute_positions_and_a_matching_shape():
    audio = tiny("audio")
    tokens = audio.embed(torch.randn(2, 4000))
    seg = torch.zeros(tokens.x.shape[:2], dtype=torch.long)
    with pytest.raises(ValueError, match="absolute 1-D positions"):
        audio.encode(tokens, segments=seg)
    text = tiny("text", vocab_size=128)
    t = text.embed(torch.randint(5, 128, (2, 9)))
    with pytest.raises(ValueError, match="segments must be"):
        text.encode(t, segments=torch.zeros(2, 8, dtype=torch.long))
