"""Masked language modelling: selection statistics, 80/10/10 corruption, specials, whole words and spans
(omnissl.ssl.masking), and the MaskedLM objective learning on the embedded text corpus."""

from __future__ import annotations

import math

import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.datamodules.tokenizers import train_tokenizer, word_boundaries
from omnissl.ssl.masking import mlm_select, word_starts
from omnissl.ssl.mlm import MaskedLM

SPECIALS = [0, 1, 2, 3, 4]  # RoBERTa's layout: <s> <pad> </s> <unk> <mask>
PAD, MASK, V, NUM_TOKENS = 1, 4, 1024, 1000  # ids 1000..1023: vocabulary padding, never produced


def rows(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-block-like rows: <s> at 0, a </s> every ~20 tokens, right padding of random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, NUM_TOKENS, (b, n), generator=g)
    ids[:, 0] = 0
    ids[torch.rand(b, n, generator=g) < 0.05] = 2
    ids[torch.rand(b, n, generator=g) < 0.01] = 3  # an <unk> now and then
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g)
    ids[torch.arange(n)[None] >= lengths[:, None]] = PAD
    return ids, lengths


def model(**kw) -> MaskedLM:
    return MaskedLM(tiny("text", vocab_size=V), mask_id=MASK, special_ids=SPECIALS, num_tokens=NUM_TOKENS, **kw)


def binomial_ok(successes: float, trials: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(successes / trials - p) <= sigmas * math.sqrt(p * (1 - p) / trials)


@pytest.mark.parametrize("p", [0.15, 0.30])
def test_realized_masking_rate_within_binomial_tolerance(p):
    m = model(mask_prob=p)
    ids, lengths = rows(256, 128)
    _, selected = m.corrupt(ids, lengths, generator=torch.Generator().manual_seed(1))
    ordinary = ~m.special[ids] & (torch.arange(128)[None] < lengths[:, None])
    trials = int(ordinary.sum())
    assert binomial_ok(float(selected.sum()), trials, p), (float(selected.sum()) / trials, p)
    # fairseq's exact count per row: int(p * ordinary + U[0, 1)) -> every row within one token of p * ordinary
    per_row = selected.sum(1).double() - p * ordinary.sum(1).double()
    assert per_row.abs().max() < 1.0 + 1e-9


def test_80_10_10_split_is_measured_on_the_selected_tokens():
    m = model(mask_prob=0.3)
    ids, lengths = rows(256, 256, seed=2)
    corrupted, selected = m.corrupt(ids, lengths, generator=torch.Generator().manual_seed(3))
    n = int(selected.sum())
    masked = int((corrupted[selected] == MASK).sum())
    unchanged = int((corrupted[selected] == ids[selected]).sum())
    randomized = n - masked - unchanged
    # a random draw equal to the original token (1 in 995) is counted as unchanged
    r = 0.1 * (1 - 1 / (NUM_TOKENS - 5))
    assert binomial_ok(masked, n, 0.8) and binomial_ok(randomized, n, r) and binomial_ok(unchanged, n, 1 - 0.8 - r), \
        (masked / n, randomized / n, unchanged / n)
    # MosaicBERT / data2vec-style variants: only <mask> (no random, no unchanged)
    only = model(mask_frac=1.0, random_frac=0.0)
    c2, s2 = only.corrupt(ids, lengths, generator=torch.Generator().manual_seed(3))
    assert (c2[s2] == MASK).all() and torch.equal(c2[~s2], ids[~s2])


def test_special_tokens_and_padding_are_never_selected_or_inserted():
    m = model(mask_prob=0.5, mask_frac=0.0, random_frac=1.0)  # every selected token randomized
    ids, lengths = rows(128, 128, seed=4)
    corrupted, selected = m.corrupt(ids, lengths, generator=torch.Generator().manual_seed(5))
    special = torch.isin(ids, torch.tensor(SPECIALS)) | (torch.arange(128)[None] >= lengths[:, None])
    assert special.any() and not (selected & special).any()
    assert torch.equal(corrupted[~selected], ids[~selected])  # nothing outside the selection changes
    inserted = corrupted[selected]
    assert not torch.isin(inserted, torch.tensor(SPECIALS)).any()
    assert inserted.max() < NUM_TOKENS  # vocabulary padding rows are never drawn
    # the inserted tokens cover the ordinary ids about uniformly (not a fixed few)
    assert inserted.unique().numel() > 0.9 * min(inserted.numel(), NUM_TOKENS - 5) * 0.6
    # <mask> appears only where a token was selected (the corpus never holds it here)
    m2 = model(mask_prob=0.5)
    c2, s2 = m2.corrupt(ids, lengths, generator=torch.Generator().manual_seed(6))
    assert not (c2[~s2] == MASK).any()


TEXT = ("Return the sum of a and b. Both arguments must be numbers; the result has the wider type.\n"
        "Open a file and return a stream.  Raise OSError upon failure, naïve café 東京 unbelievably.\n"
        "Tokenizers split uncommonly-long words into several subword pieces: internationalization.")


def _reference_words(text: str, enc, kind: str) -> list[int | None]:
    """Word index of every token, independently of our tables: byte-level BPE: the whitespace-separated word
    that holds the token's first non-space character (a token of spaces only belongs to none); WordPiece:
    the tokenizer's own word_ids (pre-tokenizer words)."""
    if kind == "wordpiece":
        return list(enc.word_ids)
    word_of = [None] * len(text)
    w = -1
    for i, ch in enumerate(text):
        if not ch.isspace() and (i == 0 or text[i - 1].isspace()):
            w += 1
        if not ch.isspace():
            word_of[i] = w
    out = []
    for start, end in enc.offsets:
        chars = [word_of[i] for i in range(start, end) if word_of[i] is not None]
        out.append(chars[0] if chars else None)
    return out


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_whole_word_masks_cover_whole_words(kind):
    corpus = [TEXT.replace("\n", " ")] * 4 + ["the sum of the parts", "open and close a file", "return numbers"]
    tok = train_tokenizer(corpus, kind=kind, vocab_size=320 if kind == "bpe" else 128, min_frequency=2)
    enc = tok.encode(TEXT, add_special_tokens=False)
    ref = _reference_words(TEXT, enc, kind)
    multi = [w for w in set(ref) if w is not None and ref.count(w) > 1]
    assert len(multi) >= 5, "the test needs words split into several tokens"
    size = 320
    starts = word_boundaries(tok, size)
    ids = torch.tensor([0] + enc.ids + [2])[None].repeat(512, 1)  # 512 draws of the same row
    special = torch.zeros(size, dtype=torch.bool)
    special[:5] = True
    units = word_starts(ids, starts=torch.tensor(starts), special=special)
    candidates = ~special[ids]
    selected = mlm_select(candidates, mask_prob=0.3, unit_starts=units, generator=torch.Generator().manual_seed(0))
    sel = selected[:, 1:-1]
    words = torch.tensor([-1 if w is None else w for w in ref])
    for w in set(ref) - {None}:
        cols = sel[:, words == w]
        assert (cols.all(1) | ~cols.any(1)).all(), f"word {w} partly masked"
    # and units are no coarser than words: one per word, plus whitespace tokens that stand alone ("a  b")
    text_of = [tok.decode([i], skip_special_tokens=False) for i in enc.ids]
    alone = sum(1 for i, r in enumerate(ref) if r is None and (i + 1 == len(ref) or text_of[i + 1][:1].isspace()))
    assert int(units[0, 1:-1].sum()) == len(set(ref) - {None}) + alone
    # every unit is drawn with the same probability and int(p·U + u) units per row: E[tokens] = p · tokens
    assert sel.float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert sel[:, torch.isin(words, torch.tensor(multi))].any()  # multi-token words do get masked


def test_span_masking_selects_runs():
    cand = torch.ones(256, 200, dtype=torch.bool)
    cand[:, 100] = False  # a special token in the middle
    sel = mlm_select(cand, mask_prob=0.3, span=3, generator=torch.Generator().manual_seed(0))
    assert not sel[:, 100].any()
    for row in sel[:32]:
        x = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int().diff()
        starts, ends = (x == 1).nonzero().flatten(), (x == -1).nonzero().flatten()
        for s, e in zip(starts.tolist(), ends.tolist()):  # run [s, e)
            assert e - s >= 3 or e in (100, 200), (s, e)  # only cut by the special token or the row end
    # overlapping spans: 1 - (1 - p/span)^span of the tokens, as fairseq's mask_multiple_length
    assert sel.float().mean().item() == pytest.approx(1 - (1 - 0.1) ** 3, abs=0.02)


def test_masks_are_reproducible_and_on_the_objective_generator():
    m = model()
    ids, lengths = rows(8, 64)
    a = m.corrupt(ids, lengths)
    b = m.corrupt(ids, lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same (seed, step, rank, micro-batch)
    m._micro = 1
    assert not torch.equal(m.corrupt(ids, lengths)[1], a[1])


def test_head_runs_on_selected_positions_only_and_loss_is_fp32_cross_entropy():
    m = model()
    ids, lengths = rows(4, 64)
    seen = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    out = m.step(Batch({"text": ids}, {"text": lengths}))
    corrupted, selected = m.corrupt(ids, lengths)
    assert seen == [(int(selected.sum()), V)]
    with torch.no_grad():
        h = m.encoder.encode(m.encoder.embed(corrupted, lengths)).last
        logits = m.logits(h)[selected]
        ref = torch.nn.functional.cross_entropy(logits.double(), ids[selected])
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert float(out.metrics["perplexity"]) == pytest.approx(math.exp(ref.item()), rel=1e-4)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="TokenEmbedding"):
        MaskedLM(tiny("audio"))
    with pytest.raises(ValueError, match="mask_prob"):
        model(mask_prob=0.0)
    with pytest.raises(ValueError, match="together"):
        MaskedLM(tiny("text", vocab_size=V), mask_id=4)
    with pytest.raises(ValueError, match="mask_id"):
        MaskedLM(tiny("text", vocab_size=V)).corrupt(*rows(2, 8))


# --- learning on the embedded text --------------------------------------------------------------------------


def test_loss_and_masked_accuracy_improve_on_the_embedded_text(tiny_mlm_run):
    """The real embedded corpus (stdlib docstrings) with its trained 512-entry BPE, 40 updates of a tiny encoder
    with whole-word masking, roles and word boundaries read from the DataModule (the run: tests/conftest.py's
    tiny_mlm_run, shared with tests/eval/test_mlm_text_path.py). In 40 updates the model learns the token
    frequencies (loss from ln 512 = 6.2 to ~5.3, the unigram plateau; measured) and starts hitting frequent tokens;
    context takes longer (test_pll_ranks_grammatical_sentences_above_their_shuffles)."""
    m, dm, metrics = tiny_mlm_run["model"], tiny_mlm_run["dm"], tiny_mlm_run["metrics"]
    assert m.mask_id == dm.mask_id and m.special_ids == dm.special_ids and hasattr(m, "word_start")
    loss = [r["train/loss"] for r in metrics]
    acc = [r["train/accuracy"] for r in metrics]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert first > math.log(400)  # starts near uniform over the vocabulary
    assert last < 0.9 * first, (first, last)
    assert sum(acc[-10:]) / 10 > sum(acc[:5]) / 5 + 0.01, acc
    frac = [r["train/masked_frac"] for r in metrics]  # whole words: the token share varies per batch
    assert 0.13 < sum(frac) / len(frac) < 0.17, frac


def test_the_mlm_path_memorizes_a_few_real_blocks_through_their_context():
    """Overfit check of the whole path (selection, corruption, encoder, tied head, targets): 8 blocks of 32 tokens of
    the embedded text, new masks every update (a running generator, as the Trainer's per-update seeds give). A
    model that ignored context could not go below the unigram entropy of these tokens (~4.4 nats); through the
    real `step` the loss must fall to near 0 (measured: 0.07-0.2 after 250 updates, ~3.4 at update 50)."""
    from omnissl.datamodules.text import TextDataModule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dm = TextDataModule(embedded_size="tiny", vocab_size=512, block_size=32, batch_size=8, num_workers=0,
                            progress=False)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        ids = batch.inputs["text"]
        m = MaskedLM(tiny("text", vocab_size=512, dim=64, depth=2), mask_id=dm.mask_id,
                     special_ids=dm.special_ids, num_tokens=dm.info.num_tokens)
        ordinary = ids[~m.special[ids]]
        p = torch.bincount(ordinary, minlength=512).float()
        p = p[p > 0] / p.sum()
        unigram = float(-(p * p.log()).sum())
        g = torch.Generator().manual_seed(1)
        m.generator = lambda device=None: g  # new masks every update (unattached, the seed is fixed per update)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
        losses = []
        for _ in range(250):
            out = m.step(batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        with torch.no_grad():  # fresh masks, every selected token <mask>: the original ids must come back
            m.mask_frac, m.random_frac = 1.0, 0.0
            corrupted, selected = m.corrupt(ids, batch.lengths["text"], generator=torch.Generator().manual_seed(9))
            hidden = m.encoder.encode(m.encoder.embed(corrupted, batch.lengths["text"])).last[selected]
            accuracy = float((m.logits(hidden).argmax(-1) == ids[selected]).float().mean())
    finally:
        torch.set_num_threads(threads)
    assert unigram > 3.5, unigram
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first > unigram and last < 0.5 < 0.15 * unigram, (first, last, unigram)
    assert accuracy > 0.9, accuracy
