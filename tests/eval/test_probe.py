"""Probes of frozen encoders: featurizer, frozen upstream, label checks, CTC, CLI and report, real data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from omnissl.backbones import builders
from omnissl.batch import Batch
from omnissl.datamodules.audio_io import AudioDataError
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.commands.probe import main
from omnissl.eval.ctc import CharVocab, attach_transcripts, greedy_decode, read_transcripts
from omnissl.eval.featurizer import CTCHead, Featurizer
from omnissl.eval.probe import extract_splits, fit_classifier, fit_ctc, run_probe
from omnissl.eval.probe_data import load_probe_data, source_modality
from omnissl.eval.report import log_report, write_report
from omnissl.eval.results import ProbeResult, UpstreamScores
from omnissl.eval.upstream import (EncoderStates, Features, LogMelStates, baseline_states, extract, frozen,
                                   layer_normalize, reinitialized)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OMNISSL_DATA", str(tmp_path_factory.getbasetemp() / "omnissl-data"))


@pytest.fixture(autouse=True)
def one_thread():
    """Probe heads are tiny: intra-op threads only add overhead, which grows tenfold when the cores are
    shared (OpenMP workers spin-waiting), so these tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_manifest(path: Path, root: Path, rows: list[list[str]]) -> Path:
    path.write_text("\n".join([str(root)] + ["\t".join(r) for r in rows]) + "\n")
    return path


def speakers_subset(tmp_path: Path, per_split: dict[str, int]) -> dict[str, Path]:
    """Labeled manifests holding the first n lines of each split of the tiny speakers corpus (real audio)."""
    out = {}
    for split, n in per_split.items():
        root, rows = read_manifest(embedded_corpus("embedded:speakers:tiny", size="default")[split])
        keep = [r for r in rows if r[2] in ("m1", "f1", "klatt")][:n]
        out[split] = write_manifest(tmp_path / f"{split}.tsv", root, keep)
    return out


# ------------------------------------------------------------------------------------------------ featurizer


def test_featurizer_weights_start_uniform_sum_to_one_and_learn():
    feat = Featurizer(5, 8)
    w = feat.weights()
    assert torch.allclose(w, torch.full((5,), 0.2)) and float(w.sum()) == pytest.approx(1.0)
    hs = torch.randn(4, 7, 5, 8)
    feat.fit_statistics(hs.flatten(0, 1))
    z = (hs - hs.flatten(0, 1).mean(0)) / hs.flatten(0, 1).std(0, unbiased=False)
    torch.testing.assert_close(feat(hs), z.mean(2), atol=1e-5, rtol=1e-5)  # uniform weights: the mean state
    feat(hs).pow(2).sum().backward()
    assert feat.logits.grad is not None and feat.logits.grad.abs().sum() > 0
    with torch.no_grad():
        feat.logits.copy_(torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0]))
    assert float(feat.weights().sum()) == pytest.approx(1.0)
    torch.testing.assert_close(feat(hs), torch.einsum("bnsd,s->bnd", z, feat.weights()), atol=1e-5, rtol=1e-5)
    fixed = Featurizer(5, 8, layer=-1)
    fixed.fit_statistics(hs.flatten(0, 1))
    assert fixed.weights().tolist() == [0, 0, 0, 0, 1] and not fixed.logits.requires_grad
    torch.testing.assert_close(fixed(hs), z[:, :, 4], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        Featurizer(5, 8, layer=5)


def test_pooling_before_the_weighted_sum_equals_pooling_after():
    """The cache pools each state first; valid because the featurizer is linear after fixed normalizations."""
    hs = layer_normalize(torch.randn(3, 10, 4, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None])
    valid = torch.arange(10)[None] < torch.tensor([10, 6, 3])[:, None]
    feat = Featurizer(4, 6)
    feat.fit_statistics(torch.randn(50, 4, 6) * 2 + 1)
    with torch.no_grad():
        feat.logits.copy_(torch.tensor([0.3, -2.0, 1.0, 0.1]))
    w = valid.float()[..., None]
    after = (feat(hs) * w).sum(1) / w.sum(1)
    pooled = (hs * w[..., None]).sum(1) / w[..., None].sum(1)
    torch.testing.assert_close(feat(pooled), after, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- frozen upstream


def test_frozen_encoder_gets_no_gradient_and_runs_without_layerdrop():
    enc = builders.tiny("audio", layerdrop=0.5, dropout=0.1)  # train mode: layers and units would drop
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    dm = SyntheticDataModule(modality="audio", train_size=8, valid_size=4, batch_size=4, num_classes=4)
    with frozen(enc):
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
        a = extract(EncoderStates(enc), dm.train_dataloader())
        b = extract(EncoderStates(enc), dm.train_dataloader())
        test = extract(EncoderStates(enc), dm.val_dataloader())
    torch.testing.assert_close(a.x, b.x)  # deterministic: no layerdrop, no dropout
    result = fit_classifier(a, None, test, epochs=3)
    assert enc.training and all(p.requires_grad for p in enc.parameters())  # restored
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert len(result.layer_weights) == 3
    with pytest.raises(RuntimeError, match="needs a frozen encoder"):
        EncoderStates(enc)(next(iter(dm.train_dataloader())))
    with pytest.raises(RuntimeError, match="parameter trunk.* received a gradient"):
        with frozen(enc):
            p = next(enc.trunk.parameters())
            p.grad = torch.zeros_like(p)


def test_pooled_features_ignore_padding_and_need_no_grad():
    enc = builders.tiny("audio")
    dm = SyntheticDataModule(modality="audio", train_size=8, batch_size=4)
    with frozen(enc):
        feats = extract(EncoderStates(enc), dm.train_dataloader())
    assert feats.x.shape == (8, 3, 64) and feats.labels.shape == (8,)
    assert all(p.grad is None for p in enc.parameters()) and enc.training
    # one padded utterance pooled alone equals its pooling inside the padded batch
    batch = next(iter(dm.train_dataloader()))
    i = int(batch.lengths["audio"].argmin())
    n = int(batch.lengths["audio"][i])
    alone = Batch({"audio": batch.inputs["audio"][i:i + 1, :n]}, targets={"label": batch.targets["label"][i:i + 1]},
                  ids=batch.ids[i:i + 1])
    with frozen(enc):
        f_alone = extract(EncoderStates(enc), [alone]).x
        f_batch = extract(EncoderStates(enc), [batch]).x
    j = int((batch.ids.sort().values == batch.ids[i]).nonzero())  # features come back in id order
    torch.testing.assert_close(f_alone[0], f_batch[j], atol=1e-4, rtol=1e-4)


def test_random_init_rebuilds_the_same_architecture_from_a_seed():
    enc = builders.tiny("audio")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)  # "pretrained"
    a, b = reinitialized(enc, seed=3), reinitialized(enc, seed=3)
    assert repr(a) == repr(enc)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.trunk.blocks[0].attn.qkv.weight, enc.trunk.blocks[0].attn.qkv.weight)
    c = reinitialized(enc, seed=4)
    assert not torch.equal(a.trunk.blocks[0].attn.qkv.weight, c.trunk.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------------------ bad input


def test_unseen_test_label_and_missing_labels_name_file_and_label(tmp_path):
    paths = speakers_subset(tmp_path, {"train": 6, "test": 3})
    root, rows = read_manifest(paths["test"])
    rows[1][2] = "grandpa"  # a voice the training split never has
    bad_test = write_manifest(tmp_path / "bad_test.tsv", root, rows)
    with pytest.raises(AudioDataError, match=rf"{re.escape(str(bad_test))}: labels \['grandpa'\]"):
        load_probe_data(str(paths["train"]), str(bad_test))
    unlabeled = write_manifest(tmp_path / "unlabeled.tsv", root, [r[:2] for r in rows])
    with pytest.raises(ValueError, match=rf"{re.escape(str(unlabeled))}: no labels .* test split"):
        load_probe_data(str(paths["train"]), str(unlabeled))
    with pytest.raises(ValueError, match=rf"{re.escape(str(unlabeled))}: no labels .* train split"):
        load_probe_data(str(unlabeled), str(paths["test"]))
    folder = root / "wav" / "test"  # a folder of audio files: detected as audio, and it carries no labels
    assert source_modality(str(folder)) == "audio" and source_modality(str(paths["train"])) == "audio"
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: no labels"):
        load_probe_data(str(paths["train"]), str(folder))
    # text: the labeled DataModule's own checks, reached through the probe
    (tmp_path / "tr.jsonl").write_text('{"text": "a b c", "label": "x"}\n{"text": "d e f", "label": "y"}\n')
    (tmp_path / "te.jsonl").write_text('{"text": "a b", "label": "z"}\n')
    with pytest.raises(ValueError, match=r"te.jsonl: label 'z' does not occur in the training split"):
        load_probe_data(str(tmp_path / "tr.jsonl"), str(tmp_path / "te.jsonl"))
    # features built elsewhere: the probe itself names the split's source
    tr = Features(torch.randn(4, 1, 2), torch.arange(4), torch.tensor([0, 1, 0, 1]), source="train.tsv")
    te = Features(torch.randn(2, 1, 2), torch.arange(2), torch.tensor([3, 0]), source="test.tsv")
    with pytest.raises(ValueError, match=r"test.tsv: test labels \[3\] never occur in the training split"):
        fit_classifier(tr, None, te)


# ------------------------------------------------------------------------------------------------------ CTC


def test_vocab_and_greedy_decoding_by_hand():
    vocab = CharVocab.from_transcripts(["A B | B A |", "C |"])
    assert vocab.symbols == ["<blank>", "A", "B", "C", "|"]
    assert vocab.encode("B A |").tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match=r"test.ltr:3: character 'Z' does not occur"):
        vocab.encode("Z |", "test.ltr:3")
    path = torch.tensor([[1, 1, 0, 1, 2, 2, 4, 0, 3, 3, 0, 0],  # A A _ A B B | _ C C _ _ -> "AAB|C"
                         [3, 0, 3, 4, 4, 1, 1, 1, 1, 1, 1, 1]])  # C _ C | | then padding
    lp = torch.nn.functional.one_hot(path, 5).float().log_softmax(-1)
    ids = greedy_decode(lp, torch.tensor([12, 4]))
    assert ids == [[1, 1, 2, 4, 3], [3, 3, 4]]
    assert [vocab.text(x) for x in ids] == ["AAB C", "CC"]


def test_lstm_ctc_head_ignores_padding():
    head = CTCHead(6, 5, "lstm", hidden=8).eval()
    x = torch.randn(2, 9, 6)
    lengths = torch.tensor([9, 4])
    both = head(x, lengths)
    alone = head(x[1:, :4], lengths[1:])
    torch.testing.assert_close(both[1, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(both.exp().sum(-1), torch.ones(2, 9))


@pytest.fixture(scope="module")
def speech_tiny(tmp_path_factory) -> Path:
    """The tiny embedded speech corpus with transcripts (generated once per test session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNISSL_DATA", str(tmp_path_factory.getbasetemp() / "omnissl-data"))
        return embedded_corpus("embedded:tiny", size="default")["train"].parent


def test_ctc_head_overfits_two_real_utterances_exactly(speech_tiny):
    data = load_probe_data("embedded:tiny", "embedded:tiny", task="ctc", batch_size=4)
    torch.manual_seed(0)
    enc = builders.tiny("audio")
    with frozen(enc):
        feats, vocab = extract_splits(EncoderStates(enc), data, task="ctc")
    tr = feats["train"]
    two = Features(tr.x[:2], tr.ids[:2], texts=tr.texts[:2], targets=tr.targets[:2], source=tr.source)
    assert all(len(t) > 20 for t in two.texts) and two.texts[0] != two.texts[1]
    result = fit_ctc(two, None, two, vocab, head="linear", epochs=300, lr=3e-2, batch_size=2)
    assert result.test == 0.0 and result.extra["wer"] == 0.0  # greedy decoding gives both transcripts exactly
    assert len(vocab) > 20 and vocab.symbols[0] == "<blank>"


def test_transcripts_follow_the_manifest_rows(speech_tiny, tmp_path):
    src, lines = read_transcripts(speech_tiny / "valid.tsv")
    assert src.suffix == ".ltr" and len(lines) == 2
    wrd_only = tmp_path / "x.tsv"
    wrd_only.write_text("")
    (tmp_path / "x.wrd").write_text("HI THERE\nOK\n")
    assert read_transcripts(wrd_only)[1] == ["H I | T H E R E |", "O K |"]
    with pytest.raises(FileNotFoundError, match=r"y.tsv: no transcripts .*y.ltr or y.wrd"):
        read_transcripts(tmp_path / "y.tsv")
    f = Features([torch.zeros(3, 1, 2)] * 2, torch.tensor([0, 1]))
    attach_transcripts(f, ["A |", "B C |"], "t.ltr", rows=[1, 0])
    assert f.texts == ["BC", "A"] and f.targets is None


# ------------------------------------------------------------------------------------------- real data, CLI


def test_logmel_probe_beats_chance_on_embedded_speakers():
    """20 voices (chance 0.05), test accents never heard in training: mean-pooled log-mel measured 0.45. (The
    default baseline adds the std, 128 dims: on the 60 training clips of `tiny` it overfits, 0.20; on `small`
    the two tie on speakers, 0.807 vs 0.811, and mean + std wins on keywords, bench/baseline_speech.py.)"""
    data = load_probe_data("embedded:speakers:tiny", "embedded:speakers:tiny", "embedded:speakers:tiny")
    assert len(data.classes) == 20
    scores = run_probe(LogMelStates(std=False), data, "log-mel")
    assert scores.result.test > 0.25, scores.result
    assert scores.result.layer_weights == [1.0]


def test_image_and_text_probes_take_the_modality_from_the_data():
    data = load_probe_data("embedded:labeled_images:tiny", "embedded:labeled_images:tiny", image_size=8)
    assert data.modality == "image" and len(data.classes) == 10
    enc = builders.tiny("image")
    scores = run_probe(EncoderStates(enc), data, "random tiny ViT")
    assert scores.result.test > 0.4 and len(scores.result.layer_weights) == 3  # chance 0.1; measured 0.78
    assert run_probe(baseline_states("image"), data, "pixels").result.test > 0.8  # measured 0.95
    text = load_probe_data("embedded:labeled_text:tiny", "embedded:labeled_text:tiny", batch_size=32)
    assert text.modality == "text"
    scores = run_probe(EncoderStates(builders.tiny("text", vocab_size=text.vocab_size)), text, "t", epochs=5)
    assert 0.0 <= scores.result.test <= 1.0 and len(scores.result.layer_weights) == 3


def test_cli_prints_accuracy_last_and_writes_report(tmp_path, capsys, monkeypatch):
    import wandb

    from omnissl.checkpoints import save_backbone

    paths = speakers_subset(tmp_path, {"train": 9, "valid": 3, "test": 6})
    torch.manual_seed(0)
    save_backbone(builders.tiny("audio"), tmp_path / "enc")
    report = tmp_path / "report"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # --wandb then says so and starts no run

    def no_run(*args, **kwargs):
        raise AssertionError("wandb.init called under WANDB_MODE=disabled")

    monkeypatch.setattr(wandb, "init", no_run)
    code = main([str(tmp_path / "enc"), "--train", str(paths["train"]), "--valid", str(paths["valid"]),
                 "--test", str(paths["test"]), "--random-init", "--baseline", "--report", str(report),
                 "--epochs", "5", "--device", "cpu", "--wandb"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "WANDB_MODE=disabled: not logging the report to W&B" in lines
    assert not (report / "wandb").exists()
    assert re.fullmatch(r"test accuracy: (0|1)\.\d{4}", lines[-1]), lines[-1]
    first = next(line for line in lines if line.startswith("pretrained: test accuracy"))
    assert f"test accuracy {lines[-1].split(': ')[1]}" in first  # the last line is the pretrained encoder's
    md = (report / "probe.md").read_text()
    for row in ("| pretrained |", "| random init |", "| log-mel baseline |", "| 0 |", "| 2 |"):
        assert row in md
    png = (report / "probe_layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_probes_a_lightning_checkpoint_as_its_exported_package(tmp_path, capsys):
    """`omnissl probe` takes an objective's checkpoint directly (omnissl.checkpoints.load_encoder, weights only):
    the same encoder, so the same test accuracy as the package `omnissl export` writes of it."""
    import lightning as L

    from omnissl.checkpoints import read_checkpoint, save_backbone
    from omnissl.ssl.wav2vec2 import Wav2Vec2

    paths = speakers_subset(tmp_path, {"train": 9, "test": 6})
    torch.manual_seed(0)
    model = Wav2Vec2(builders.tiny("audio"), num_distractors=5, codebook_entries=8)
    dm = SyntheticDataModule(modality="audio", train_size=4, valid_size=2, batch_size=2, min_samples=8000,
                             max_samples=12000)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "w2v.ckpt")
    save_backbone(read_checkpoint(tmp_path / "w2v.ckpt").encoder, tmp_path / "pkg")
    last = []
    for encoder in (tmp_path / "w2v.ckpt", tmp_path / "pkg"):
        assert main([str(encoder), "--train", str(paths["train"]), "--test", str(paths["test"]), "--epochs", "3",
                     "--device", "cpu"]) == 0
        last.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert last[0] == last[1] and last[0].startswith("test accuracy: ")


def test_cli_ctc_prints_cer_last(speech_tiny, tmp_path, capsys):
    from omnissl.checkpoints import save_backbone

    save_backbone(builders.tiny("audio"), tmp_path / "enc")
    assert main([str(tmp_path / "enc"), "--train", "embedded:tiny", "--test", "embedded:tiny", "--task", "ctc",
                 "--head", "linear", "--epochs", "2", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"test CER: \d\.\d{4}", last), last


def test_omnissl_cli_dispatches_probe(capsys):
    from omnissl.cli import main as omnissl_main

    with pytest.raises(SystemExit) as e:
        omnissl_main(["probe", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: omnissl probe") and "--random-init" in out


def test_cli_refuses_bad_combinations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--train", "x", "--test", "y", "--task", "ctc", "--head", "mlp"])
    assert "--head mlp does not fit --task ctc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--train", "x", "--test", "y", "--wandb"])
    assert "--wandb logs the report" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope"), "--train", "embedded:speakers:tiny", "--test", "embedded:speakers:tiny"])
    assert e.value.code == 2 and "no encoder package or checkpoint at" in capsys.readouterr().err


def test_report_is_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    res = lambda t: ProbeResult("accuracy", t, t, 1.0, [0.2, 0.3, 0.5], 3)  # noqa: E731
    rows = [UpstreamScores("pretrained", res(0.8), [res(0.5), res(0.6), res(0.7)]),
            UpstreamScores("log-mel baseline", ProbeResult("accuracy", 0.4, 0.4, 0.9, [1.0], 2))]
    paths = write_report(rows, tmp_path, title="t")
    assert wandb.run is None and log_report(rows, paths) is False  # no active run: nothing logged
    run = wandb.init(project="omnissl-test", dir=str(tmp_path), mode="offline")
    try:
        assert log_report(rows, paths)
        assert run.summary["probe/pretrained/test_accuracy"] == pytest.approx(0.8)
        assert {"probe/table", "probe/layers"} <= set(run.summary.keys())
        media = Path(run.dir) / "media"  # written by the client when logged (the .wandb stream is asynchronous)
        table = json.loads(next(media.glob("table/probe/table_*.table.json")).read_text())
        image = next(media.glob("images/probe/layers_*.png")).read_bytes()
    finally:
        run.finish()
    assert table["columns"] == ["upstream", "layer", "metric", "test", "valid", "weight"]
    assert ["pretrained", "2", "accuracy", 0.7, 0.7, 0.5] in table["data"]
    assert ["log-mel baseline", "weighted", "accuracy", 0.4, 0.4, None] in table["data"]
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
