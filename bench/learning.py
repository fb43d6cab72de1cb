"""Shared parts of the learning benches (learning_curve.py, learning_check.py, data2vec2_vs_wav2vec2.py):
pretraining one `*_tiny_cpu` speech recipe for a fixed number of steps from a seed, probing an encoder with the
probe of `omnissl probe` (omnissl.eval.probe.run_probe) on the embedded keyword and speaker tasks, and
reporting seeds and intervals the same way everywhere.

Statistics. A point is the mean over pretraining seeds (each seed: its own initialization, data order and
crops, and probe seed), with the sample standard deviation and a 95 % Student-t interval over seeds
(mean ± t(0.975, n - 1) · std / sqrt(n)); it covers seed-to-seed variation of pretraining and probing. The test
set's own sampling error (a binomial standard error sqrt(p (1 - p) / n_test), <= 0.015 with >= 1,100 test
clips) is reported beside it; it is shared by every upstream probed on the same clips, so it does not blur a
comparison on them. The non-learned log-mel baseline is deterministic: its band is its binomial 95 % interval.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("keywords", "speakers")


# --------------------------------------------------------------------------------------------------------
# statistics


def t_interval(values, level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the Student-t `level` interval of the mean over `values`
    (n >= 2; with n = 1 the interval is unbounded: lo = -inf, hi = inf)."""
    from scipy import stats

    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    n, mean = len(vals), statistics.fmean(vals)
    if n == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "lo": -math.inf, "hi": math.inf}
    std = statistics.stdev(vals)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent test items."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def seed_interval(values, n_test: int | None = None, level: float = 0.95) -> dict:
    """`t_interval` over seeds; with one seed (no seed-to-seed interval) and `n_test`, the test set's binomial
    `level` interval instead, marked {"binomial": True}: it covers the test sampling error only, not the seed's."""
    ci = t_interval(values, level)
    if ci["n"] == 1 and n_test:
        from scipy import stats

        half = float(stats.norm.ppf(0.5 + level / 2)) * binomial_se(ci["mean"], n_test)
        ci.update(lo=ci["mean"] - half, hi=ci["mean"] + half, binomial=True)
    return ci


def fmt(ci: dict, digits: int = 3) -> str:
    """"0.412 ± 0.021 [0.360, 0.464] (n=3)": mean ± std [95 % t-interval] (seeds); one seed:
    "0.412 [0.384, 0.440] (n=1: binomial 95 %)" or "0.412 (n=1, no interval)"."""
    if ci["n"] == 1:
        if ci.get("binomial"):
            return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}] (n=1: binomial 95 %)"
        return f"{ci['mean']:.{digits}f} (n=1, no interval)"
    d = digits
    return f"{ci['mean']:.{d}f} ± {ci['std']:.{d}f} [{ci['lo']:.{d}f}, {ci['hi']:.{d}f}] (n={ci['n']})"


def compare(a, b) -> dict:
    """Welch's t-test of mean(a) - mean(b) over seeds -> {"diff", "p", "significant" (p < 0.05)}."""
    from scipy import stats

    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "p": float("nan"), "significant": False}
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"diff": diff, "p": p, "significant": p < 0.05}


# --------------------------------------------------------------------------------------------------------
# pretraining


def recipe_path(objective: str) -> Path:
    """recipes/audio/<objective>_tiny_cpu.yaml; HuBERT's iteration 2 ("hubert2") trains the same recipe on
    other targets (bench/learning_curve.py gives it the units of its iteration 1)."""
    stem = "hubert" if objective == "hubert2" else objective
    path = ROOT / "recipes" / "audio" / f"{stem}_tiny_cpu.yaml"
    if not path.exists():
        raise SystemExit(f"no CPU recipe {path}")
    return path


def _setting(extra: list[str], recipe: dict, key: str):
    """The value of a dotted LightningCLI key (e.g. "data.init_args.train"): the last `--key=value` or
    `--key value` of `extra`, else the recipe's."""
    found, flag = None, f"--{key}"
    for i, arg in enumerate(extra):
        if arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(extra):
            found = extra[i + 1]
    if found is not None:
        return found
    node = recipe
    for part in key.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if node != {} else None


def _hubert_recipe(extra: list[str]) -> tuple[dict, str, str]:
    """HuBERT's CPU recipe (parsed) and the training and validation corpora it trains on with `extra`."""
    import yaml

    recipe = yaml.safe_load(recipe_path("hubert").read_text())
    return recipe, _setting(extra, recipe, "data.init_args.train"), _setting(extra, recipe, "data.init_args.valid")


# Iteration-1 unit sets by the name a recipe gives them (data.init_args.units): km<K>, with -logmel for 64-bin
# log-mel instead of MFCC features and -cmvn for per-utterance normalization (omnissl/eval/units.py).
ITERATION1_UNITS = re.compile(r"km(?P<clusters>\d+)(?P<logmel>-logmel)?(?P<cmvn>-cmvn)?")


def hubert_units(extra: list[str] | None = None, seed: int = 0) -> list[str]:
    """HuBERT iteration 1's targets for the recipe with `extra`: the unit set its `data.init_args.units` names
    (ITERATION1_UNITS; the recipe's km50: 50 MFCC k-means clusters, as its header makes them), fit on half of its
    training corpus and written beside the training and validation manifests (cached, so a rerun costs nothing).
    A training corpus other than `small` gets its own file extension (<units>-<corpus>, appended to the returned
    arguments), so two corpora's k-means never write the same validation file. A units name that is not an
    iteration-1 set (iteration 2's, made by bench/learning_curve.py) is left alone. -> the arguments to train with."""
    from omnissl.eval.units import make_units

    extra = list(extra or [])
    recipe, train, valid = _hubert_recipe(extra)
    units = str(_setting(extra, recipe, "data.init_args.units"))
    match = ITERATION1_UNITS.fullmatch(units)
    if match is None:
        return extra
    clusters = int(match["clusters"])
    num_classes = int(_setting(extra, recipe, "model.init_args.num_classes"))
    if num_classes != clusters:
        raise SystemExit(f"HuBERT: units {units} have {clusters} clusters but model.init_args.num_classes is "
                         f"{num_classes}; pass --model.init_args.num_classes={clusters}")
    ext = units if train == "embedded:small" else f"{units}-{str(train).rsplit(':', 1)[-1]}"
    make_units(train, valid=valid, iteration=1, features="logmel" if match["logmel"] else "mfcc",
               normalize=bool(match["cmvn"]), clusters=clusters, sample_fraction=0.5, seed=seed, out_ext=ext)
    return extra if ext == units else [*extra, f"--data.init_args.units={ext}"]


def hubert_units_iter2(checkpoint: Path, layer: int, clusters: int, ext: str, seed: int = 0,
                       extra: list[str] | None = None) -> None:
    """HuBERT iteration 2's targets (Hsu et al. 2021, sec. 3.2 / 4.2): k-means (`clusters`) of trunk block
    `layer`'s output of the iteration-1 `checkpoint`, over the training corpus of the recipe with `extra` and
    iteration 1's fit fraction, written beside its training and validation manifests as .<ext> (rewritten each
    call; `make_units` caches the layer features and the k-means per checkpoint)."""
    from omnissl.eval.units import make_units

    _, train, valid = _hubert_recipe(list(extra or []))
    make_units(train, valid=valid, iteration=2, checkpoint=checkpoint, layer=layer, clusters=clusters,
               sample_fraction=0.5, seed=seed, out_ext=ext, device="cpu")


def pretrain_args(objective: str, steps: int, seed: int, run_dir: Path | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """LightningCLI arguments of `steps` updates of the objective's CPU recipe from `seed` (model init, data
    order and crops), the LR schedule spanning the run, CSV logging into `run_dir`."""
    recipe = recipe_path(objective)
    args = ["-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c", str(recipe), "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.mode", "csv", "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed)]
    if run_dir is not None:
        args += ["--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir)]
    if "total_steps:" in recipe.read_text():  # the LR schedule must end with the run, not freeze it midway
        args += ["--model.init_args.lr_scheduler.init_args.total_steps", str(steps)]
    return args + list(extra or [])


def pretrain(objective: str, steps: int, seed: int, run_dir: Path | None = None, extra: list[str] | None = None,
             *, max_time: str | None = None) -> dict:
    """Pretrain; -> {"encoder", "initial" (the exact weights pretraining started from), "steps" (updates
    done), "wall_s" (model build + fit), "log_dir"}."""
    from omnissl.cli import lightning_cli

    if objective.startswith("hubert"):
        extra = hubert_units(extra, 0)
    args = pretrain_args(objective, steps, seed, run_dir, extra)
    if max_time is not None:
        args += ["--trainer.max_time", max_time]
    t0 = time.perf_counter()
    initial = copy.deepcopy(lightning_cli(args, run=False).model.encoder)  # same seed -> the same start
    cli = lightning_cli(["fit", *args])
    wall = time.perf_counter() - t0
    encoder = cli.model.encoder
    # (not just the first parameter: data2vec 2.0 never uses the mask embedding, which stays at its init)
    if not any(not torch.equal(a, b) for a, b in zip(encoder.parameters(), initial.parameters())):
        raise RuntimeError(f"{objective}: pretraining changed no encoder weight")
    return {"encoder": encoder, "initial": initial, "steps": int(cli.trainer.global_step), "wall_s": wall,
            "log_dir": cli.trainer.log_dir}


def timed_step(model, batch, step: int, optimizer, forward_context=contextlib.nullcontext) -> float:
    """One full optimizer step as the Trainer runs it (per-update state, forward under the trainer precision's
    autocast `forward_context`, backward, optimizer), in s."""
    t0 = time.perf_counter()
    for module in model.modules():  # per-update state: EMA teacher update, Gumbel temperature
        if module is not model and hasattr(module, "set_num_updates"):
            module.set_num_updates(step)
    with forward_context():
        out = model.step(batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def step_times(objectives, rounds: int = 10, batches: int = 2,
               variants: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Median seconds per full optimizer step of each objective's CPU recipe on the same fixed batches (the
    first objective's data, 4 s crops, batch 8), the objectives interleaved round by round in one process with
    the order alternating, after one warm-up round: ratios between objectives are far less sensitive to other
    load on the machine than the times themselves. variants: more entries "objective@label" -> the extra
    LightningCLI arguments that make that variant of the objective's recipe (timed like the others)."""
    from omnissl.cli import lightning_cli

    variants = variants or {}
    objectives = [*objectives, *variants]
    models, optimizers, contexts, data = {}, {}, {}, None
    for name in objectives:
        extra = hubert_units(variants.get(name), 0) if name.startswith("hubert") else variants.get(name)
        cli = lightning_cli(pretrain_args(name.split("@")[0], 1000, 0, extra=extra), run=False)
        models[name] = cli.model.train()
        contexts[name] = cli.trainer.precision_plugin.forward_context  # autocast of --trainer.precision, as fit
        optimizers[name] = cli.model.optimizer_factory([p for p in cli.model.parameters() if p.requires_grad])
        if data is None or name.startswith("hubert"):  # HuBERT's batches carry its units; the others ignore them
            data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    fixed = []
    for batch in data.train_dataloader():
        fixed.append(batch)
        if len(fixed) == batches:
            break
    times: dict[str, list[float]] = {name: [] for name in objectives}
    order = list(objectives)
    for r in range(rounds + 1):  # round 0 warms up (allocator, first-call costs)
        for name in (order if r % 2 else order[::-1]):
            for batch in fixed:
                dt = timed_step(models[name], batch, r, optimizers[name], contexts[name])
                if r:
                    times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_summary(log_dir: str | None) -> dict[str, tuple[float, float]]:
    """metric -> (mean of the first 10 % of logged values, mean of the last 10 %) of a run's train/* metrics.
    A run resumed from its last checkpoint (re-running a stopped point resumes it) logs each part into its own
    version_N folder beside `log_dir`: all parts are read, in step order."""
    import csv

    if not log_dir:
        return {}
    here = Path(log_dir)
    files = sorted(here.parent.glob("version_*/metrics.csv")) if here.name.startswith("version_") else []
    files = files or sorted(here.glob("**/metrics.csv"))
    rows = [r for f in files for r in csv.DictReader(f.open())]
    if not rows:
        return {}
    rows.sort(key=lambda r: float(r.get("step") or 0))
    out = {}
    for key in (k for k in rows[0] if k.startswith("train/")):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if len(vals) >= 4:
            k = max(1, len(vals) // 10)
            out[key] = (sum(vals[:k]) / k, sum(vals[-k:]) / k)
    return out


def print_training_summary(log_dir: str | None) -> None:
    summary = training_summary(log_dir)
    if summary:
        print("\n| metric | first 10 % of steps | last 10 % of steps |\n|---|---|---|")
        for key, (first, last) in summary.items():
            print(f"| {key} | {first:.4g} | {last:.4g} |")


# --------------------------------------------------------------------------------------------------------
# probing


@functools.cache
def probe_data(task: str, size: str = "small"):
    """The embedded `task` (keywords or speakers) at `size`: train / valid / test loaders (cached)."""
    from omnissl.eval.probe_data import load_probe_data

    spec = f"embedded:{task}:{size}"
    return load_probe_data(spec, spec, spec)


def probe(states, task: str, size: str = "small", *, seed: int = 0, name: str = "upstream") -> dict:
    """The probe of `omnissl probe` (weighted sum of all hidden states, linear head; epoch chosen on valid)
    plus one probe per fixed hidden state -> {"test", "valid", "train", "layer_weights", "per_layer_test",
    "per_layer_valid", "best_layer" (by valid), "n_test", "chance", "se" (binomial, of test)}."""
    from omnissl.eval.probe import run_probe
    from omnissl.eval.upstream import EncoderStates

    if isinstance(states, torch.nn.Module):
        states = EncoderStates(states)
    data = probe_data(task, size)
    scores = run_probe(states, data, name, per_layer=True, seed=seed)
    r = scores.result
    layers = scores.per_layer or [r]
    n_test = len(data.rows["test"]) if "test" in data.rows else None
    per_valid = [p.valid for p in layers]
    return {"test": r.test, "valid": r.valid, "train": r.train, "layer_weights": r.layer_weights,
            "per_layer_test": [p.test for p in layers], "per_layer_valid": per_valid,
            "best_layer": max(range(len(per_valid)), key=per_valid.__getitem__),
            "n_test": n_test, "chance": 1.0 / len(data.classes),
            "se": binomial_se(r.test, n_test) if n_test else None}


def baseline(task: str, size: str = "small", seeds=(0, 1, 2)) -> dict:
    """The non-learned baseline of `omnissl probe --baseline` (baseline_states("audio")), probed as `probe`
    does, once per probe seed (the features are extracted once; the seeds change the head's init and batch
    order, as they do for the encoders' points) -> {"test" (mean over seeds), "tests", "valid", "n_test",
    "chance", "se" (binomial, at the mean)}."""
    from omnissl.eval.probe import extract_splits, fit_classifier
    from omnissl.eval.upstream import baseline_states

    data = probe_data(task, size)
    feats, _ = extract_splits(baseline_states("audio"), data)
    fits = [fit_classifier(feats["train"], feats["valid"], feats["test"], num_classes=len(data.classes), seed=s)
            for s in seeds]
    test = statistics.fmean(r.test for r in fits)
    n_test = len(feats["test"])
    return {"test": test, "tests": [r.test for r in fits], "valid": statistics.fmean(r.valid for r in fits),
            "seeds": list(seeds), "n_test": n_test, "chance": 1.0 / len(data.classes),
            "se": binomial_se(test, n_test)}
