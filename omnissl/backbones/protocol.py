"""The backbone contract every objective is written against.

A backbone is a modality *frontend* feeding one shared transformer *trunk*:

    tokens = backbone.embed(x, lengths)                     # frontend (+ feature norm and projection)
    out = backbone.encode(tokens, mask=m)                   # masked positions -> learned mask embedding
    out = backbone.encode(tokens, keep=k)                   # only kept tokens enter the trunk
    out.layers                                              # every layer's output, on request

Legend: B batch, N tokens, C frontend feature width, D trunk width, L layers.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor


class Tokens(NamedTuple):
    """What `embed` returns.

    x:            (B, N, D) projected tokens, before masking and positions.
    padding_mask: (B, N) bool, True at padding; None when nothing is padded.
    features:     (B, N, C) frontend features after the feature norm, before projection (wav2vec2's
                  quantizer input).
    grid:         (rows, cols) of a 2-D patch layout (images, spectrogram patches), else None.
    raw:          (B, N, C) frontend output before the feature norm (after `grad_scale`), or None: the
                  input of wav2vec 2.0's and HuBERT's feature penalty, which fairseq takes before its
                  `layer_norm` (after it, mean(x^2) is ~1 by construction).
    """

    x: Tensor
    padding_mask: Tensor | None
    features: Tensor
    grid: tuple[int, int] | None = None
    raw: Tensor | None = None


class BackboneOutput(NamedTuple):
    """What `encode` returns.

    last:         (B, N', D) final output (N' = N, or the number kept with `keep=`, plus a CLS token first
                  when the encoder has one; with `Encoder.encode(queries=)`, the Q queried rows only).
    layers:       L + 1 tensors (B, N', D) when requested: the trunk input after positions (and the input
                  LayerNorm of a post-LN trunk), then every block's output; s3prl's `hidden_states`.
                  For a pre-LN trunk the last entry is after the final LayerNorm (equal to `last`), except
                  with return_layers="blocks", where every entry is a raw block output (data2vec targets).
    padding_mask: (B, N') bool, True at padding, or None.
    ffn:          L tensors (B, N', D) with each block's feed-forward output before its last residual
                  (data2vec v1 audio targets), when requested with return_layers="ffn".
    """

    last: Tensor
    layers: list[Tensor] | None
    padding_mask: Tensor | None
    ffn: list[Tensor] | None = None


@runtime_checkable
class Backbone(Protocol):
    dim: int
    num_layers: int
    samples_per_token: int | None  # input samples (audio) per output token; None when not time-based

    def embed(self, x: Tensor, lengths: Tensor | None = None) -> Tokens: ...

    def encode(
        self,
        tokens: Tokens,
        mask: Tensor | None = None,
        keep: Tensor | None = None,
        return_layers: bool | str = False,
    ) -> BackboneOutput: ...
