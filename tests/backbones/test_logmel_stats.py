"""LogMelPatches is normalized with the statistics of the features it computes (issue 16, review U9)."""

import pytest
import torch

from omnissl.backbones.frontends import LOGMEL_STATS, LogMelPatches
from omnissl.datamodules.audio_io import load_audio
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus


def _held_out_speech():
    manifests = embedded_corpus("embedded:speech:small")
    paths = []
    for split in ("valid", "test"):  # LOGMEL_STATS were measured on the train split
        root, rows = read_manifest(manifests[split])
        paths += [root / r[0] for r in rows]
    return [load_audio(p) for p in paths]


@pytest.mark.parametrize("n_mels,n_fft", [(64, 1024), (128, 1024), (64, 400)])
def test_normalized_logmel_is_centred_with_ast_scale_on_held_out_speech(n_mels, n_fft):
    waves = _held_out_speech()
    front = LogMelPatches(dim=8, n_mels=n_mels, patch_time=4, patch_freq=16, n_fft=n_fft)
    assert (front.mean, front.std) == LOGMEL_STATS[16_000, n_mels, n_fft]
    # (AudioSet's kaldi-fbank constants -4.27 / 4.57 give std 0.59-0.61 here: the test fails with them)
    with torch.no_grad():
        x = torch.cat([front.spectrogram(w[None]).flatten() for w in waves]).double()
    # AST / AudioMAE scale by 2 std: mean 0, std 0.5 on the corpus the statistics describe
    assert abs(float(x.mean())) < 0.1, float(x.mean())
    assert abs(float(x.std()) - 0.5) < 0.05, float(x.std())


def test_unmeasured_mel_count_needs_explicit_statistics():
    with pytest.raises(ValueError, match="no measured log-mel statistics for 80 mels"):
        LogMelPatches(dim=8, n_mels=80, patch_freq=16)
    with pytest.raises(ValueError, match="no measured log-mel statistics for 128 mels at 16000 Hz with n_fft 400"):
        LogMelPatches(dim=8, n_mels=128, patch_freq=16, n_fft=400)
    with pytest.raises(ValueError, match="n_fft 256 is shorter than the 25 ms window"):
        LogMelPatches(dim=8, n_mels=64, patch_freq=16, n_fft=256, mean=0.0, std=1.0)
    assert LogMelPatches(dim=8, n_mels=80, patch_freq=16, mean=-4.0, std=5.0).mean == -4.0
