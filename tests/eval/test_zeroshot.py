"""`omnissl zeroshot` and the CLAP exports: a CLAP checkpoint of a real (2-step) fit on the tiny embedded captioned
corpus, evaluated from the checkpoint and from its package (same numbers), the audio tower exported alone, and
the report files."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from omnissl.backbones import builders
from omnissl.checkpoints import load_encoder
from omnissl.datamodules.audio_text import AudioTextDataModule
from omnissl.eval.export import export_checkpoint
from omnissl.eval.zeroshot import load_clap
from omnissl.ssl.clap import CLAP


@pytest.fixture(scope="module")
def clap_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("clap")
    torch.manual_seed(0)
    dm = AudioTextDataModule(train="embedded:captions", embedded_size="tiny", vocab_size=320, min_frequency=1,
                             max_samples=32000, batch_size=6, num_workers=0)
    model = CLAP(builders.tiny("spectrogram", dim=32, depth=1), builders.tiny("text", dim=32, depth=1, vocab_size=320),
                 dim=16, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, limit_val_batches=1,
                        val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(model, dm)
    path = root / "clap.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_main(argv, capsys):
    from omnissl.commands.zeroshot import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out.splitlines()[0]), out


def test_zeroshot_from_checkpoint_and_package_agree(clap_ckpt, tmp_path, capsys):
    report = tmp_path / "report"
    got, out = run_main([str(clap_ckpt), "--data", "embedded:captions:tiny", "--json", "--report", str(report)],
                        capsys)
    for key in ("a2t_R@1", "a2t_R@5", "a2t_R@10", "t2a_R@1", "a2t_mAP@10", "t2a_mAP@10", "zeroshot_acc",
                "zeroshot_acc_heldout", "zeroshot_acc_seen", "zeroshot_chance", "zeroshot_acc_heldout_among_heldout",
                "zeroshot_chance_among_heldout"):
        assert key in got and 0.0 <= got[key] <= 1.0, key
    assert got["zeroshot_chance"] == pytest.approx(1 / 14)
    assert got["zeroshot_chance_among_heldout"] == pytest.approx(1 / 3)  # the classic setting: 3 held-out classes
    assert "RESULT name=zeroshot" in out
    md = (report / "zeroshot.md").read_text()
    assert "Classic zero-shot" in md and "Winning class" in md
    assert "held-out classes" in md and "low pure tone" in md and (report / "zeroshot_similarity.png").stat().st_size > 0
    # the package (both towers, projections, logit scale, tokenizer) gives the same numbers
    package = export_checkpoint(clap_ckpt, tmp_path / "pkg", heads=True)
    again, _ = run_main([str(package), "--data", "embedded:captions:tiny", "--json"], capsys)
    assert again == pytest.approx(got, abs=1e-6)
    a, _ = load_clap(clap_ckpt)
    b, tok = load_clap(package)
    assert tok is not None and torch.equal(a.logit_scale.value, b.logit_scale.value)


def test_audio_tower_exports_alone_as_any_encoder(clap_ckpt, tmp_path):
    out = export_checkpoint(clap_ckpt, tmp_path / "audio")
    encoder = load_encoder(out)
    model, _ = load_clap(clap_ckpt)
    x = torch.randn(2, 16000) * 0.1
    assert torch.allclose(encoder.eval()(x).last, model.encoder(x).last, atol=1e-6)
    assert not (out / "tokenizer.json").exists()  # the caption tokenizer belongs to the text tower
    assert load_encoder(clap_ckpt).dim == 32


def test_zeroshot_refuses_an_audio_tower_and_a_bad_prompt(clap_ckpt, tmp_path, capsys):
    from omnissl.commands.zeroshot import main

    out = export_checkpoint(clap_ckpt, tmp_path / "audio")
    with pytest.raises(SystemExit) as e:
        main([str(out)])
    assert e.value.code == 2 and "not a CLAP package" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(clap_ckpt), "--prompt", "no label here"])
    assert e.value.code == 2


def test_class_auc_on_a_hand_computed_example():
    """Per-class ROC AUC of the prompt scores: pairs (clip of the class, other clip) ranked right count 1, ties
    1/2; a score that ignores the audio (here constant for class 1) gets 0.5, however the argmax falls."""
    from omnissl.eval.zeroshot import class_auc

    scores = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.5, 0.1], [0.2, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: (0.9 > 0.5) (0.9 > 0.2) (0.2 < 0.5) (0.2 = 0.2): 2.5 / 4
    assert class_auc(scores, labels) == {0: 0.625, 1: 0.5}
