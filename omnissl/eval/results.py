"""What a probe measured: one `ProbeResult` per fitted probe, one `UpstreamScores` per probed upstream.
Shared by the probe (eval/probe.py) and its report (eval/report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    """What a probe measured. metric: "accuracy" (higher is better) or "cer" (lower is better)."""

    metric: str
    test: float
    valid: float | None
    train: float
    layer_weights: list[float]
    best_epoch: int
    extra: dict[str, float] = field(default_factory=dict)



@dataclass
class UpstreamScores:
    """name: what was probed; result: the weighted-sum (or fixed-layer) probe; per_layer: one probe per
    hidden state 0..S-1 (None when not measured)."""

    name: str
    result: ProbeResult
    per_layer: list[ProbeResult] | None = None
