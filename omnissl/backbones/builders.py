"""Named encoder sizes as plain functions (dims as published), plus `tiny` ones for tests.

    audio_base()   wav2vec 2.0 / HuBERT BASE (Baevski et al. 2020 Table 1; Hsu et al. 2021 Table 1)
    audio_large()  wav2vec 2.0 / HuBERT LARGE (same tables; layer-norm extractor, pre-LN trunk)
    audio_patch_base()  AudioMAE / SSAST ViT-B on 128-bin log-mel 16x16 patches (Huang et al. 2022)
    text_base()    RoBERTa base (Liu et al. 2019; 12L/768/12h, 512 learned positions, post-LN)
    vit_base16()   ViT-B/16 as in MAE (He et al. 2022), 2-D sin-cos positions, pre-LN
"""

from __future__ import annotations

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import (
    WAV2VEC2_CONV,
    ConvFeatureExtractor,
    ImagePatches,
    LogMelPatches,
    TokenEmbedding,
)
from omnissl.backbones.transformer import ConvPositions, LearnedPositions, SinCosPositions, Transformer


def audio_base(*, layerdrop: float = 0.05, dropout: float = 0.1, dropout_input: float = 0.1,
               checkpoint_activations: bool = False) -> Encoder:
    """wav2vec 2.0 BASE: group-norm conv extractor, 768/12/12h/3072 post-LN, conv positions (128, 16).
    dropout_input: on the projected features (wav2vec 2.0 / HuBERT base 0.1; the data2vec audio configs 0.0)."""
    trunk = Transformer(dim=768, depth=12, heads=12, ffn_dim=3072, pre_norm=False, dropout=dropout,
                        attn_dropout=dropout, layerdrop=layerdrop, checkpoint_activations=checkpoint_activations)
    return Encoder(ConvFeatureExtractor(mode="group"), trunk, positions=ConvPositions(768, dropout=dropout),
                   dropout_input=dropout_input)


def audio_large(*, layerdrop: float = 0.0, dropout: float = 0.0, checkpoint_activations: bool = False) -> Encoder:
    """wav2vec 2.0 LARGE: layer-norm conv extractor with bias, 1024/24/16h/4096 pre-LN (`layer_norm_first`)."""
    trunk = Transformer(dim=1024, depth=24, heads=16, ffn_dim=4096, pre_norm=True, dropout=dropout,
                        attn_dropout=dropout, layerdrop=layerdrop, checkpoint_activations=checkpoint_activations)
    return Encoder(ConvFeatureExtractor(mode="layer", bias=True), trunk,
                   positions=ConvPositions(1024, dropout=dropout), dropout_input=dropout)


def audio_patch_base(*, checkpoint_activations: bool = False) -> Encoder:
    """ViT-B over 128-bin log-mel 16x16 patches (AudioMAE / SSAST), 2-D sin-cos positions, CLS, pre-LN."""
    trunk = Transformer(dim=768, depth=12, heads=12, ffn_dim=3072, pre_norm=True, dropout=0.0,
                        attn_dropout=0.0, eps=1e-6, checkpoint_activations=checkpoint_activations)
    return Encoder(LogMelPatches(dim=768), trunk, positions=SinCosPositions(768, two_d=True),
                   feature_norm=False, cls_token=True)


def text_base(*, vocab_size: int = 50265, pad_id: int = 1, max_len: int = 512,
              checkpoint_activations: bool = False) -> Encoder:
    """RoBERTa base: token embeddings + 512 learned positions, embedding LayerNorm, 768/12/12h post-LN."""
    trunk = Transformer(dim=768, depth=12, heads=12, ffn_dim=3072, pre_norm=False, dropout=0.1,
                        attn_dropout=0.1, checkpoint_activations=checkpoint_activations)
    return Encoder(TokenEmbedding(vocab_size=vocab_size, dim=768, pad_id=pad_id), trunk,
                   positions=LearnedPositions(768, max_len=max_len), feature_norm=False, project=False)


def vit_base16(*, pre_norm: bool = True, checkpoint_activations: bool = False) -> Encoder:
    """ViT-B/16 (MAE's encoder): 16x16 patches, 2-D sin-cos positions, CLS token, 768/12/12h pre-LN.
    pre_norm False: post-LN blocks after an input LayerNorm, as fairseq's data2vec 2.0 image model
    (`layer_norm_first: false`); such a model exports as an omnissl package, not as an HF ViT."""
    trunk = Transformer(dim=768, depth=12, heads=12, ffn_dim=3072, pre_norm=pre_norm, dropout=0.0,
                        attn_dropout=0.0, eps=1e-6, checkpoint_activations=checkpoint_activations)
    return Encoder(ImagePatches(dim=768, patch=16), trunk, positions=SinCosPositions(768, two_d=True),
                   feature_norm=False, cls_token=True)


def tiny(modality: str = "audio", *, dim: int = 64, depth: int = 2, heads: int = 4, pre_norm: bool = False,
         vocab_size: int = 1024, layerdrop: float = 0.0, dropout: float = 0.0,
         extractor_mode: str = "group", audio_frontend: str = "conv") -> Encoder:
    """A small encoder of any modality for tests and CPU demos. Audio has 20 ms tokens (320 samples) from a
    64-wide frontend, projected to `dim`, with wav2vec 2.0's conv positions:

      audio_frontend "conv": wav2vec 2.0's conv extractor (its kernels and strides) with 64 channels;
        extractor_mode "group" (BASE: first-layer GroupNorm, no conv bias) or "layer" (LARGE, fairseq
        `layer_norm`: per-frame LayerNorm after every conv, conv bias).
      audio_frontend "logmel": 64-bin log-mel frames (25 ms window, 10 ms hop, as the log-mel baseline), two
        frames per token embedded by one linear map (LogMelPatches with patch_freq = n_mels): the input of
        w2v-BERT / BEST-RQ-style speech encoders. (1 + (T - 400) // 160) // 2 tokens: at most one fewer than the
        conv extractor's 1 + (T - 400) // 320, within HuBERT's unit alignment.
        NOTE(ref): wav2vec 2.0, HuBERT and data2vec learn their frontend from the waveform; the objectives run
        unchanged on this one (the wav2vec 2.0 quantizer then quantizes the embedded frames)."""
    trunk = Transformer(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_norm=pre_norm,
                        dropout=dropout, attn_dropout=dropout, layerdrop=layerdrop)
    if modality == "audio" and audio_frontend == "logmel":
        return Encoder(LogMelPatches(dim=64, n_mels=64, patch_time=2, patch_freq=64, n_fft=400), trunk,
                       positions=ConvPositions(dim, kernel=16, groups=4, dropout=dropout))
    if modality == "audio":
        if audio_frontend != "conv":
            raise ValueError(f"unknown audio_frontend {audio_frontend!r}; expected conv or logmel")
        conv = tuple((64, k, s) for _, k, s in WAV2VEC2_CONV)
        return Encoder(ConvFeatureExtractor(layers=conv, mode=extractor_mode, bias=extractor_mode == "layer"), trunk,
                       positions=ConvPositions(dim, kernel=16, groups=4, dropout=dropout))
    if modality == "spectrogram":
        return Encoder(LogMelPatches(dim=dim, n_mels=64, patch_time=4, patch_freq=16), trunk,
                       positions=SinCosPositions(dim, two_d=True), feature_norm=False, cls_token=True)
    if modality == "text":
        return Encoder(TokenEmbedding(vocab_size=vocab_size, dim=dim, pad_id=1), trunk,
                       positions=LearnedPositions(dim, max_len=512), feature_norm=False, project=False)
    if modality == "image":
        return Encoder(ImagePatches(dim=dim, patch=4), trunk, positions=SinCosPositions(dim, two_d=True),
                       feature_norm=False, cls_token=True)
    raise ValueError(f"unknown modality {modality!r}; expected audio, spectrogram, text or image")
