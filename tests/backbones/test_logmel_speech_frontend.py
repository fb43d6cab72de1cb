"""The log-mel speech frontend (`tiny(audio_frontend="logmel")`): its token count is known without running it,
HuBERT's 20 ms MFCC units align with its tokens on real speech, and every speech objective trains on it."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.batch import IGNORE_INDEX, Batch
from omnissl.datamodules.audio_io import load_audio
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.eval.units import mfcc_features
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.data2vec2 import Data2Vec2
from omnissl.ssl.frames import encoder_frames
from omnissl.ssl.heads import ConvDecoder1d
from omnissl.ssl.hubert import HuBERT
from omnissl.ssl.targets import align_units
from omnissl.ssl.wav2vec2 import Wav2Vec2


def test_token_count_is_the_forward_s_valid_tokens_and_near_the_conv_extractor_s():
    enc = tiny("audio", dim=32, depth=1, audio_frontend="logmel")
    conv = tiny("audio", dim=32, depth=1)
    lengths = torch.tensor([560, 561, 879, 880, 4800, 16000, 16159, 16160, 16319, 16320, 64000, 64479])
    x = torch.randn(len(lengths), int(lengths.max()))
    with torch.no_grad():
        out = enc(x, lengths)
    valid = (~out.padding_mask).sum(1)
    assert valid.tolist() == encoder_frames(enc, lengths).tolist()
    gap = encoder_frames(conv, lengths) - valid
    assert set(gap[lengths >= 880].tolist()) <= {0, 1}, gap  # 1 + (T-400)//320 vs (1 + (T-400)//160)//2
    with pytest.raises(ValueError, match="unknown audio_frontend 'mfcc'"):
        tiny("audio", audio_frontend="mfcc")


def _speech(n: int) -> list[torch.Tensor]:
    root, rows = read_manifest(embedded_corpus("embedded:speech:small")["train"])
    return [load_audio(root / r[0]) for r in rows[:n]]


def _batch(waves: list[torch.Tensor], units: list[torch.Tensor] | None = None) -> Batch:
    lengths = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    targets = {}
    if units is not None:
        u = torch.full((len(units), max(len(v) for v in units)), IGNORE_INDEX)
        for i, v in enumerate(units):
            u[i, : len(v)] = v
        targets["units"] = u
    return Batch({"audio": x}, {"audio": lengths}, targets, torch.arange(len(waves)))


def test_mfcc_units_of_real_speech_align_with_the_logmel_tokens():
    enc = tiny("audio", dim=32, depth=1, audio_frontend="logmel")
    waves = _speech(6)
    units = [torch.zeros(len(mfcc_features(w)), dtype=torch.long) for w in waves]
    batch = _batch(waves, units)
    frames = encoder_frames(enc, batch.lengths["audio"])
    labels, kept = align_units(batch.targets["units"], frames, int(frames.max()), ids=batch.ids)
    assert kept.tolist() == frames.tolist()  # every token has its unit (there is one unit more, at most)


def _objective(name: str, enc):
    if name == "wav2vec2":
        return Wav2Vec2(enc, final_dim=32, num_distractors=5, codebook_entries=16, feature_penalty_weight=0.0)
    if name == "hubert":
        return HuBERT(enc, num_classes=8, final_dim=32)
    if name == "data2vec":
        return Data2Vec(enc, top_k=2)
    return Data2Vec2(enc, top_k=2, clone_batch=2, decoder=ConvDecoder1d(in_dim=enc.dim, dim=32, layers=2, groups=4))


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "data2vec", "data2vec2"])
def test_every_speech_objective_trains_its_logmel_frontend_on_real_speech(name):
    torch.manual_seed(0)
    enc = tiny("audio", dim=32, depth=2, audio_frontend="logmel")
    model = _objective(name, enc)
    waves = [w[:24000] for w in _speech(3)]
    units = None
    if name == "hubert":  # real MFCC units, 8 bins of the first coefficient
        units = [torch.bucketize(mfcc_features(w)[:, 0].contiguous(), torch.linspace(-20, 40, 7)) for w in waves]
    batch = _batch(waves, units)
    model.train()
    loss = model.step(batch).loss
    assert torch.isfinite(loss), loss
    loss.backward()
    grad = enc.frontend.proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # the embedding of the frames learns
