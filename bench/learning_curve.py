"""Learning curves: probe accuracy of each speech objective's encoder vs pretraining budget, over seeds.

Each objective pretrains from its `recipes/audio/<objective>_tiny_cpu.yaml` (with recipes/trainer/cpu.yaml) for
a fixed number of STEPS per budget, from several seeds; each checkpoint is probed with the probe of
`omnissl probe` (omnissl.eval.probe.run_probe: weighted sum of all hidden states, linear head, epoch chosen on
valid; plus one probe per fixed hidden state) on the embedded keyword and speaker tasks (held-out voices and
accents, noise, reverb; >= 1,100 test clips each). Budget 0 is the random initialization each run started
from. The non-learned log-mel baseline (`baseline_states("audio")`, as `omnissl probe --baseline`) is probed
the same way.

Budgets are steps, calibrated to minutes of an idle 2-core VM (IDLE_STEP_S below): steps give the same
result whatever else runs on the machine, minutes do not (the VM is shared; wall time is recorded too, with
the load average). Every finished (objective, seed, budget, task) lands as a small JSON under
bench/results/learning_curve/<tag>/<objective>/ and is skipped when the script runs again with the same
configuration (its hash: recipe and trainer files, steps, extra arguments, corpus versions); so the curve
fills up across sessions (commit the JSONs). The encoder of each run is kept as a package under
runs/learning_curve/ (not committed), so adding a task later re-probes without pretraining again.

    python bench/learning_curve.py [--objectives wav2vec2 data2vec2] [--minutes 5 10 20] [--seeds 0 1 2] \
        [--tasks keywords speakers] [--tag recipes] [--extra=--model.init_args.x=1 ...] [--commit]
    python bench/learning_curve.py --report-only            # table + PNG from the JSONs already there

Reports, per task, mean ± std [95 % t-interval over seeds] per (objective, budget), the random-init and
log-mel bands, and draws bench/results/learning_curve/<tag>/learning_curve.png. Ends with one line per point:
    RESULT name=learning_curve task=... objective=... minutes=... steps=... mean=... std=... lo=... hi=... n=...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402

ROOT = learning.ROOT
RESULTS = ROOT / "bench" / "results" / "learning_curve"
RUNS = ROOT / "runs" / "learning_curve"
OBJECTIVES = ("wav2vec2", "hubert", "hubert2", "data2vec", "data2vec2")
NAMES = {"wav2vec2": "wav2vec 2.0", "hubert": "HuBERT (iter. 1)", "hubert2": "HuBERT (iter. 2)", "data2vec": "data2vec",
         "data2vec2": "data2vec 2.0"}
# HuBERT iteration 2 (Hsu et al. 2021, sec. 4.2: BASE iteration 2 clusters the iteration-1 model's block 6 of 12
# into 500 units, after 100 MFCC units; block 6 was chosen by how well its clusters match phones, sec. 5): here
# block 1 of 4 of the iteration-1 encoder of the same budget and seed, 100 units after iteration 1's 50. Its budget
# counts iteration 2's own steps (as many as iteration 1's); iteration 1 of that budget, and the k-means, come
# before it. NOTE(ref): block 1, not the middle block, by the paper's own criterion with keywords for phones
# (bench/hubert_targets.py, bag-of-units keyword accuracy, K = 100: block 1 0.286 / block 2 0.248 / MFCC 0.266 at
# 5 minutes on `small`; 0.304 / 0.218 / 0.273 (MFCC K = 50) at 20 minutes on `default`). Keywords at 5 minutes,
# 3 seeds: iteration 1 0.398 ± 0.007, iteration 2 on block 2 0.388 ± 0.007, on block 1 0.397 ± 0.006
# (docs/hubert.md).
HUBERT2_LAYER, HUBERT2_CLUSTERS = 1, 100

# Seconds per update of each *_tiny_cpu recipe on the idle 2-core VM, which turn a budget in minutes into the
# fixed number of steps every run of that budget takes. The anchor: wav2vec 2.0 with the conv extractor, 0.20 s
# (ANCHOR_STEP_S below). The recipes' log-mel frontend: `--calibrate` on 2026-12-07 02:39 (load average 0.2-0.8;
# bench/results/learning_curve/calibration.json) timed each recipe interleaved with the anchor: wav2vec 2.0 0.089 s
# vs the anchor's 0.285 s, HuBERT 0.087, data2vec 0.109, data2vec 2.0 0.208; the ratios times 0.20 s are these.
# (The conv-extractor recipes of the history tags used wav2vec 2.0 / HuBERT 0.20, data2vec 0.30, data2vec 2.0
# 0.36: their JSONs record their steps.)
IDLE_STEP_S = {"wav2vec2": 0.062, "hubert": 0.061, "hubert2": 0.061, "data2vec": 0.077, "data2vec2": 0.146}
# The same under `--extra=--trainer.precision=bf16-mixed` (bf16 autocast, fp32 weights):
# `--calibrate --extra=--trainer.precision=bf16-mixed` on 2026-12-07 20:32 (an AMD EPYC VM with AVX512-BF16, no
# AMX; learning runs paused, load average 2.2 -> 2.1, decaying; calibration-bf16-mixed.json) timed each recipe
# against itself in fp32, interleaved: 0.037 vs 0.064 s (wav2vec 2.0), 0.034 vs 0.061 (HuBERT), 0.045 vs 0.079
# (data2vec), 0.092 vs 0.147 (data2vec 2.0): 1.6-1.8x the steps per idle minute. The fp32 times of that run match
# IDLE_STEP_S within 4 %. A CPU without native bf16 is slower in bf16, not faster.
IDLE_STEP_S_BF16 = {"wav2vec2": 0.036, "hubert": 0.034, "hubert2": 0.034, "data2vec": 0.044, "data2vec2": 0.091}
CALIBRATED = {"32": IDLE_STEP_S, "bf16-mixed": IDLE_STEP_S_BF16}


def precision(extra: list[str] | tuple[str, ...]) -> str:
    """The trainer precision that `extra` sets ("32", the CPU recipe's, unless it sets one)."""
    value = "32"
    for arg in extra:
        if arg.startswith("--trainer.precision="):
            value = arg.split("=", 1)[1]
    return value


# Arguments that change what one step computes (the model's size, the batch, the crops): a variant that sets one
# has its own step time, measured with `--calibrate --tag T --extra=...` into bench/results/learning_curve/T/
# calibration.json; without that, a run is refused (the recipe's step time would buy it the wrong budget).
COMPUTE_ARGS = ("encoder.init_args.", "init_args.decoder", "clone_batch", "batch_size", "max_samples", "max_tokens")


def changes_compute(extra: list[str] | tuple[str, ...]) -> list[str]:
    return [a for a in extra if any(k in a.split("=", 1)[0] for k in COMPUTE_ARGS)]


def tag_calibration(tag: str | None) -> Path | None:
    return RESULTS / tag / "calibration.json" if tag else None


def idle_step_s(objective: str, extra: list[str] | tuple[str, ...] = (), tag: str | None = None) -> float:
    """Seconds per step of this objective's recipe with `extra` on the idle 2-core VM: the tag's own calibration
    where it has one (it must have been measured with the same `extra`), else the table of the precision `extra`
    sets (only when `extra` changes no compute)."""
    own = tag_calibration(tag)
    if own is not None and own.exists():
        try:
            record = json.loads(own.read_text())
            measured, table = record["extra"], record["suggested_idle_step_s"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{own}: not a calibration record ({e!r}); delete it and run --calibrate --tag {tag} "
                             f"again") from None
        if measured != list(extra) or objective not in table:
            raise ValueError(f"{own} was measured for {measured} and "
                             f"{sorted(table)}, not {list(extra)} and {objective}: "
                             f"calibrate again with --calibrate --tag {tag} --objectives {objective} (and this --extra)")
        return table[objective]
    if changes_compute(extra):
        raise ValueError(f"{' '.join(changes_compute(extra))} changes the step time: measure it with --calibrate "
                         f"--tag {tag or 'TAG'} --objectives {objective} (and the same --extra) first")
    table = CALIBRATED.get(precision(extra))
    if not table or objective not in table:
        raise ValueError(f"no idle step time for {objective} at trainer.precision={precision(extra)}: measure it "
                         f"with --calibrate --objectives {objective} (and the same --extra), then fill in "
                         f"IDLE_STEP_S{'_BF16' if precision(extra) == 'bf16-mixed' else ''} in bench/learning_curve.py")
    return table[objective]


def steps_for(objective: str, minutes: float, extra: list[str] | tuple[str, ...] = (), tag: str | None = None) -> int:
    """The steps an idle 2-core VM makes in `minutes` with this objective's recipe and `extra` (idle_step_s)."""
    return int(round(minutes * 60 / idle_step_s(objective, extra, tag) / 10)) * 10


def corpus_versions() -> dict[str, int]:
    from omnissl.datamodules.corpora import labeled_speech, speech

    return {"speech": speech.VERSION, "labeled_speech": labeled_speech.VERSION}


# Trainer callbacks that only draw or log (they change no weight): left out of the configuration hash, so adding
# one to recipes/trainer/cpu.yaml does not make every result stale.
DRAWING_ONLY = ("omnissl.train.pictures.Pictures",)


def without_drawing_callbacks(text: str) -> str:
    """A trainer recipe's text without the list entries of DRAWING_ONLY callbacks (the entry line and the lines
    indented under it)."""
    out, skip_indent = [], None
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None and (not line.strip() or indent > skip_indent):
            continue
        skip_indent = None
        if line.lstrip().startswith("- class_path:") and line.split("class_path:", 1)[1].split("#")[0].strip() \
                in DRAWING_ONLY:
            skip_indent = indent
            continue
        out.append(line)
    return "".join(out)


def config_hash(objective: str, steps: int, extra: list[str]) -> str:
    """What decides a result: the recipe and trainer files (less drawing-only callbacks), steps, extra arguments,
    corpus versions, probe."""
    h = hashlib.sha256()
    trainer = without_drawing_callbacks((ROOT / "recipes/trainer/cpu.yaml").read_text())
    for part in (learning.recipe_path(objective).read_text(), trainer,
                 json.dumps([steps, extra, corpus_versions(), "run_probe defaults, per_layer"])):
        h.update(part.encode())
    return h.hexdigest()[:12]


def result_path(tag: str, objective: str, minutes: float, seed: int, task: str) -> Path:
    return RESULTS / tag / objective / f"{minutes:g}min-seed{seed}-{task}.json"


def fresh(path: Path, key: str) -> bool:
    """A result exists and was made with this configuration (a stale one is redone, with a message)."""
    if not path.exists():
        return False
    found = json.loads(path.read_text()).get("config")
    if found != key:
        print(f"{path}: made with configuration {found}, now {key}: redoing it", flush=True)
        return False
    return True


def git_commit(paths: list[Path], message: str) -> None:
    """Commit `paths` alone (whatever else is staged). A failure (e.g. another git command holding the index
    lock) is retried, then reported; it never stops the measurement: the JSON is on disk either way."""
    rel = [str(p.relative_to(ROOT)) for p in paths]
    for attempt in range(5):
        add = subprocess.run(["git", "-C", str(ROOT), "add", *rel], capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", *rel], capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"warning: could not commit {', '.join(rel)}; commit it by hand", flush=True)


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def run_point(objective: str, minutes: float, seed: int, tasks: list[str], tag: str, extra: list[str],
              commit: bool, keep_run: bool = False) -> None:
    """Pretrain (or reuse the kept encoder), probe the tasks still missing, write their JSONs; also the
    random-init (0 min) JSONs of this seed. keep_run: the run folder (its checkpoint) is needed too, so pretrain
    when it is missing even if every JSON is there (HuBERT iteration 1 for iteration 2, whose JSONs may come
    from another checkout)."""
    from omnissl.checkpoints import load_backbone, save_backbone

    steps = steps_for(objective, minutes, extra, tag)
    if objective == "hubert2":  # iteration 1 of this budget and seed first; its encoder's units are the targets
        extra = hubert2_extra(minutes, seed, tasks, tag, extra, commit)
    key, key0 = config_hash(objective, steps, extra), config_hash(objective, 0, extra)
    todo = [t for t in tasks if not fresh(result_path(tag, objective, minutes, seed, t), key)]
    todo0 = [t for t in tasks if objective != "hubert2"  # (its random init is iteration 1's: the same weights)
             and not fresh(result_path(tag, objective, 0, seed, t), key0)]
    run_dir = RUNS / tag / objective / f"{minutes:g}min-seed{seed}-{key}"
    if not todo and not todo0 and not (keep_run and not (run_dir / "pretrain.json").exists()):
        print(f"{objective} {minutes:g} min seed {seed}: done ({', '.join(tasks)})", flush=True)
        return
    package, initial_package = run_dir / "encoder", run_dir / "initial"
    info_file = run_dir / "pretrain.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        encoder, initial = load_backbone(package), load_backbone(initial_package)
        print(f"{objective} {minutes:g} min seed {seed}: reusing {package}", flush=True)
    else:
        print(f"{objective} {minutes:g} min seed {seed}: pretraining {steps} steps", flush=True)
        load0 = os.getloadavg()[0]
        out = learning.pretrain(objective, steps, seed, run_dir, extra)
        if out["steps"] != steps:  # stopped early (a signal, a time limit): not the point it would be recorded as
            raise SystemExit(f"{objective} {minutes:g} min seed {seed}: pretraining stopped after {out['steps']} of "
                             f"{steps} steps; nothing recorded (run again to redo it)")
        encoder, initial = out["encoder"], out["initial"]
        save_backbone(encoder, package)
        save_backbone(initial, initial_package)
        info = {"steps": out["steps"], "wall_s": round(out["wall_s"], 1), "load_start": round(load0, 2),
                "load_end": round(os.getloadavg()[0], 2), "training": learning.training_summary(out["log_dir"])}
        write_json(info_file, info)
    common = {"objective": objective, "seed": seed, "tag": tag, "extra": extra, "corpus": corpus_versions(),
              "recipe": str(learning.recipe_path(objective).relative_to(ROOT)), "size": "small",
              "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count()}
    for task in todo0:
        t0 = time.perf_counter()
        res = learning.probe(initial, task, seed=seed, name=f"{objective} random init")
        path = write_json(result_path(tag, objective, 0, seed, task),
                          {**common, "config": key0, "minutes": 0, "steps": 0, "task": task, "probe": res,
                           "probe_s": round(time.perf_counter() - t0, 1)})
        print(f"  {task} random init: test {res['test']:.3f} (valid {res['valid']:.3f}) -> {path.name}", flush=True)
        if commit:
            git_commit([path], f"learning curve: {objective} random init, seed {seed}, {task}")
    for task in todo:
        t0 = time.perf_counter()
        res = learning.probe(encoder, task, seed=seed, name=f"{objective} {minutes:g} min")
        path = write_json(result_path(tag, objective, minutes, seed, task),
                          {**common, "config": key, "minutes": minutes, "steps": info["steps"],
                           "planned_steps": steps, "wall_s": info["wall_s"], "load_start": info["load_start"],
                           "load_end": info["load_end"], "training": info["training"], "task": task, "probe": res,
                           "probe_s": round(time.perf_counter() - t0, 1)})
        print(f"  {task} {minutes:g} min: test {res['test']:.3f} (valid {res['valid']:.3f}, best layer "
              f"{res['best_layer']}) -> {path.name}", flush=True)
        if commit:
            git_commit([path], f"learning curve: {objective} {minutes:g} min, seed {seed}, {task}")


def hubert2_extra(minutes: float, seed: int, tasks: list[str], tag: str, extra: list[str], commit: bool) -> list[str]:
    """Run (or reuse) HuBERT iteration 1 at this budget and seed, make iteration 2's units from its last
    checkpoint (written beside the corpus as .km-it2-<iteration-1 config>-seed<seed>-L<layer>-K<clusters>; its
    features and k-means are cached per checkpoint), and return iteration 2's arguments."""
    run_point("hubert", minutes, seed, tasks, tag, extra, commit, keep_run=True)
    key1 = config_hash("hubert", steps_for("hubert", minutes, extra, tag), extra)
    run1 = RUNS / tag / "hubert" / f"{minutes:g}min-seed{seed}-{key1}"
    ckpts = sorted(run1.glob("**/checkpoints/last.ckpt"))
    if not ckpts:
        raise SystemExit(f"HuBERT iteration 2 needs iteration 1's checkpoint: no last.ckpt under {run1} (delete "
                         "that folder to pretrain iteration 1 again)")
    ext = f"km-it2-{key1}-seed{seed}-L{HUBERT2_LAYER}-K{HUBERT2_CLUSTERS}"  # per seed: parallel seeds never share it
    learning.hubert_units_iter2(ckpts[-1], HUBERT2_LAYER, HUBERT2_CLUSTERS, ext, seed, extra)
    return [*extra, f"--data.init_args.units={ext}", f"--model.init_args.num_classes={HUBERT2_CLUSTERS}"]


def baseline_result(tag: str, task: str, commit: bool, seeds=(0, 1, 2)) -> dict:
    """The log-mel baseline's probe on `task`, mean over the probe seeds (deterministic features; cached as a
    JSON like the points)."""
    from omnissl.eval.upstream import baseline_states

    base = baseline_states("audio")
    key = baseline_key(seeds)
    path = RESULTS / tag / f"baseline-{task}.json"
    if fresh(path, key):
        return json.loads(path.read_text())
    for other in sorted(RESULTS.glob(f"*/baseline-{task}.json")):  # another tag's, made the same way: reuse it
        if other != path and json.loads(other.read_text()).get("config") == key:
            record = json.loads(other.read_text())
            write_json(path, record)
            if commit:
                git_commit([path], f"learning curve: log-mel baseline, {task} (as in {other.parent.name})")
            return record
    res = learning.baseline(task, seeds=seeds)
    record = {"config": key, "task": task, "features": vars_of(base), "corpus": corpus_versions(), "probe": res}
    write_json(path, record)
    if commit:
        git_commit([path], f"learning curve: log-mel baseline, {task}")
    return record


def baseline_key(seeds=(0, 1, 2)) -> str:
    """What decides the baseline's result: its settings, the corpus versions, the probe and its seeds."""
    from omnissl.eval.upstream import baseline_states

    return hashlib.sha256(json.dumps([vars_of(baseline_states("audio")), corpus_versions(), "run_probe defaults",
                                      list(seeds)]).encode()).hexdigest()[:12]


def vars_of(states) -> dict:
    """The defining settings of a baseline upstream (for its cache key)."""
    return {"class": type(states).__name__, "dim": states.dim,
            **{k: v for k, v in vars(states).items() if v is None or isinstance(v, (int, float, bool, str))}}


# --------------------------------------------------------------------------------------------------------
# report


def collect(tag: str, history: bool = False) -> dict:
    """(task, objective, minutes) -> list of JSON records (current configuration only; with `history`, every
    record of the tag, whatever recipe, trainer file or corpus version made it)."""
    out: dict = {}
    stale = 0
    for path in sorted((RESULTS / tag).glob("*/*min-seed*-*.json")):
        r = json.loads(path.read_text())
        steps = r["planned_steps"] if r["minutes"] else 0
        if not history and r["config"] != config_hash(r["objective"], steps, r["extra"]):
            stale += 1  # made with another recipe, trainer file or corpus version
            continue
        out.setdefault((r["task"], r["objective"], r["minutes"]), []).append(r)
    if stale:
        print(f"{tag}: {stale} results made with an earlier configuration left out (--history reports them)",
              flush=True)
    return out


def random_init(points: dict, task: str) -> list[float]:
    """The random-init probe accuracies of `task`, one per seed (the mean over the objectives run from that
    seed: the same seed gives the same initial encoder, so counting each objective would inflate n)."""
    by_seed: dict[int, list[float]] = {}
    for (t, _, m), rs in points.items():
        if t == task and m == 0:
            for r in rs:
                by_seed.setdefault(r["seed"], []).append(r["probe"]["test"])
    return [sum(v) / len(v) for _, v in sorted(by_seed.items())]


def report(tag: str, tasks: list[str], commit: bool, history: bool = False) -> None:
    points = collect(tag, history)
    if not history:
        for task in tasks:
            baseline_result(tag, task, commit)
    lines = [f"# Learning curves ({tag}{', history' if history else ''})\n",
             "Probe test accuracy (probe of `omnissl probe`: weighted sum of all hidden states, linear head) after "
             "a fixed number of pretraining steps per budget (minutes of an idle 2-core VM; "
             "bench/learning_curve.py); mean ± std [95 % t-interval] over pretraining seeds (n; a point from one "
             "seed has no seed interval: its bracket is the test set's binomial 95 %). "
             "se: binomial standard error of the test set at that mean. Best layer: the hidden state whose own "
             "probe is best on valid (0 = trunk input), per seed.\n"]
    if history:
        lines.append("History: these results were made with the recipes, trainer file and corpus versions recorded in "
                     "each JSON (`recipe`, `corpus`, `date`), which the current files may no longer reproduce.\n")
    for task in tasks:
        base = json.loads((RESULTS / tag / f"baseline-{task}.json").read_text())["probe"] \
            if (RESULTS / tag / f"baseline-{task}.json").exists() else None
        random = random_init(points, task)
        lines.append(f"\n## {task}\n")
        if base:
            half = 1.96 * base["se"]
            lines.append(f"log-mel baseline (`baseline_states(\"audio\")`, mean over probe seeds "
                         f"{base.get('seeds', [0])}): **{base['test']:.3f}** (binomial 95 % "
                         f"[{base['test'] - half:.3f}, {base['test'] + half:.3f}], {base['n_test']} test clips; "
                         f"chance {base['chance']:.3f})  ")
        if random:
            lines.append(f"random init (one value per seed, averaged over the objectives, whose tiny encoders start "
                         f"from the same weights for a seed): {learning.fmt(learning.t_interval(random))}\n")
        lines.append("| objective | minutes (idle) | steps | test accuracy | se | best layer per seed | "
                     "per-layer test (mean) | wall min (mean) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for obj in OBJECTIVES:
            for minutes in sorted(m for (t, o, m) in points if t == task and o == obj):
                rs = points[(task, obj, minutes)]
                ci = learning.seed_interval([r["probe"]["test"] for r in rs], rs[0]["probe"]["n_test"])
                per_layer = [sum(x) / len(x) for x in zip(*(r["probe"]["per_layer_test"] for r in rs))]
                wall = [r["wall_s"] / 60 for r in rs if r.get("wall_s") and minutes]
                lines.append(
                    f"| {NAMES[obj]} | {minutes:g} | {rs[0]['steps']} | {learning.fmt(ci)} | "
                    f"{learning.binomial_se(ci['mean'], rs[0]['probe']['n_test']):.3f} | "
                    f"{' '.join(str(r['probe']['best_layer']) for r in rs)} | "
                    f"{' '.join(f'{x:.3f}' for x in per_layer)} | "
                    f"{f'{sum(wall) / len(wall):.1f}' if wall else '-'} |")
                print(f"RESULT name=learning_curve task={task} objective={obj} minutes={minutes:g} "
                      f"steps={rs[0]['steps']} mean={ci['mean']:.4f} std={ci['std']:.4f} lo={ci['lo']:.4f} "
                      f"hi={ci['hi']:.4f} n={ci['n']}")
    text = "\n".join(lines) + "\n"
    (RESULTS / tag).mkdir(parents=True, exist_ok=True)
    (RESULTS / tag / "results.md").write_text(text)
    print(text)
    png = plot(tag, tasks, points)
    if commit:
        git_commit([RESULTS / tag / "results.md", png], f"learning curve: report ({tag})")


def plot(tag: str, tasks: list[str], points: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        base_file = RESULTS / tag / f"baseline-{task}.json"
        if base_file.exists():
            b = json.loads(base_file.read_text())["probe"]
            ax.axhspan(b["test"] - 1.96 * b["se"], b["test"] + 1.96 * b["se"], color="0.6", alpha=0.35,
                       label=f"log-mel baseline {b['test']:.3f}")
            ax.axhline(b["test"], color="0.4", lw=1)
        random = random_init(points, task)
        if len(random) >= 2:
            ci = learning.t_interval(random)
            ax.axhspan(ci["lo"], ci["hi"], color="tab:red", alpha=0.15, label=f"random init {ci['mean']:.3f}")
        for obj in OBJECTIVES:
            ms = sorted(m for (t, o, m) in points if t == task and o == obj)  # 0: its random init
            if not [m for m in ms if m > 0]:
                continue
            cis = [learning.seed_interval([r["probe"]["test"] for r in points[(task, obj, m)]],
                                          points[(task, obj, m)][0]["probe"]["n_test"]) for m in ms]
            means = [c["mean"] for c in cis]
            err = [[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]]
            ax.errorbar(ms, means, yerr=err, marker="o", capsize=4,
                        label=f"{NAMES[obj]} (n={min(c['n'] for c in cis)}-{max(c['n'] for c in cis)} seeds)")
        ax.set_xlabel("pretraining budget (minutes of an idle 2-core CPU; fixed steps)")
        ax.set_ylabel("probe test accuracy")
        ax.set_title(f"{task} (embedded, small; held-out voices)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Probe accuracy vs pretraining budget\n(mean and 95 % t-interval over seeds; a point from one seed: "
                 "the test set's binomial 95 %)", fontsize=10)
    fig.tight_layout()
    path = RESULTS / tag / "learning_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The anchor of every calibration: wav2vec 2.0's recipe with the conv extractor, whose full step took 0.20 s on the
# idle 2-core VM (1,500 steps of `make demo` in 272 s; 0.213 s interleaved in bench/data2vec2_vs_wav2vec2.py).
ANCHOR, ANCHOR_EXTRA, ANCHOR_STEP_S = "wav2vec2@conv", ["--model.init_args.encoder.init_args.audio_frontend=conv"], 0.20


def calibrate(objectives: list[str], extra: list[str], tag: str = "recipes") -> None:
    """Median step times, interleaved in one process (learning.step_times): a ratio is far less sensitive to load
    than a time; still, run it on a machine as quiet as you can get.

    Without `extra`: each objective's recipe against the anchor; the ratios times the anchor's idle 0.20 s suggest
    IDLE_STEP_S (calibration.json). With `extra` (e.g. --trainer.precision=bf16-mixed): each recipe with `extra`
    against the same recipe without it; the ratios times IDLE_STEP_S suggest the variant's table
    (IDLE_STEP_S_BF16; calibration-<precision>.json). An `extra` that changes the compute (COMPUTE_ARGS: a wider or
    deeper encoder, ...) belongs to a variant tag: its table goes to <tag>/calibration.json, which that tag's runs
    then use (idle_step_s)."""
    if changes_compute(extra) and tag == "recipes":
        raise SystemExit(f"{' '.join(changes_compute(extra))} makes a variant of the recipes: name it with --tag")
    load = os.getloadavg()[0]
    if extra:
        variants = {f"{o}@{kind}": (list(extra) if kind == "extra" else [])
                    for o in objectives for kind in ("plain", "extra")}
        median = learning.step_times([], variants=variants)
        suggested = {o: round(IDLE_STEP_S[o] * median[f"{o}@extra"] / median[f"{o}@plain"], 3) for o in objectives}
        anchor = "each recipe without the extra arguments, at IDLE_STEP_S"
    else:
        median = learning.step_times(objectives, variants={ANCHOR: ANCHOR_EXTRA})
        suggested = {o: round(ANCHOR_STEP_S * median[o] / median[ANCHOR], 3) for o in objectives}
        anchor = [ANCHOR, ANCHOR_STEP_S]
    record = {"median_step_s": median, "load_start": load, "load_end": os.getloadavg()[0], "extra": extra,
              "date": time.strftime("%Y-%m-%d %H:%M"), "anchor": anchor, "suggested_idle_step_s": suggested}
    print(json.dumps(record, indent=1))
    suffix = "" if precision(extra) == "32" else f"-{precision(extra)}"
    write_json(tag_calibration(tag) if changes_compute(extra) else RESULTS / f"calibration{suffix}.json", record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--minutes", nargs="+", type=float, default=[5, 10, 20], help="budgets (idle-VM minutes)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(learning.TASKS), choices=learning.TASKS)
    ap.add_argument("--tag", default="recipes", help="results folder name (a recipe variant: use with --extra)")
    ap.add_argument("--extra", action="append", default=[],
                    help="one more LightningCLI argument for every pretraining run, e.g. --extra=--model.init_args.x=1")
    ap.add_argument("--report-only", action="store_true", help="no training: the table and PNG from the JSONs")
    ap.add_argument("--history", action="store_true",
                    help="with --report-only: report every JSON of the tag, also those made with earlier recipes")
    ap.add_argument("--commit", action="store_true", help="git-commit each JSON as it lands, and the report")
    ap.add_argument("--calibrate", action="store_true",
                    help="only measure the step-time ratios to wav2vec 2.0 (interleaved) and suggest IDLE_STEP_S")
    args = ap.parse_args()

    if args.calibrate:
        calibrate(args.objectives, args.extra, args.tag)
        return

    if not args.report_only:
        for objective in args.objectives:  # a budget that cannot be turned into steps fails before any work
            try:
                steps_for(objective, 1, args.extra, args.tag)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        for task in args.tasks:
            baseline_result(args.tag, task, args.commit)
        for minutes in args.minutes:  # budget by budget: the short budgets of every objective and seed first
            for seed in args.seeds:
                for objective in args.objectives:
                    run_point(objective, minutes, seed, args.tasks, args.tag, args.extra, args.commit)
    if args.history and not args.report_only:
        raise SystemExit("--history reports old results; it goes with --report-only")
    report(args.tag, args.tasks, args.commit, args.history)


if __name__ == "__main__":
    main()
