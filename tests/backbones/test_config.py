"""Backbones described by their constructor arguments (omnissl/backbones/config.py): every builder's module
tree survives a JSON round trip, and a config can only ever build omnissl.backbones classes."""

import json

import pytest
import torch
from torch import nn

from omnissl.backbones.builders import tiny
from omnissl.backbones.config import build_module, module_config
from omnissl.backbones.encoder import Encoder
from omnissl.backbones.transformer import LearnedPositions, SinCosPositions, Transformer

MODALITIES = ["audio", "spectrogram", "text", "image"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_config_rebuilds_the_same_module_tree(modality):
    enc = tiny(modality, pre_norm=modality != "text", dropout=0.1)
    config = json.loads(json.dumps(module_config(enc)))  # plain JSON data
    rebuilt = build_module(config)
    assert repr(rebuilt) == repr(enc)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    assert module_config(rebuilt) == config


def test_new_position_options_are_recorded():
    enc = Encoder(tiny("image").frontend, Transformer(dim=64, depth=1, heads=4, ffn_dim=128, pre_norm=True),
                  positions=LearnedPositions(64, max_len=16, grid=(4, 4), frozen=True), feature_norm=False,
                  cls_token=True)
    rebuilt = build_module(json.loads(json.dumps(module_config(enc))))
    assert rebuilt.positions.grid == (4, 4) and not rebuilt.positions.weight.requires_grad
    with pytest.raises(ValueError, match=r"\(4, 4\) patch grid"):
        rebuilt(torch.zeros(1, 3, 8, 8))  # a 2x2 grid must not silently take the first 4 rows


def test_cols_first_sincos_swaps_the_halves():
    rows = SinCosPositions(8, two_d=True)(torch.zeros(1, 6, 8), None, (2, 3))[0]
    cols = SinCosPositions(8, two_d=True, cols_first=True)(torch.zeros(1, 6, 8), None, (2, 3))[0]
    assert torch.equal(cols, torch.cat([rows[:, 4:], rows[:, :4]], dim=1))
    with pytest.raises(ValueError, match="cols_first"):
        SinCosPositions(8, cols_first=True)


@pytest.mark.parametrize(
    "cls, needle",
    [
        ("os.system", "only classes of omnissl.backbones"),
        ("omnissl.ssl.wav2vec2.Wav2Vec2", "only classes of omnissl.backbones"),
        ("omnissl.backbones.builders.tiny", "not a buildable"),  # a function, not a recorded class
        ("omnissl.backbones.encoder.GradMultiply", "not a buildable"),
        ("omnissl.backbones.nosuch.Thing", "no such omnissl.backbones module"),
    ],
)
def test_only_recorded_backbone_classes_are_built(cls, needle):
    with pytest.raises(ValueError, match=needle) as e:
        build_module({"class": cls, "args": {}})
    assert "encoder.class" in str(e.value)


def _audio_config() -> dict:
    return json.loads(json.dumps(module_config(tiny("audio"))))


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: c["args"]["trunk"]["args"].update(depht=3), r"encoder\.trunk\.depht: Transformer has no argument"),
        (lambda c: c["args"]["trunk"]["args"].update(depth="3"), r"encoder\.trunk\.depth='3' does not fit"),
        (lambda c: c["args"]["trunk"]["args"].update(pre_norm=1), r"encoder\.trunk\.pre_norm=1 does not fit"),
        (lambda c: c["args"].pop("trunk"), r"encoder\.trunk: missing required argument"),
        (lambda c: c["args"]["frontend"]["args"].update(mode="batch"), r"encoder\.frontend \(ConvFeatureExtractor\): "
                                                                       r"mode must be"),
        (lambda c: c["args"].update(trunk={"class": "omnissl.backbones.transformer.SinCosPositions",
                                           "args": {"dim": 64}}), r"encoder\.trunk: a SinCosPositions does not fit"),
        (lambda c: c.update(extra=1), "exactly the keys 'class' and 'args'"),
    ],
)
def test_bad_configs_name_the_option(edit, needle):
    config = _audio_config()
    edit(config)
    with pytest.raises(ValueError, match=needle):
        build_module(config)


def test_modules_that_are_not_recorded_cannot_be_described():
    class Custom(nn.Module):
        out_dim, samples_per_token = 64, None

    enc = Encoder(Custom(), Transformer(dim=64, depth=1, heads=4, ffn_dim=128), feature_norm=False)
    with pytest.raises(ValueError, match=r"encoder\.frontend: a .*Custom cannot be described"):
        module_config(enc)
