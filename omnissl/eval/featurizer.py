"""Featurizer and downstream heads of a probe (s3prl's Featurizer and SUPERB's downstreams).

    feat = Featurizer(S, D)                     # softmax-weighted sum of the S hidden states (or one `layer`)
    feat.fit_statistics(train_states)           # fixed per-state standardization from the training split
    head = classifier_head(D, K, "linear")      # utterance classification on pooled features
    head = CTCHead(D, V, "linear")              # frame classifier for character CTC

Legend: B batch, N frames, S = L + 1 hidden states, D width, K classes, V vocabulary (blank included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnissl.ops import Dropout


class Featurizer(nn.Module):
    """Weighted sum of S hidden states (s3prl's Featurizer): softmax(w) with w initialized to 0, so uniform;
    or one fixed state (`layer`). Each state is first standardized by fixed per-state, per-channel statistics
    of the training split (`shift`, `scale`, set by `fit_statistics`).

    # NOTE(ref): s3prl mixes raw states (optionally LayerNorm'd per frame); we also standardize each state
    # with training-set statistics, because states of different layers differ in scale by orders of
    # magnitude (conv features vs. post-LN blocks), and otherwise the learned weights mostly measure scale.

    hs (..., S, D) -> (..., D).
    """

    def __init__(self, num_states: int, dim: int, *, layer: int | None = None) -> None:
        super().__init__()
        if layer is not None and not -num_states <= layer < num_states:
            raise ValueError(f"layer {layer} out of range for {num_states} hidden states")
        self.num_states, self.layer = num_states, (None if layer is None else layer % num_states)
        self.logits = nn.Parameter(torch.zeros(num_states), requires_grad=layer is None)
        self.register_buffer("shift", torch.zeros(num_states, dim))
        self.register_buffer("scale", torch.ones(num_states, dim))

    @torch.no_grad()
    def fit_statistics(self, hs: Tensor) -> None:
        """Per-state, per-channel mean and standard deviation of (M, S, D) training vectors."""
        hs = hs.float()
        std = hs.std(0, unbiased=False)
        self.shift.copy_(hs.mean(0))
        self.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant in train: left unscaled

    @torch.no_grad()
    def weights(self) -> Tensor:
        """(S,) the mixing weights (one-hot for a fixed layer), detached; they sum to 1."""
        if self.layer is not None:
            return F.one_hot(torch.tensor(self.layer), self.num_states).float()
        return self.logits.softmax(0)

    def forward(self, hs: Tensor) -> Tensor:
        if hs.shape[-2] != self.num_states:
            raise ValueError(f"expected {self.num_states} hidden states, got {hs.shape[-2]}")
        z = (hs.float() - self.shift) / self.scale
        if self.layer is not None:
            return z[..., self.layer, :]
        return torch.einsum("...sd,s->...d", z, self.logits.softmax(0))


def classifier_head(dim: int, num_classes: int, kind: str = "linear", *, hidden: int = 256,
                    dropout: float = 0.1) -> nn.Module:
    """Utterance classifier on pooled features: "linear" (D -> K) or "mlp" (D -> hidden -> ReLU -> K)."""
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown classification head {kind!r}; expected linear or mlp")


class CTCHead(nn.Module):
    """Frame classifier over V = vocabulary + blank for CTC. x (B, N, D), lengths (B,) -> log-probabilities
    (B, N, V).

    "linear" (D -> V): SUPERB's phoneme-recognition downstream (and wav2vec 2.0 fine-tuning's output layer);
    the default, since it measures what the frames themselves encode and trains in seconds on a CPU.
    "lstm": a bidirectional LSTM, then 2 x hidden -> V; SUPERB's ASR downstream (2 x 1024). It adds context
    the upstream may lack, and is slow without a GPU (1 x 256 wide: 12 s per batch of 8 x 10 s utterances,
    forward and backward, measured on one shared CPU core).
    """

    def __init__(self, dim: int, vocab_size: int, kind: str = "linear", *, hidden: int = 256, layers: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in ("linear", "lstm"):
            raise ValueError(f"unknown CTC head {kind!r}; expected linear or lstm")
        self.kind = kind
        self.rnn = (nn.LSTM(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)
                    if kind == "lstm" else None)
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(2 * hidden if self.rnn is not None else dim, vocab_size)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.out(self.dropout(x)).log_softmax(-1)

