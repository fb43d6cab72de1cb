"""The text path end to end: a MaskedLM run on the embedded text keeps its tokenizer in the checkpoint, the
omnissl package and the --hf export carry it (AutoTokenizer with its roles set), RobertaForMaskedLM from the
export fills masks as our model does, and pseudo-log-likelihood scoring (eval/pll.py, `omnissl pll`)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.checkpoints import load_head_weights, read_checkpoint, read_tokenizer
from omnissl.eval.export import export_checkpoint
from omnissl.eval.pll import DOCSTRING_SENTENCES, load_masked_lm, pseudo_log_likelihood, shuffle_margins
from omnissl.ssl.mlm import MaskedLM

pytest.importorskip("transformers")


@pytest.fixture()
def run(tiny_mlm_run):
    """40 updates of a tiny MaskedLM on the embedded text (its own 512-entry BPE); one checkpoint (tests/conftest.py,
    shared with tests/objectives/test_mlm.py)."""
    return tiny_mlm_run


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


SENTENCES = DOCSTRING_SENTENCES


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
        wins = sum(m > 0 for m in shuffle_margins(scorer, SENTENCES))
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


# ------------------------------------------------------------------------ labeled text: baseline, fine-tuning


def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def test_text_baseline_is_tfidf_of_the_token_ids_and_logistic_regression(run):
    """`omnissl probe --baseline` on text: TF-IDF of token uni+bigrams fitted on train (the tokens the encoder
    sees) + logistic regression C = 10; the same numbers as scikit-learn run by hand on the same tokens."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from omnissl.eval.probe_data import load_probe_data
    from omnissl.eval.tfidf import tfidf_baseline

    spec = "embedded:labeled_text:tiny"
    data = load_probe_data(spec, spec, spec, tokenizer=str(run["dm"].tokenizer_path))
    scores = tfidf_baseline(data)
    assert scores.name == "TF-IDF + LR baseline" and scores.result.metric == "accuracy"

    def split(name):  # by hand: token ids of every text as words, in dataset order
        ds = data.loaders[name].dataset
        return ([" ".join(map(str, ds[i]["text"].tolist())) for i in range(len(ds))],
                np.array([ds[i]["label"] for i in range(len(ds))]))

    (xtr, ytr), (xva, yva), (xte, yte) = split("train"), split("valid"), split("test")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, token_pattern=r"\S+", lowercase=False)
    clf = LogisticRegression(C=10.0, max_iter=3000).fit(vec.fit_transform(xtr), ytr)
    assert scores.result.test == pytest.approx(clf.score(vec.transform(xte), yte))
    assert scores.result.valid == pytest.approx(clf.score(vec.transform(xva), yva))
    assert scores.result.train == 1.0  # separable: ~1,000 n-grams for 72 texts
    with pytest.raises(ValueError, match="takes text"):
        tfidf_baseline(type(data)("image", data.loaders, data.sources))


def test_probe_command_reports_the_tfidf_baseline_for_text(run, capsys):
    from omnissl.commands.probe import main

    threads = _one_thread()
    try:
        rc = main([str(run["ckpt"]), "--train", "embedded:labeled_text:tiny", "--test", "embedded:labeled_text:tiny",
                   "--epochs", "1", "--device", "cpu", "--baseline"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert rc in (0, None), out.err
    assert "TF-IDF + LR baseline: test accuracy" in out.out, out.out


def _finetune_args(run, *extra):
    return ["-c", "recipes/trainer/cpu.yaml", "-c", "recipes/text/finetune_labeled_text_tiny_cpu.yaml",
            "--model.init_args.pretrained", str(run["ckpt"]),
            "--model.init_args.encoder.init_args.vocab_size", "512", "--model.init_args.encoder.init_args.dim", "64",
            "--model.init_args.encoder.init_args.depth", "2", "--model.init_args.encoder.init_args.dropout", "0.0",
            "--data.init_args.embedded_size", "tiny", "--data.init_args.max_tokens", "64",
            "--trainer.logger", "false", *extra]


def test_finetune_on_labeled_text_takes_the_pretrained_tokenizer_and_trains_the_whole_encoder(run, tmp_path,
                                                                                              monkeypatch):
    """The recipe with only `pretrained` set: the CLI points the labeled-text DataModule at the tokenizer in the
    MLM checkpoint (no flag), the encoder starts from the MLM weights, and a short fine-tune lowers the
    training loss while the token embedding trains too (RoBERTa fine-tunes it; no frozen frontend)."""
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the recipes are relative to the repository
    monkeypatch.setenv("OMNISSL_DATA", str(tmp_path / "data"))  # the linked tokenizer file lands here
    cli = lightning_cli(_finetune_args(run, "--data.init_args.batch_size", "8", "--trainer.max_steps", "27",
                                       "--model.init_args.lr_scheduler.init_args.warmup_steps", "3",
                                       "--model.init_args.optimizer.init_args.lr", "2e-3"), run=False)
    model, dm = cli.model, cli.datamodule
    assert Path(dm.tokenizer).read_text(encoding="utf-8") == read_tokenizer(run["ckpt"])
    assert Path(dm.tokenizer).is_relative_to(tmp_path / "data")
    for name, p in run["model"].encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], p), name
    embed0 = model.encoder.frontend.embed.weight.detach().clone()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    threads = _one_thread()
    try:
        torch.manual_seed(0)
        L.Trainer(accelerator="cpu", max_steps=27, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[Record()]).fit(model, dm)
    finally:
        torch.set_num_threads(threads)
    assert dm.vocab_size == 512 and model.num_classes == len(dm.classes) == 9
    first, last = sum(losses[:9]) / 9, sum(losses[-9:]) / 9  # the first and the last of 3 epochs of 72 texts
    print(f"text fine-tune loss: first epoch {first:.3f}, third epoch {last:.3f}")  # measured 2.42 -> 2.16
    assert first > 1.9  # about log(9) = 2.2 at the start
    assert last < first - 0.15
    assert not torch.equal(model.encoder.frontend.embed.weight.detach(), embed0)


def test_finetune_refuses_a_tokenizer_other_than_the_pretrained_one(run):
    """Library use without the CLI link: a LabeledTextDataModule that trained its own tokenizer would give the
    pretrained embedding other token ids; setup refuses it before any update, naming the tokenizer."""
    from omnissl.datamodules.labeled import LabeledTextDataModule
    from omnissl.eval.finetune import UtteranceClassifier

    model = UtteranceClassifier(tiny("text", vocab_size=512, dim=64, depth=2), num_classes=9, modality="text",
                                pretrained=str(run["ckpt"]), freeze_frontend_steps=0)
    own = LabeledTextDataModule(embedded_size="tiny", vocab_size=512, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="not the tokenizer the pretrained encoder was trained with"):
        trainer.fit(model, own)
    assert model.global_step == 0
    bigger = LabeledTextDataModule(embedded_size="tiny", vocab_size=1024, batch_size=8)
    bare = UtteranceClassifier(tiny("text", vocab_size=512, dim=64, depth=2), num_classes=9, modality="text",
                               freeze_frontend_steps=0)
    with pytest.raises(ValueError, match="embeds only 512"):
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(bare, bigger)
