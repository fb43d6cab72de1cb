"""Modality frontends: raw input -> (features (B, N, C), valid lengths (B,) or None, grid or None).

Every frontend exposes `out_dim` (C) and `samples_per_token` (input samples per output token for audio,
None otherwise).

Legend: B batch, T samples, N tokens, C channels, F mel bins, H/W image height/width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from einops import rearrange
from torch import Tensor, nn

from omnissl.backbones.config import recorded
from omnissl.ops import masked_instance_norm, padding_mask_from_lengths

# wav2vec 2.0's feature encoder: (channels, kernel, stride) per layer; stride 320, receptive field 400
# samples (25 ms) at 16 kHz (Baevski et al. 2020, sec. 2; fairseq `conv_feature_layers`).
WAV2VEC2_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


def conv_output_lengths(lengths: Tensor, layers: tuple[tuple[int, int, int], ...]) -> Tensor:
    """Valid output frames of a stack of unpadded convolutions, for valid input lengths (B,)."""
    for _, kernel, stride in layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


class _Windows(torch.autograd.Function):
    """h (B, T, C) -> (B, T', k * C): the k frames of every stride-s window, tap-major (im2col along time).
    Backward adds each tap's gradient back with one strided add per tap (torch's `unfold` backward is a
    generic scatter and several times slower)."""

    @staticmethod
    def forward(ctx, h: Tensor, kernel: int, stride: int) -> Tensor:  # type: ignore[override]
        b, t, c = h.shape
        n = (t - kernel) // stride + 1
        ctx.shape, ctx.kernel, ctx.stride, ctx.n = (b, t, c), kernel, stride, n
        windows = h.as_strided((b, n, kernel, c), (h.stride(0), stride * h.stride(1), h.stride(1), h.stride(2)))
        return windows.reshape(b, n, kernel * c)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (b, t, c), kernel, stride, n = ctx.shape, ctx.kernel, ctx.stride, ctx.n
        grad = grad.view(b, n, kernel, c)
        if kernel < stride:  # windows with gaps between them: not every frame gets a gradient
            out = grad.new_zeros(b, t, c)
            first = 0
        else:  # taps 0..stride-1 cover frames 0..stride*n-1 exactly once: one copy, no zero fill, no adds
            out = grad.new_empty(b, t, c)
            out[:, stride * n :].zero_()
            out[:, : stride * n].view(b, n, stride, c).copy_(grad[:, :, :stride])
            first = stride
        for j in range(first, kernel):  # same order of additions per frame as a zero-filled sum over taps
            out[:, j : j + stride * (n - 1) + 1 : stride] += grad[:, :, j]
        return out, None, None


@recorded
class ConvFeatureExtractor(nn.Module):
    """The wav2vec 2.0 convolutional feature encoder on raw 16 kHz audio.

    mode="group": GroupNorm with one group per channel on the first layer only, no conv bias (base);
    mode="layer": LayerNorm over channels after every layer (large, `extractor_mode: layer_norm`).
    Norms run in fp32 (fairseq's Fp32GroupNorm / Fp32LayerNorm) so bf16 training keeps their statistics.

    NOTE(ref): fairseq and HF compute the first layer's GroupNorm over the padded time axis, so a padded
    utterance gets different features from the same utterance alone. We take the statistics over the valid
    frames only when lengths are given; unpadded inputs give identical results to the references.
    """

    def __init__(
        self,
        *,
        layers: tuple[tuple[int, int, int], ...] = WAV2VEC2_CONV,
        mode: str = "group",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("group", "layer"):
            raise ValueError(f"mode must be 'group' or 'layer', got {mode!r}")
        self.mode, self.layers = mode, tuple(tuple(layer) for layer in layers)
        convs, norms, in_ch = [], [], 1
        for i, (ch, kernel, stride) in enumerate(self.layers):
            conv = nn.Conv1d(in_ch, ch, kernel, stride=stride, bias=bias)
            nn.init.kaiming_normal_(conv.weight)
            convs.append(conv)
            if mode == "layer":
                norms.append(nn.LayerNorm(ch))
            elif i == 0:
                norms.append(nn.GroupNorm(ch, ch))
            else:
                norms.append(nn.Identity())
            in_ch = ch
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.out_dim = in_ch
        stride = 1
        for _, _, s in self.layers:
            stride *= s
        self.samples_per_token = stride

    def receptive_field(self) -> int:
        field, jump = 1, 1
        for _, kernel, stride in self.layers:
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @staticmethod
    def _group_norm(norm: nn.GroupNorm, h: Tensor, valid: Tensor | None) -> Tensor:
        """Per-channel norm over time (GroupNorm with C groups) of channels-last h (B, N, C), in fp32, over
        the `valid` (B,) frames only (padded frames come out as the norm's bias)."""
        pad = None if valid is None else padding_mask_from_lengths(valid, h.shape[1])
        h = masked_instance_norm(h.float(), None if pad is None else ~pad, eps=norm.eps)
        return h * norm.weight + norm.bias

    @staticmethod
    def _conv(conv: nn.Conv1d, h: Tensor, kernel: int, stride: int) -> Tensor:
        """conv1d on channels-last h (B, T, C_in) -> (B, T', C_out), as one GEMM over the unfolded windows.

        Same weights and result as `conv(h.transpose(1, 2)).transpose(1, 2)`; keeping channels last lets the
        LayerNorms run without transposing copies, and on CPU the GEMM with `_Windows`' backward is 2-3x
        faster than mkldnn's 1-D convolution backward at wav2vec 2.0 sizes (bench/wav2vec2_vs_hf.py).
        """
        weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1)  # (C_out, k * C_in), tap-major
        return F.linear(_Windows.apply(h.contiguous(), kernel, stride), weight, conv.bias)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None, None]:
        """x (B, T) float -> features (B, N, 512), valid frames (B,) or None."""
        if x.dim() != 2:
            raise ValueError(f"audio must be (B, T), got shape {tuple(x.shape)}")
        rf = self.receptive_field()
        if x.shape[1] < rf:
            raise ValueError(f"audio of {x.shape[1]} samples is shorter than the receptive field ({rf})")
        dtype = x.dtype
        h = x[..., None]  # (B, T, 1): channels last throughout
        valid = lengths
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            _, kernel, stride = self.layers[i]
            h = self._conv(conv, h, kernel, stride)
            if valid is not None:
                valid = conv_output_lengths(valid, (self.layers[i],))
            if isinstance(norm, nn.GroupNorm):
                h = self._group_norm(norm, h, valid).to(dtype)
            elif isinstance(norm, nn.LayerNorm):
                h = F.layer_norm(h.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(dtype)
            h = F.gelu(h)
        return h, valid, None


# (sample rate, n_mels, n_fft) -> (mean, std) of LogMelPatches' log(mel + 1e-6) over every frame and bin of the
# embedded speech corpus's train split (147 utterances, 107 080 frames at n_fft 1024), measured by
#   python bench/logmel_stats.py --corpus embedded:speech:small --n-mels 64 128 [--n-fft 400]
LOGMEL_STATS: dict[tuple[int, int, int], tuple[float, float]] = {
    (16_000, 64, 1024): (-3.9193, 5.3247),
    (16_000, 128, 1024): (-4.7416, 5.1848),
    (16_000, 64, 400): (-4.7780, 5.1514),  # 107 651 frames
}


@recorded
class LogMelPatches(nn.Module):
    """Log-mel filterbank of 16 kHz audio cut into (time × frequency) patches (AST / AudioMAE / SSAST).

    25 ms Hann window (1024-point FFT), 10 ms hop, `n_mels` bins (torchaudio's MelSpectrogram), log(mel + 1e-6),
    scaled as AST / AudioMAE do, (x - mean) / (2 std), then non-overlapping patches `patch_time` frames ×
    `patch_freq` bins embedded by a strided Conv2d. Tokens are ordered time-major, so the grid is (time
    patches, frequency patches). With `patch_freq = n_mels` each token is a frame stack.

    n_fft: 1024 (patches: every one of 128 mel filters non-empty) or 400 (the window itself, as kaldi fbank and
    the log-mel baseline; enough for 64 mels), which gives exactly 1 + (T - 400) // 160 frames.

    mean / std default to `LOGMEL_STATS[sample_rate, n_mels, n_fft]`: the statistics of these very features on the embedded speech
    corpus (`bench/logmel_stats.py`), so the scaled input has mean 0 and std 0.5 there.
    NOTE(ref): AST / AudioMAE use AudioSet's -4.27 / 4.57, measured on kaldi fbank (pre-emphasis, DC removal,
    512-point FFT), not on these features (their lowest bins differ by about 7 nats); pass mean=-4.27,
    std=4.57 to get the reference's constants.
    """

    def __init__(
        self,
        *,
        dim: int = 768,
        n_mels: int = 128,
        patch_time: int = 16,
        patch_freq: int = 16,
        sample_rate: int = 16_000,
        mean: float | None = None,
        std: float | None = None,
        n_fft: int = 1024,
    ) -> None:
        super().__init__()
        if n_mels % patch_freq:
            raise ValueError(f"n_mels {n_mels} must be a multiple of patch_freq {patch_freq}")
        if n_fft < sample_rate // 40:
            raise ValueError(f"n_fft {n_fft} is shorter than the 25 ms window ({sample_rate // 40} samples)")
        key = (sample_rate, n_mels, n_fft)
        if (mean is None or std is None) and key not in LOGMEL_STATS:
            raise ValueError(f"no measured log-mel statistics for {n_mels} mels at {sample_rate} Hz with n_fft {n_fft} "
                             f"(have {sorted(LOGMEL_STATS)}): pass mean and std (bench/logmel_stats.py measures them)")
        mean = LOGMEL_STATS[key][0] if mean is None else mean
        std = LOGMEL_STATS[key][1] if std is None else std
        self.hop = sample_rate // 100
        self.n_fft = n_fft
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=self.n_fft, win_length=sample_rate // 40, hop_length=self.hop,
            n_mels=n_mels, center=False, power=2.0,
        )
        self.patch_time, self.patch_freq, self.n_mels = patch_time, patch_freq, n_mels
        self.mean, self.std = mean, std
        self.proj = nn.Conv2d(1, dim, kernel_size=(patch_time, patch_freq), stride=(patch_time, patch_freq))
        self.out_dim = dim
        self.samples_per_token = self.hop * patch_time

    @property
    def min_samples(self) -> int:
        """The shortest input that yields one patch row."""
        return self.n_fft + self.hop * (self.patch_time - 1)

    @property
    def patch_dim(self) -> int:
        """Values per patch in `patchify`'s output: patch_time * patch_freq log-mel bins."""
        return self.patch_time * self.patch_freq

    def spectrogram(self, x: Tensor) -> Tensor:
        """x (B, T) -> normalized log-mel (B, frames, F), in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            mel = self.melspec(x.float())
        return rearrange((torch.log(mel + 1e-6) - self.mean) / (2 * self.std), "b f t -> b t f")

    def frames(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths - self.n_fft, self.hop, rounding_mode="floor") + 1

    def token_count(self, lengths: Tensor) -> Tensor:
        """(B,) samples -> (B,) valid tokens (whole patch rows only)."""
        rows = torch.div(self.frames(lengths), self.patch_time, rounding_mode="floor")
        return (rows * (self.n_mels // self.patch_freq)).clamp(min=0)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        if x.dim() != 2:
            raise ValueError(f"audio must be (B, T), got shape {tuple(x.shape)}")
        need = self.min_samples
        if x.shape[1] < need:
            raise ValueError(f"audio of {x.shape[1]} samples is shorter than one patch ({need} samples)")
        spec = self.spectrogram(x)
        t = spec.shape[1] - spec.shape[1] % self.patch_time
        h = self.proj(spec[:, None, :t].to(self.proj.weight.dtype))  # (B, D, Tp, Fp)
        grid = (h.shape[2], h.shape[3])
        valid = None if lengths is None else self.token_count(lengths)
        return rearrange(h, "b d tp fp -> b (tp fp) d"), valid, grid

    def patchify(self, x: Tensor) -> Tensor:
        """Reconstruction targets for MAE: x (B, T) -> (B, N, patch_time * patch_freq) log-mel patches."""
        spec = self.spectrogram(x)
        t = spec.shape[1] - spec.shape[1] % self.patch_time
        return rearrange(spec[:, :t], "b (tp pt) (fp pf) -> b (tp fp) (pt pf)", pt=self.patch_time,
                         pf=self.patch_freq)


@recorded
class ImagePatches(nn.Module):
    """ViT patch embedding: non-overlapping `patch`×`patch` patches by a strided Conv2d, any image size
    divisible by the patch (Dosovitskiy et al. 2021)."""

    samples_per_token = None

    def __init__(self, *, dim: int = 768, patch: int = 16, channels: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.out_dim = dim

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, None, tuple[int, int]]:
        if x.dim() != 4 or x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(
                f"images must be (B, C, H, W) with H and W divisible by {self.patch}, got {tuple(x.shape)}"
            )
        h = self.proj(x)
        return rearrange(h, "b d gh gw -> b (gh gw) d"), None, (h.shape[2], h.shape[3])

    @property
    def patch_dim(self) -> int:
        """Values per patch in `patchify`'s output: patch * patch * C pixels."""
        return self.patch * self.patch * self.proj.in_channels

    def patchify(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, N, patch * patch * C) pixels per patch (MAE targets)."""
        return rearrange(x, "b c (gh p) (gw q) -> b (gh gw) (p q c)", p=self.patch, q=self.patch)


@recorded
class TokenEmbedding(nn.Module):
    """Token ids -> embeddings (BERT/RoBERTa word embeddings); `pad_id` rows stay zero."""

    samples_per_token = None

    def __init__(self, *, vocab_size: int, dim: int = 768, pad_id: int = 1) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.out_dim = dim

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None, None]:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be (B, N) integers, got {tuple(x.shape)} {x.dtype}")
        if lengths is None:
            lengths = (x != self.pad_id).sum(1)
        return self.embed(x), lengths, None
