"""`tiny(..., extractor_mode=...)`: the CPU recipes can pick wav2vec 2.0's BASE or LARGE conv extractor."""

import pytest
import torch
from torch import nn

from omnissl.backbones.builders import tiny
from omnissl.backbones.config import build_module, module_config


@pytest.mark.parametrize("mode", ["group", "layer"])
def test_tiny_extractor_mode_builds_and_round_trips(mode):
    enc = tiny("audio", dim=32, depth=1, heads=2, extractor_mode=mode)
    fe = enc.frontend
    assert fe.mode == mode
    assert (fe.convs[0].bias is not None) == (mode == "layer")  # fairseq: conv_bias with layer_norm only
    norms = [type(n) for n in fe.norms]
    assert norms == ([nn.LayerNorm] * 7 if mode == "layer" else [nn.GroupNorm] + [nn.Identity] * 6)
    again = build_module(module_config(enc))
    again.load_state_dict(enc.state_dict())
    x = torch.randn(2, 8000)
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x).last, again.eval()(x).last)


def test_unknown_extractor_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be"):
        tiny("audio", extractor_mode="batch")
