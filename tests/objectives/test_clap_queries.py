"""CLAP's towers compute only what pooling reads (`clap.pool_queries` -> `Encoder.encode(queries=)`): "first" one row
per caption in the trunk's last block, "mean" of a padded batch the valid tokens only in the blocks before it. The
loss and every parameter's gradient must equal the full-sequence path (the code without queries: `pool_queries`
returning None), and the trunk must really get the queries (its blocks' shapes are recorded)."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones import builders
from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.backbones.transformer import LearnedPositions, Transformer
from omnissl.batch import Batch
from omnissl.ssl import clap as clap_module
from omnissl.ssl.clap import CLAP

B, N, DIM = 5, 12, 32
TEXT_LENGTHS = [12, 4, 9, 7, 10]  # captions of varied lengths, padded to the longest (and one row beyond it below)
AUDIO_LENGTHS = [4000, 2400, 3300, 1700, 4000]


def text_tower(dropout: float = 0.0, cls_token: bool = False) -> Encoder:
    """A post-LN (RoBERTa-like) 3-block text tower; dropout everywhere when > 0."""
    trunk = Transformer(dim=DIM, depth=3, heads=4, ffn_dim=4 * DIM, pre_norm=False, dropout=dropout,
                        attn_dropout=dropout, act_dropout=dropout)
    return Encoder(TokenEmbedding(vocab_size=64, dim=DIM, pad_id=1), trunk, positions=LearnedPositions(DIM, max_len=64),
                   feature_norm=False, project=False, dropout_input=dropout, cls_token=cls_token)


def model(text_pool: str, dropout: float = 0.0, cls_token: bool = False, audio_pool: str = "mean") -> CLAP:
    torch.manual_seed(0)
    return CLAP(builders.tiny("audio", dim=DIM, depth=2, dropout=dropout), text_tower(dropout, cls_token), dim=16,
                audio_pool=audio_pool, text_pool=text_pool)


def batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor(TEXT_LENGTHS)
    ids = torch.randint(3, 64, (B, N + 1), generator=g)  # one column of padding beyond the longest caption
    ids[:, 0] = 0
    ids[torch.arange(N + 1)[None] >= lengths[:, None]] = 1
    audio = torch.randn(B, max(AUDIO_LENGTHS), generator=g) * 0.1
    a_len = torch.tensor(AUDIO_LENGTHS)
    audio[torch.arange(audio.shape[1])[None] >= a_len[:, None]] = 0.0
    return Batch({"audio": audio, "text": ids}, {"audio": a_len, "text": lengths}, {}, torch.arange(B))


def loss_and_grads(m: CLAP, data: Batch, seed: int = 7):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = m.step(data).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def full_sequence(monkeypatch):
    """The towers without queries: the code path the module took before it asked the trunk for queries."""
    monkeypatch.setattr(clap_module, "pool_queries", lambda *args: None)


def record_blocks(enc: Encoder) -> list[tuple[int, ...]]:
    """The shapes of every block's output, appended as the trunk runs (first block first)."""
    shapes: list[tuple[int, ...]] = []
    for block in enc.trunk.blocks:
        block.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out[0].shape)))
    return shapes


@pytest.mark.parametrize("text_pool", ["first", "mean"])
def test_step_with_queried_towers_equals_the_full_sequence(text_pool, monkeypatch):
    data = batch()
    m = model(text_pool).train()
    loss_q, grads_q = loss_and_grads(m, data)
    with monkeypatch.context() as mp:
        full_sequence(mp)
        loss_f, grads_f = loss_and_grads(m, data)
    torch.testing.assert_close(loss_q, loss_f, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads_f.keys() == grads_q.keys() == trainable and len(trainable) > 40
    for name, g in grads_f.items():
        torch.testing.assert_close(grads_q[name], g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("text_pool", ["first", "mean"])
def test_the_trunks_get_the_queries_in_training_and_in_evaluation(text_pool):
    data = batch()
    m = model(text_pool).train()
    text_shapes, audio_shapes = record_blocks(m.text_encoder), record_blocks(m.encoder)
    m.step(data).loss.backward()
    valid = sum(TEXT_LENGTHS)
    # the blocks before the last run on the valid tokens only (packed, (T, D)); the last one on the queried rows
    last = (B, 1, DIM) if text_pool == "first" else (B, max(TEXT_LENGTHS), DIM)
    assert text_shapes == [(valid, DIM), (valid, DIM), last]
    audio_tokens = [1 + (n - 400) // 320 for n in AUDIO_LENGTHS]  # the conv extractor's tokens per clip
    assert audio_shapes == [(sum(audio_tokens), DIM), (B, max(audio_tokens), DIM)]  # mean-pooled, padded audio
    # validation, zero-shot and `omnissl zeroshot` embed captions through `embed_texts`: the same queries
    text_shapes.clear()
    m.eval()
    captions = [data.inputs["text"][i, :n] for i, n in enumerate(TEXT_LENGTHS)]
    m.embed_texts(captions)
    assert text_shapes == [(valid, DIM), (valid, DIM), last]


def test_embeddings_in_evaluation_equal_the_full_sequence_with_dropout(monkeypatch):
    """Dropout > 0 (inactive in evaluation): the validation / zero-shot text and audio embeddings are unchanged.
    In training they are not comparable draw for draw: the unpadded blocks draw their dropout masks over (T, D)
    valid tokens instead of (B, N, D) padded ones (the same distribution, other draws)."""
    data = batch()
    captions = [data.inputs["text"][i, :n] for i, n in enumerate(TEXT_LENGTHS)]
    for text_pool in ("first", "mean"):
        m = model(text_pool, dropout=0.2).eval()
        got = (m.embed_texts(captions), m.embed_audio(data.inputs["audio"], data.lengths["audio"]))
        with monkeypatch.context() as mp:
            full_sequence(mp)
            want = (m.embed_texts(captions), m.embed_audio(data.inputs["audio"], data.lengths["audio"]))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_a_tower_with_a_cls_token(monkeypatch):
    """"mean" over the tokens after the CLS is queried (the returned padding mask is the queried tokens', not
    shifted by the CLS); "cls" and "first" (which reads the CLS row) need the CLS row, which queries cannot name:
    the whole sequence is computed."""
    data = batch()
    valid = sum(TEXT_LENGTHS) + B  # the CLS token of every row is valid
    for text_pool, last in (("mean", (B, max(TEXT_LENGTHS), DIM)), ("cls", (B, N + 2, DIM)),
                            ("first", (B, N + 2, DIM))):
        m = model(text_pool, cls_token=True).train()
        shapes = record_blocks(m.text_encoder)
        loss_q, grads_q = loss_and_grads(m, data)
        assert shapes == ([(valid, DIM), (valid, DIM), last] if text_pool == "mean" else [(B, N + 2, DIM)] * 3)
        with monkeypatch.context() as mp:
            full_sequence(mp)
            loss_f, grads_f = loss_and_grads(m, data)
        torch.testing.assert_close(loss_q, loss_f, rtol=1e-5, atol=1e-5)
        assert grads_f.keys() == grads_q.keys()
        for name, g in grads_f.items():
            torch.testing.assert_close(grads_q[name], g, rtol=1e-5, atol=1e-5, msg=f"{text_pool}: {name}")
