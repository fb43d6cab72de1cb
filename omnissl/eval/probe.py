"""Linear probes on frozen encoders (first version: mean-pooled features of every layer, one linear
classifier per layer).

Legend: U utterances, L layers, D width, K classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from omnissl.batch import Batch


@torch.no_grad()
def pooled_features(encoder: nn.Module, batches: Iterable[Batch], modality: str) -> tuple[Tensor, Tensor]:
    """Mean-pool every layer's output over valid tokens (CLS excluded). -> ((U, L + 1, D) float32, (U,) labels).

    The encoder runs in eval mode (no dropout, no layerdrop) and receives no gradients.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    prefix = getattr(encoder, "num_prefix", 0)
    for batch in batches:
        if "label" not in batch.targets:
            raise ValueError("probe batches need targets['label']: use a labeled manifest/DataModule")
        x = batch.inputs[modality]
        out = encoder.encode(encoder.embed(x, batch.lengths.get(modality)), return_layers=True)
        layers = torch.stack(out.layers, 1)[:, :, prefix:]  # (B, L+1, N, D)
        pad = out.padding_mask
        if pad is None:
            pooled = layers.mean(2)
        else:
            valid = (~pad[:, prefix:]).float()[:, None, :, None]
            pooled = (layers * valid).sum(2) / valid.sum(2).clamp(min=1)
        feats.append(pooled.float().cpu())
        labels.append(batch.targets["label"].cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, c: float = 1.0,
                          seed: int = 0) -> float:
    """Standardized features -> multinomial logistic regression (L2, strength 1/c) -> test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    unseen = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen} never occur in the training split")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(train_x.numpy().astype(np.float64), train_y.numpy())
    return float(clf.score(test_x.numpy().astype(np.float64), test_y.numpy()))


def probe_layers(encoder: nn.Module, train: Iterable[Batch], test: Iterable[Batch], modality: str,
                 layers: list[int] | None = None) -> dict[int, float]:
    """Accuracy of a linear probe on each chosen layer (default: all L + 1) of a frozen encoder."""
    tr_x, tr_y = pooled_features(encoder, train, modality)
    te_x, te_y = pooled_features(encoder, test, modality)
    chosen = range(tr_x.shape[1]) if layers is None else layers
    return {k: linear_probe_accuracy(tr_x[:, k], tr_y, te_x[:, k], te_y) for k in chosen}
