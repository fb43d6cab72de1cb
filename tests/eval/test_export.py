"""Encoder packages, checkpoint export and the `omnissl export` command (omnissl/eval/export.py).

Packages must rebuild bit-identical encoders for every frontend, refuse edited or mismatched files naming
the option or key, and never unpickle anything; `omnissl export` runs on a checkpoint written by a real
2-step `omnissl fit`; an audio --hf export works through AutoFeatureExtractor + AutoModel; `omnissl features`
dumps what the encoder computes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnissl.backbones.builders import tiny
from omnissl.backbones.encoder import Encoder
from omnissl.cli import main
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.checkpoints import load_backbone, load_head_weights, read_checkpoint, save_backbone
from omnissl.eval.export import export_checkpoint
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.heads import MaskedLMHead
from omnissl.ssl.mae import MAE
from omnissl.ssl.wav2vec2 import Wav2Vec2

ROOT = Path(__file__).resolve().parents[2]
OMNISSL = str(Path(sys.executable).parent / "omnissl")


def _perturb(module: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _input(modality: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    if modality in ("audio", "spectrogram"):
        return torch.randn(2, 8000, generator=g), torch.tensor([8000, 6000])
    if modality == "text":
        ids = torch.randint(4, 1024, (2, 12), generator=g)
        ids[1, 9:] = 1  # right padding with the pad id
        return ids, None
    return torch.randn(2, 3, 16, 16, generator=g), None


def _assert_same_outputs(a: Encoder, b: Encoder, modality: str) -> None:
    x, lengths = _input(modality)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a(x, lengths), b(x, lengths)
    assert len(out_a.layers) == len(out_b.layers) == a.num_layers + 1
    for i, (p, q) in enumerate(zip(out_a.layers, out_b.layers)):
        assert torch.equal(p, q), f"layer {i} differs"
    assert torch.equal(out_a.last, out_b.last)


# ---------------------------------------------------------------------------------------------------------
# Packages


@pytest.mark.parametrize("modality, pre_norm", [("audio", False), ("audio", True), ("spectrogram", True),
                                                ("text", False), ("image", True)])
def test_package_round_trip_is_bit_identical(tmp_path, modality, pre_norm):
    enc = _perturb(tiny(modality, pre_norm=pre_norm, dropout=0.1, dim=96 if modality == "audio" else 64))
    head = _perturb(nn.Linear(enc.dim, 7), seed=2)
    save_backbone(enc, tmp_path, heads={"head": head})
    loaded = load_backbone(tmp_path)
    assert type(loaded.frontend) is type(enc.frontend) and repr(loaded) == repr(enc)
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _assert_same_outputs(enc, loaded, modality)
    heads = load_head_weights(tmp_path)
    assert set(heads) == {"head"} and all(torch.equal(heads["head"][k], v) for k, v in head.state_dict().items())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["heads"] == {"head": "torch.nn.modules.linear.Linear"}
    assert config["info"]["num_layers"] == enc.num_layers


def test_package_without_heads_holds_only_the_encoder(tmp_path):
    enc = tiny("text")
    save_backbone(enc, tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys == {f"encoder.{k}" for k in enc.state_dict()}
    assert "encoder.frontend.embed.weight" in keys
    assert load_head_weights(tmp_path) == {}


def test_hf_imported_encoder_round_trips(tmp_path):
    """Built by a converter (feature_norm_eps from the HF config, frozen grid positions), not a builder."""
    transformers = pytest.importorskip("transformers")
    from omnissl.eval.hf.vit import encoder_from_hf_vit

    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, mask_ratio=0.0)
    enc = encoder_from_hf_vit(_perturb(transformers.ViTMAEModel(cfg)))
    assert not enc.positions.weight.requires_grad  # a perturbed (not sin-cos) frozen table
    save_backbone(enc, tmp_path)
    loaded = load_backbone(tmp_path)
    assert loaded.positions.grid == (4, 4) and not loaded.positions.weight.requires_grad
    _assert_same_outputs(enc, loaded, "image")


def test_save_refuses_an_encoder_changed_after_construction(tmp_path):
    enc = tiny("audio")
    enc.feature_norm.eps = 1e-3
    with pytest.raises(ValueError, match=r"changed after construction.*eps=0\.001"):
        save_backbone(enc, tmp_path)
    with pytest.raises(ValueError, match="head name"):
        save_backbone(tiny("audio"), tmp_path, heads={"a.b": nn.Linear(2, 2)})


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors import safe_open

    path = str(folder / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.fixture
def package(tmp_path) -> Path:
    save_backbone(tiny("audio"), tmp_path / "pkg")
    return tmp_path / "pkg"


def test_edited_config_names_the_option(package):
    config = json.loads((package / "config.json").read_text())
    config["encoder"]["args"]["trunk"]["args"]["eps"] = 1e-6
    (package / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"encoder\.args\.trunk\.args\.eps is 1e-06 but the weights were exported "
                                         r"with 1e-05"):
        load_backbone(package)


def test_consistently_tampered_config_still_fails_on_the_weights(package):
    """An attacker (or a bad script) that rewrites config.json *and* the metadata copy gets no further than the
    constructor checks and the strict weight check."""
    def tamper(edit):
        config = json.loads((package / "config.json").read_text())
        edit(config)
        (package / "config.json").write_text(json.dumps(config))
        described = json.dumps({"encoder": config["encoder"], "heads": config["heads"]})
        path = str(package / "model.safetensors")
        save_file(load_file(path), path, metadata={"format": "omnissl-backbone", "config": described})

    tamper(lambda c: c["encoder"]["args"]["trunk"]["args"].update(depth=3))
    with pytest.raises(ValueError, match=r"missing keys \['trunk\.blocks\.2\."):
        load_backbone(package)
    tamper(lambda c: c["encoder"].update({"class": "subprocess.Popen"}))
    with pytest.raises(ValueError, match=r"encoder\.class='subprocess\.Popen'"):
        load_backbone(package)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.pop("encoder.trunk.norm.bias"), r"missing keys \['trunk\.norm\.bias'\]"),
        (lambda t: t.update({"encoder.extra": torch.zeros(1)}), r"unexpected keys \['extra'\]"),
        (lambda t: t.update({"heads.x.w": torch.zeros(1)}), r"unexpected keys \['heads\.x\.w'\]"),
        (lambda t: t.update({"encoder.mask_emb": torch.zeros(3)}), r"key 'mask_emb' has shape \(3,\)"),
    ],
)
def test_weights_that_do_not_match_name_the_key(package, edit, needle):
    _rewrite_weights(package, edit)
    with pytest.raises(ValueError, match=needle):
        load_backbone(package)


def test_missing_or_foreign_files_fail_clearly(tmp_path, package):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_backbone(tmp_path)
    (package / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="format=None, expected 'omnissl-backbone'"):
        load_backbone(package)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_loading_never_unpickles_code(tmp_path, package):
    marker = tmp_path / "pwned"
    torch.save({"encoder.trunk.norm.weight": _Payload(marker)}, package / "model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_backbone(package)
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "omnissl": {"encoder": {}}, "callbacks": _Payload(marker)}, ckpt)
    with pytest.raises(ValueError, match="refused to load.*weights_only"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_checkpoint_without_encoder_description_is_explained(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="no encoder description"):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints keep what continued pretraining needs


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw)


OBJECTIVES = {
    "wav2vec2": (lambda: Wav2Vec2(tiny("audio"), num_distractors=5, codebook_entries=8), "audio", ("quantizer.",)),
    "data2vec": (lambda: Data2Vec(tiny("audio"), top_k=2), "audio", ("teacher.",)),
    "mae": (lambda: MAE(tiny("image"), decoder_dim=32, decoder_depth=1, decoder_heads=4), "image", ("decoder.",)),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_resuming_restores_the_objectives_own_modules(tmp_path, name):
    make, modality, prefixes = OBJECTIVES[name]
    data = dict(modality=modality, batch_size=2, train_size=8)
    model = make()
    t = _trainer(tmp_path, max_steps=2)
    t.fit(model, SyntheticDataModule(**data))
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith(prefixes) for k in saved)

    fresh = make()
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.state_dict().items() if k.startswith(prefixes))
    _trainer(tmp_path, max_steps=2).fit(fresh, SyntheticDataModule(**data), ckpt_path=path)  # restore, 0 steps
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), f"{k} not restored"
    info = torch.load(path, weights_only=True)["omnissl"]
    assert info["objective"] == f"{type(model).__module__}.{type(model).__name__}"
    assert set(info["heads"]) == {n for n, _ in model.named_children()} - {"encoder"}


# ---------------------------------------------------------------------------------------------------------
# omnissl export on a checkpoint written by `omnissl fit`

SYNTHETIC_AUDIO = """\
data:
  class_path: omnissl.datamodules.synthetic.SyntheticDataModule
  init_args: {modality: audio, batch_size: 4, train_size: 8, valid_size: 4, min_samples: 8000, max_samples: 12000}
"""


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """last.ckpt of a 2-step `omnissl fit` of the tiny wav2vec 2.0 recipe, with wav2vec 2.0's conv extractor (the
    frontend transformers' Wav2Vec2Model has), on synthetic audio."""
    root = tmp_path_factory.mktemp("fit")
    (root / "data.yaml").write_text(SYNTHETIC_AUDIO)
    _run([OMNISSL, "fit", "-c", str(ROOT / "recipes/trainer/debug.yaml"), "-c",
          str(ROOT / "recipes/audio/wav2vec2_tiny_cpu.yaml"), "-c", "data.yaml", "--trainer.max_steps", "2",
          "--model.init_args.encoder.init_args.audio_frontend", "conv",
          "--model.init_args.lr_scheduler.init_args.warmup_steps", "1",  # the schedule follows max_steps
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"], cwd=root)
    return next(root.glob("runs/debug/**/last.ckpt"))


def test_export_command_writes_a_package_of_the_trained_encoder(fitted, tmp_path):
    out = _run([OMNISSL, "export", str(fitted), str(tmp_path / "pkg"), "--heads"], cwd=tmp_path)
    assert "wrote omnissl package" in out.stdout
    state = torch.load(fitted, weights_only=True)["state_dict"]
    enc = load_backbone(tmp_path / "pkg")
    assert enc.dim == 128 and enc.num_layers == 4  # the recipe's encoder, not a default
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[f"encoder.{k}"]), k
    heads = load_head_weights(tmp_path / "pkg")
    assert set(heads) == {"quantizer", "project_q", "final_proj"}
    assert torch.equal(heads["quantizer"]["codebook"], state["quantizer.codebook"])
    _assert_same_outputs(enc, read_checkpoint(fitted).encoder, "audio")


def test_export_command_writes_a_transformers_directory(fitted, tmp_path):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as e:
        main(["export", str(fitted), str(tmp_path / "hf"), "--hf", "--heads"])
    assert e.value.code == 0
    hf = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.omnissl_gumbel_temperature == pytest.approx(2.0 * 0.995**2)  # τ of the next update
    assert hf.config.num_negatives == 50 and hf.config.feat_quantizer_dropout == 0.1
    enc = read_checkpoint(fitted).encoder.eval()
    x = torch.randn(2, 6400, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        out = enc(x)
    for i, (mine, theirs) in enumerate(zip(out.layers, ref.hidden_states, strict=True)):  # post-LN: same convention
        assert (mine - theirs).abs().max() <= 1e-4, f"layer {i}"
    state = torch.load(fitted, weights_only=True)["state_dict"]
    with torch.no_grad():
        projected = torch.nn.functional.linear(out.last, state["final_proj.weight"], state["final_proj.bias"])
    assert (projected - ref.projected_states).abs().max() <= 1e-4


def test_export_command_refuses_what_it_cannot_do(fitted, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["export", str(fitted), str(tmp_path / "full")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image_size is required"):
        export_checkpoint(_mae_checkpoint(tmp_path), tmp_path / "vit", hf=True)
    for name, content in (("garbage.ckpt", b"not a checkpoint"), ("truncated.ckpt", fitted.read_bytes()[:4096])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit) as e:
            main(["export", str(tmp_path / name), str(tmp_path / "out")])
        assert e.value.code == 2 and f"{name} is not a readable torch checkpoint" in capsys.readouterr().err


def _mae_checkpoint(tmp_path: Path) -> Path:
    model = MAE(tiny("image", pre_norm=True), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    t = _trainer(tmp_path, max_steps=1)
    t.fit(model, SyntheticDataModule(modality="image", batch_size=2, train_size=4))
    t.save_checkpoint(tmp_path / "mae.ckpt")
    return tmp_path / "mae.ckpt"


def test_mae_checkpoint_exports_to_vitmae(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = _mae_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--heads with --hf: objective omnissl.ssl.mae.MAE"):
        export_checkpoint(path, tmp_path / "x", hf=True, heads=True, image_size=32)
    export_checkpoint(path, tmp_path / "hf", hf=True, image_size=32)
    hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.mask_ratio == 0.0
    enc = read_checkpoint(path).encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x, noise=torch.arange(64.0).expand(2, -1))  # increasing noise: identity token order
        assert (enc(x).last - ref.last_hidden_state).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# Continued pretraining from a local transformers directory, through a recipe


def test_recipe_encoder_from_a_local_hf_directory_trains(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from omnissl.cli import lightning_cli

    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4)
    hf = transformers.Wav2Vec2Model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
model:
  class_path: omnissl.ssl.wav2vec2.Wav2Vec2
  init_args:
    encoder:
      class_path: omnissl.eval.hf.encoder_from_hf
      init_args: {{path: {tmp_path / "hf"}}}
    final_dim: 16
    num_distractors: 5
    codebook_entries: 8
{SYNTHETIC_AUDIO}""")
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["-c", str(recipe), "--trainer.max_steps", "1", "--trainer.logger", "false",
                         "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
                         "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"], run=False)
    enc = cli.model.encoder
    assert torch.equal(enc.proj.weight, hf.feature_projection.projection.weight)
    before = enc.trunk.blocks[0].fc1.weight.detach().clone()
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert not torch.equal(enc.trunk.blocks[0].fc1.weight, before)


def test_recipe_encoder_from_a_package(tmp_path):
    from omnissl.cli import lightning_cli

    save_backbone(_perturb(tiny("audio")), tmp_path / "pkg")
    cli = lightning_cli(["--model", "omnissl.ssl.hubert.HuBERT", "--model.init_args.encoder",
                         "omnissl.checkpoints.load_backbone", "--model.init_args.encoder.init_args.path",
                         str(tmp_path / "pkg"), "--data", "omnissl.datamodules.synthetic.SyntheticDataModule"],
                        run=False)
    assert torch.equal(cli.model.encoder.mask_emb, load_backbone(tmp_path / "pkg").mask_emb)


def test_masked_lm_head_is_tied_to_the_given_embedding():
    head = MaskedLMHead(dim=8, vocab_size=5)
    embedding = torch.randn(5, 8)
    x = torch.randn(2, 3, 8)
    h = head.norm(torch.nn.functional.gelu(head.dense(x)))
    assert torch.allclose(head(x, embedding), h @ embedding.T + head.bias)
    with pytest.raises(ValueError, match="tied embedding"):
        head(x, torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------------------
# An audio --hf export loads with AutoFeatureExtractor + AutoModel and gives our hidden states on raw audio


def _speech_corpus(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        num = 12000 + 1000 * i
        x = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * np.arange(num) / 16000) + 0.02 * rng.standard_normal(num)
        sf.write(folder / f"{i}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        rows.append(f"{i}.wav\t{num}\n")
    (folder / "train.tsv").write_text(f"{folder}\n" + "".join(rows))
    return folder / "train.tsv"


def audio_checkpoint(tmp_path: Path, *, normalize: bool) -> Path:
    """A 1-step wav2vec 2.0 fit on a tiny speech corpus through AudioDataModule(normalize=...)."""
    from omnissl.datamodules.audio import AudioDataModule

    manifest = _speech_corpus(tmp_path / "corpus")
    torch.manual_seed(0)
    model = Wav2Vec2(_perturb(tiny("audio")), num_distractors=5, codebook_entries=8)
    dm = AudioDataModule(train=str(manifest), max_samples=8000, min_samples=4000, max_tokens=None,
                         batch_size=2, num_workers=0, normalize=normalize)
    t = _trainer(tmp_path, max_steps=1)
    t.fit(model, dm)
    t.save_checkpoint(tmp_path / "w2v.ckpt")
    return tmp_path / "w2v.ckpt"


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_hf_audio_export_runs_as_a_user_would_call_it(tmp_path, normalize):
    pytest.importorskip("transformers")
    ckpt = audio_checkpoint(tmp_path, normalize=normalize)
    export_checkpoint(ckpt, tmp_path / "hf", hf=True)
    config = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert config["sampling_rate"] == 16000 and config["do_normalize"] is normalize

    # what a user of the directory writes
    from transformers import AutoFeatureExtractor, AutoModel

    extractor = AutoFeatureExtractor.from_pretrained(tmp_path / "hf", local_files_only=True)
    model = AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    raw, sr = sf.read(tmp_path / "corpus" / "1.wav", dtype="float32")
    inputs = extractor(raw, sampling_rate=sr, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states

    # ours, on the waveform as training fed it (AudioDataset: layer_norm over the utterance when normalize)
    wav = torch.from_numpy(np.ascontiguousarray(raw))
    if normalize:
        wav = torch.nn.functional.layer_norm(wav, wav.shape)
    with torch.no_grad():
        ours = read_checkpoint(ckpt).encoder.eval()(wav[None]).layers
    assert len(hidden) == len(ours)
    for i, (theirs, mine) in enumerate(zip(hidden, ours)):
        assert (theirs - mine).abs().max() <= 1e-5, f"layer {i}"


# ---------------------------------------------------------------------------------------------------------
# `omnissl features` (omnissl/eval/features.py): one layer's hidden states per manifest row, equal to the
# encoder's own forward on that utterance, from a package or a checkpoint (normalized like its training)


def _features_corpus(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, rel in enumerate(["a/0.wav", "a/1.flac", "b/0.wav"]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        num = 6000 + 1500 * i
        sf.write(folder / rel, (0.1 * rng.standard_normal(num)).astype(np.float32), 16000, subtype="PCM_16")
        rows.append(f"{rel}\t{num}\n")
    (folder / "m.tsv").write_text(f"{folder}\n" + "".join(rows))
    return folder / "m.tsv"


def _exit(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def _wav(path) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_features_of_a_package_equal_the_encoders_forward(tmp_path, fmt):
    torch.manual_seed(0)
    enc = tiny("audio").eval()
    save_backbone(enc, tmp_path / "pkg")
    manifest = _features_corpus(tmp_path / "data")
    assert _exit(["features", str(tmp_path / "pkg"), str(manifest), "--layer", "1", "--out", str(tmp_path / "f"),
                 "--format", fmt]) == 0
    for rel in ["a/0.wav", "a/1.flac", "b/0.wav"]:
        path = (tmp_path / "f" / rel).with_suffix(f".{fmt}")
        got = torch.from_numpy(np.load(path)) if fmt == "npy" else load_file(str(path))["features"]
        with torch.no_grad():
            want = enc(_wav(tmp_path / "data" / rel)[None]).layers[1][0]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6), rel


def test_features_of_a_checkpoint_normalize_as_its_training_did(tmp_path):
    ckpt = audio_checkpoint(tmp_path, normalize=True)
    manifest = _features_corpus(tmp_path / "data")
    assert _exit(["features", str(ckpt), str(manifest), "--layer", "2", "--out", str(tmp_path / "f")]) == 0
    enc = read_checkpoint(ckpt).encoder.eval()
    wav = _wav(tmp_path / "data" / "b/0.wav")
    with torch.no_grad():
        want = enc(torch.nn.functional.layer_norm(wav, wav.shape)[None]).layers[2][0]
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "f" / "b" / "0.npy")), want, atol=1e-6)


def test_features_refuses_what_it_cannot_do(tmp_path, capsys):
    save_backbone(tiny("text"), tmp_path / "text")
    manifest = _features_corpus(tmp_path / "data")
    argv = [str(manifest), "--layer", "1", "--out", str(tmp_path / "f")]
    assert _exit(["features", str(tmp_path / "text")] + argv) == 2
    assert "omnissl features: error: features reads audio manifests" in capsys.readouterr().err
    save_backbone(tiny("audio"), tmp_path / "audio")
    argv[2] = "9"
    assert _exit(["features", str(tmp_path / "audio")] + argv) == 2
    assert "layer 9 out of range" in capsys.readouterr().err
