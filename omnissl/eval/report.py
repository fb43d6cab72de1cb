"""The probe report: a markdown table, a PNG plot of the score per layer, and the same logged to W&B.

One row per upstream (the pretrained encoder, the same architecture at random init, the non-learned
baseline), each with its weighted-sum probe result and, when measured, one probe per fixed layer:

    rows = [UpstreamScores("pretrained", result, per_layer), ...]
    paths = write_report(rows, out_dir, title=...)          # probe.md, probe_layers.png
    log_report(rows, paths)                                  # into the active W&B run, if any
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from omnissl.eval.results import UpstreamScores

METRIC_NAMES = {"accuracy": "accuracy", "cer": "CER"}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report_markdown(rows: Sequence[UpstreamScores], *, title: str) -> str:
    """A summary table (weighted sum per upstream, learned layer weights) and a per-layer table."""
    if not rows:
        raise ValueError("nothing to report")
    metric = METRIC_NAMES[rows[0].result.metric]
    lines = [f"# {title}", "", f"| upstream | test {metric} | valid {metric} | train {metric} | selected epoch | "
             "layer weights |", "|---|---|---|---|---|---|"]
    for r in rows:
        w = " ".join(f"{x:.2f}" for x in r.result.layer_weights)
        extra = "".join(f" ({k.upper()} {v:.3f})" for k, v in r.result.extra.items())
        lines.append(f"| {r.name} | {_fmt(r.result.test)}{extra} | {_fmt(r.result.valid)} | {_fmt(r.result.train)} | "
                     f"{r.result.best_epoch} | {w} |")
    layered = [r for r in rows if r.per_layer]
    if layered:
        depth = max(len(r.per_layer) for r in layered)
        lines += ["", f"Test {metric} of a probe on one fixed layer (0 = trunk input; valid in parentheses):", "",
                  "| layer | " + " | ".join(r.name for r in layered) + " |",
                  "|---|" + "---|" * len(layered)]
        for k in range(depth):
            cells = [f"{_fmt(r.per_layer[k].test)} ({_fmt(r.per_layer[k].valid)})" if k < len(r.per_layer) else ""
                     for r in layered]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_layers(rows: Sequence[UpstreamScores], path: str | Path, *, title: str) -> Path:
    """PNG: test score per fixed layer for each multi-layer upstream (markers), its weighted-sum score
    (dotted line), single-state upstreams (the baseline) as dashed lines; the learned layer weights of each
    multi-layer upstream in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRIC_NAMES[rows[0].result.metric]
    multi = [r for r in rows if len(r.result.layer_weights) > 1]
    fig, (ax, axw) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        c = colors[i % len(colors)]
        if len(r.result.layer_weights) > 1:
            if r.per_layer:
                ax.plot(range(len(r.per_layer)), [p.test for p in r.per_layer], "o-", color=c,
                        label=f"{r.name}: layer k")
            ax.axhline(r.result.test, color=c, linestyle=":", label=f"{r.name}: weighted sum")
        else:
            ax.axhline(r.result.test, color=c, linestyle="--", label=r.name)
    depth = max(len(r.result.layer_weights) for r in rows)
    ax.set_xticks(range(depth))
    ax.set_xlabel("layer (0 = trunk input)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"test {metric} per layer", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    width = 0.8 / max(1, len(multi))
    for i, r in enumerate(multi):
        w = r.result.layer_weights
        axw.bar([k + (i - (len(multi) - 1) / 2) * width for k in range(len(w))], w, width=width, label=r.name,
                color=colors[rows.index(r) % len(colors)])
    axw.set_xticks(range(depth))
    axw.set_xlabel("layer")
    axw.set_ylabel("learned weight (softmax)")
    axw.set_title("weighted-sum layer weights", fontsize=9)
    if multi:
        axw.legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a finished report figure as a PNG (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: Sequence[UpstreamScores], out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write `probe.md` and `probe_layers.png` into `out_dir` -> {"markdown": path, "plot": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "probe.md"
    png = plot_layers(rows, out / "probe_layers.png", title=title)
    md.write_text(report_markdown(rows, title=title) + f"\n![test score per layer]({png.name})\n", encoding="utf-8")
    return {"markdown": md, "plot": png}


def report_table(rows: Sequence[UpstreamScores]) -> tuple[list[str], list[list]]:
    """(columns, data) of one row per (upstream, layer), layer "weighted" for the weighted sum."""
    columns = ["upstream", "layer", "metric", "test", "valid", "weight"]
    data = []
    for r in rows:
        data.append([r.name, "weighted", r.result.metric, r.result.test, r.result.valid, None])
        for k, p in enumerate(r.per_layer or []):
            data.append([r.name, str(k), p.metric, p.test, p.valid, r.result.layer_weights[k]
                         if k < len(r.result.layer_weights) else None])
    return columns, data


def log_report(rows: Sequence[UpstreamScores], paths: dict[str, Path], run=None, *, prefix: str = "probe") -> bool:
    """Log the plot (wandb.Image), the scores (wandb.Table) and each upstream's test score into `run`
    (default: the active W&B run, online or offline). Returns False when there is no run."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return False
    run = run if run is not None else wandb.run
    if run is None:
        return False
    columns, data = report_table(rows)
    log = {f"{prefix}/layers": wandb.Image(str(paths["plot"])),
           f"{prefix}/table": wandb.Table(columns=columns, data=data)}
    for r in rows:
        log[f"{prefix}/{r.name.replace(' ', '_')}/test_{r.result.metric}"] = r.result.test
    run.log(log)
    return True
