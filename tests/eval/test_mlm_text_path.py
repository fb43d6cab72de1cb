"""The text path end to end: a MaskedLM run on the embedded text keeps its tokenizer in the checkpoint, the
omnissl package and the --hf export carry it (AutoTokenizer with its roles set), RobertaForMaskedLM from the
export fills masks as our model does, and pseudo-log-likelihood scoring (eval/pll.py, `omnissl pll`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.checkpoints import load_head_weights, read_checkpoint, read_tokenizer
from omnissl.eval.export import export_checkpoint
from omnissl.eval.pll import load_masked_lm, pseudo_log_likelihood
from omnissl.ssl.mlm import MaskedLM

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """40 updates of a tiny MaskedLM on the embedded text (its own 512-entry BPE); one checkpoint."""
    from omnissl.datamodules.text import TextDataModule

    root = tmp_path_factory.mktemp("mlm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine
    try:
        torch.manual_seed(0)
        dm = TextDataModule(embedded_size="tiny", vocab_size=512, block_size=64, batch_size=16, num_workers=0,
                            progress=False)
        model = MaskedLM(tiny("text", vocab_size=512, dim=64, depth=2), whole_word=True,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.9, 0.98), eps=1e-6))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=40, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)])
        trainer.fit(model, dm)
    finally:
        torch.set_num_threads(threads)
    return {"ckpt": root / "last.ckpt", "dm": dm, "model": model.eval(), "root": root}


def test_the_checkpoint_carries_the_runs_tokenizer(run):
    text = read_tokenizer(run["ckpt"])
    assert text is not None and text == Path(run["dm"].tokenizer_path).read_text(encoding="utf-8")
    meta = read_checkpoint(run["ckpt"]).info["metadata"]
    assert meta["mask_id"] == run["dm"].mask_id and meta["special_ids"] == run["dm"].special_ids


def test_the_package_carries_tokenizer_and_lm_head(run, tmp_path):
    out = export_checkpoint(run["ckpt"], tmp_path / "pkg", heads=True)
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == read_tokenizer(run["ckpt"])
    assert set(load_head_weights(out)) == {"lm_head"}
    text = "Return the sum of a and b."
    assert load_masked_lm(out).score(text).pll == pytest.approx(load_masked_lm(run["ckpt"]).score(text).pll,
                                                                 rel=1e-9)
    # without --heads the package is still a text encoder with its tokenizer, but cannot score
    bare = export_checkpoint(run["ckpt"], tmp_path / "bare")
    assert (bare / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="no masked-LM head"):
        load_masked_lm(bare)


def test_hf_export_fills_masks_like_our_model_and_autotokenizer_knows_the_roles(run, tmp_path):
    from transformers import AutoTokenizer, RobertaForMaskedLM

    out = export_checkpoint(run["ckpt"], tmp_path / "hf", hf=True, heads=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    dm = run["dm"]
    assert (tok.mask_token, tok.pad_token, tok.cls_token, tok.sep_token, tok.unk_token) == \
           ("<mask>", "<pad>", "<s>", "</s>", "<unk>")
    assert (tok.mask_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == \
           (dm.mask_id, dm.pad_id, dm.bos_id, dm.eos_id)
    hf = RobertaForMaskedLM.from_pretrained(str(out)).eval()
    texts = ["Return the <mask> of a and b.", "Open a <mask> and return a stream.",
             "If the <mask> is not found, raise <mask>.", "<mask> the list in place."]
    batch = tok(texts, padding=True, return_tensors="pt")
    ours = read_checkpoint(run["ckpt"])
    scorer = load_masked_lm(run["ckpt"])
    masked = batch["input_ids"] == tok.mask_token_id
    assert int(masked.sum()) == 5
    with torch.no_grad():
        theirs = hf(**batch).logits[masked]
        enc = ours.encoder.eval()
        h = enc.encode(enc.embed(batch["input_ids"], batch["attention_mask"].sum(1))).last[masked]
        mine = scorer.head(h, enc.frontend.embed.weight)
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_hf_export_of_a_text_encoder_without_heads_has_the_tokenizer(run, tmp_path):
    from transformers import AutoTokenizer

    out = export_checkpoint(run["ckpt"], tmp_path / "hf", hf=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaModel"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "<mask>" and tok.model_max_length == 512
    # the HF tokenizer encodes as our training tokenizer does (same ids, <s> ... </s>)
    text = "Return a new list sorted by key; the original is unchanged."
    assert tok(text)["input_ids"] == load_masked_lm(run["ckpt"]).tokenizer.encode(text).ids


def test_pll_scores_each_token_with_it_masked(run):
    scorer = load_masked_lm(run["ckpt"])
    ids = scorer.token_ids("Return the sum of a and b.")
    per_token = scorer.token_scores("Return the sum of a and b.")
    assert per_token[0] == 0 and per_token[-1] == 0 and (per_token[1:-1] < 0).all()  # specials not scored
    # naive reference: one forward pass per position
    enc, head = scorer.encoder, scorer.head
    for t in (1, len(ids) // 2, len(ids) - 2):
        x = ids.clone()[None]
        x[0, t] = scorer.info.mask_id
        with torch.no_grad():
            logp = torch.log_softmax(head(enc.encode(enc.embed(x)).last[0, t], enc.frontend.embed.weight).double(), -1)
        assert per_token[t].item() == pytest.approx(logp[ids[t]].item(), abs=1e-5)  # fp32 forward
    # batching does not change the scores
    again = pseudo_log_likelihood(enc, head, ids, mask_id=scorer.info.mask_id, special_ids=scorer.info.special_ids,
                                  batch_size=3)
    torch.testing.assert_close(again, per_token, rtol=0, atol=1e-5)


def test_pll_command(run, tmp_path, capsys):
    from omnissl.commands.pll import main

    assert main([str(run["ckpt"]), "--text", "Return the sum of a and b.", "--text", "b a of sum the Return.",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["Return the sum of a and b.", "b a of sum the Return."]
    assert all(r["pll"] < 0 and r["tokens"] > 0 for r in rows)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.ckpt"), "--text", "x"])
    assert e.value.code == 2
    assert "no encoder package or checkpoint" in capsys.readouterr().err


SENTENCES = [
    "Return the sum of the two numbers.",
    "Open the file and return a stream.",
    "If the key is not found, return the default value.",
    "Remove all items from the list.",
    "Return a new list containing all items from the iterable in ascending order.",
    "Raise an exception if the value is not valid.",
]


@pytest.mark.slow
def test_pll_ranks_grammatical_sentences_above_their_shuffles(tmp_path_factory):
    """After a short CPU run on the embedded text (600 updates of 32 x 64 tokens, ~1.5 min on one loaded core;
    masked accuracy ~0.14), the pseudo-log-likelihood of each docstring-like sentence beats the mean over 5
    random shuffles of its words (measured margins 2.4 to 14 nats; at 300 updates they were 0.4 to 12)."""
    from omnissl.datamodules.text import TextDataModule

    root = tmp_path_factory.mktemp("mlm-pll")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dm = TextDataModule(embedded_size="small", vocab_size=1024, block_size=64, batch_size=32, num_workers=0,
                            progress=False)
        model = MaskedLM(tiny("text", vocab_size=1024, dim=128, depth=2),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.98), eps=1e-6))
        L.Trainer(accelerator="cpu", devices=1, max_steps=600, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0,
                  callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)]).fit(model, dm)
        scorer = load_masked_lm(root / "last.ckpt")
        rng = random.Random(0)
        wins = 0
        for s in SENTENCES:
            words = s.rstrip(".").split()
            shuffled = []
            for _ in range(5):
                w = words[:]
                while w == words:
                    rng.shuffle(w)
                shuffled.append(scorer.score(" ".join(w) + ".").pll)
            wins += scorer.score(s).pll > sum(shuffled) / len(shuffled)
    finally:
        torch.set_num_threads(threads)
    assert wins == len(SENTENCES), wins


def test_probe_reads_the_tokenizer_a_checkpoint_carries(run, capsys):
    """`omnissl probe CKPT` on labeled text with no --tokenizer: the checkpoint's own tokenizer is used."""
    from omnissl.commands.probe import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([str(run["ckpt"]), "--train", "embedded:labeled_text:tiny", "--test", "embedded:labeled_text:tiny",
                   "--epochs", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert rc in (0, None), out.err
    assert "probing" in out.out and "pretrained:" in out.out, out.out + out.err
