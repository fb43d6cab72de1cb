"""Labeled downstream speech sets synthesized by espeak-ng: keyword spotting and speaker (voice) identification.

Both tasks hold out voices and/or accents in the test split, so a probe has to generalize, not memorize a voice.

**keywords** (12 classes: yes no up down left right on off stop go zero one). Clean synthetic keywords are
easy for a log-mel + logistic-regression baseline, which then says nothing about pretraining; so each clip
is made hard on purpose, while staying learnable. Test accuracy of `bench/baseline_speech.py` (mean+std
pooled log-mel, logistic regression) on the default size of version 1, chance 0.083:
  * held-out voice variants and accents, rate 110-250 words/min, pitch and pitch range 10-90 (espeak
    units), speed perturbation, no noise or reverberation: 0.73;
  * the default adds speed perturbation x0.9-1.1 (tape-style: duration and pitch together), reverberation
    (50 % of clips; a synthetic exponentially decaying noise impulse response, RT60 0.2-0.6 s), additive
    noise at SNR 5-20 dB (white, pink, or babble: three other espeak voices saying other words) and a
    random level (RMS -31..-19 dBFS): 0.40 (train accuracy 0.60);
  * harder settings, measured while tuning: SNR 0-15 dB: 0.33; SNR -5..10 dB, RT60 up to 0.9 s in 70 % of
    clips, speed x0.85-1.15: 0.30; the keyword inside a phrase (`KW_CONTEXT` = (0, 1) context words on each
    side, one utterance, the keyword located by espeak's word events) at SNR 0-15 dB: 0.21; (1, 3) context
    words, even without noise: chance. Pooled features cannot find one word among others, so context is
    off by default.
Each clip is a 1.0 s window holding the whole keyword at a random position.
Splits: train = 70 % of the voice variants x 5 accents; valid = 15 % other variants, same accents;
test = the last 15 % of variants x 3 held-out accents (Scottish, Caribbean, West Midlands).

**speakers** (20 classes: voice variants). Each clip is a 2.0 s window of a sentence, with small jitter of
rate (140-210) and pitch (35-65), mild reverberation (50 %, RT60 0.1-0.6 s) and noise at SNR 5-25 dB.
Splits: train on 5 accents and 80 % of the sentences; valid on the West Midlands accent, test on Scottish and
Caribbean accents, both on the held-out 20 % of sentences. The label is the variant (the "speaker"): the
probe must recognize a voice speaking with an accent it was never heard with.

Layout of `out/`: `wav/<split>/<index>.wav` (16 kHz, 16-bit PCM), `train.tsv`, `valid.tsv`, `test.tsv`
(labeled manifests: root line, then `relative_path<TAB>num_samples<TAB>label`), `items.jsonl` (every clip's
generation parameters: text, voice, rate, pitch, speed, SNR, noise type, RT60). Generation is deterministic
per seed (fresh espeak-ng process per shard, fixed order; see `speech.py`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from omnissl.batch import SAMPLE_RATE
from omnissl.datamodules.common import cached_generation, write_manifest
from omnissl.datamodules.corpora.speech import (
    ACCENTS,
    VARIANTS,
    _worker_setup,
    run_shards,
    sentences,
    to_16k,
    words,
)

VERSION = 2  # 2: larger held-out splits (small and default test sets >= 1,100 clips: one standard error <= 0.015)
TASKS = ("keywords", "speakers")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one")
SPEAKERS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt3", "croak", "grandma", "Andy", "linda", "quincy",
)  # fmt: skip
TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc")
VALID_ACCENTS_SPK = ("en-gb-x-gbcwmd",)
TEST_ACCENTS = ("en-gb-scotland", "en-029", "en-gb-x-gbcwmd")
TEST_ACCENTS_SPK = ("en-gb-scotland", "en-029")
assert set(TRAIN_ACCENTS + TEST_ACCENTS) <= set(ACCENTS)

# size -> items per class in (train, valid, test). The small and default test splits hold >= 1,100 clips, so one
# binomial standard error of an accuracy is <= 0.015 (sqrt(0.25 / 1100)); generating `small` takes about 1.5 min
# per task on 2 cores (measured: keywords 2,112 clips, speakers 1,880 clips).
SIZES: dict[str, dict[str, tuple[int, int, int]]] = {
    "keywords": {"tiny": (4, 1, 2), "small": (60, 20, 96), "default": (250, 40, 100)},
    "speakers": {"tiny": (3, 1, 1), "small": (30, 8, 56), "default": (120, 20, 60)},
}
ITEMS_PER_SHARD = 160
SPK_WINDOW = 32_000  # 2.0 s
# keyword difficulty (tuned so that bench/baseline_speech.py stays <= 0.80 on the default size)
KW_WINDOW = 16_000  # 1.0 s
KW_CONTEXT = (0, 0)  # context words on each side (see the module docstring)
KW_SNR = (5.0, 20.0)  # dB
KW_REVERB = (0.5, 0.2, 0.6)  # probability, RT60 range (s)
KW_SPEED = (0.9, 1.1)


# --------------------------------------------------------------------------------------------------------
# signal helpers (numpy, float32 at 16 kHz)


def reverb(x: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room impulse response: a unit direct path, then Gaussian noise under an
    exponential envelope that decays by 60 dB in `rt60` seconds (the classic Schroeder/Polack model)."""
    n = max(2, int(rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    h = rng.standard_normal(n) * np.exp(-6.908 * t / rt60) * 0.3
    h[0] = 1.0
    h /= np.sqrt(np.sum(h**2))
    size = 1 << int(np.ceil(np.log2(len(x) + n)))
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]
    return y.astype(np.float32)


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white (flat) or pink (1/f power) noise of n samples."""
    spec = np.fft.rfft(rng.standard_normal(n))
    if kind == "pink":
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        spec = spec / np.sqrt(f)
    y = np.fft.irfft(spec, n)
    return (y / (np.sqrt(np.mean(y**2)) + 1e-12)).astype(np.float32)


def mix_at_snr(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """x + noise scaled so that 10 log10(P_x / P_noise) = snr_db."""
    px = np.mean(x**2) + 1e-12
    pn = np.mean(noise**2) + 1e-12
    return x + noise * np.sqrt(px / (pn * 10 ** (snr_db / 10)))


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale to an RMS of `dbfs` dB full scale, then clip to [-1, 1]."""
    rms = np.sqrt(np.mean(x**2)) + 1e-12
    return np.clip(x * (10 ** (dbfs / 20) / rms), -1.0, 1.0).astype(np.float32)


def window(x: np.ndarray, start: int, length: int) -> np.ndarray:
    """x[start : start + length], zero-padded where the window leaves x."""
    out = np.zeros(length, np.float32)
    lo, hi = max(start, 0), min(start + length, len(x))
    if hi > lo:
        out[lo - start : hi - start] = x[lo:hi]
    return out


# --------------------------------------------------------------------------------------------------------
# planning (in the parent) and rendering (in one fresh process per shard)


def _split_variants(seed: int) -> dict[str, list[str]]:
    pool = list(VARIANTS)
    random.Random(f"kw-variants-{seed}").shuffle(pool)
    a, b = int(0.7 * len(pool)), int(0.85 * len(pool))
    return {"train": pool[:a], "valid": pool[a:b], "test": pool[b:]}


def plan(task: str, size: str, seed: int) -> list[dict]:
    """Every clip's parameters, in generation order: dicts with split, index, label, text and voice fields."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if size not in SIZES[task]:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES[task])}")
    rng = random.Random(f"{task}-{size}-{seed}")
    counts = dict(zip(("train", "valid", "test"), SIZES[task][size]))
    items: list[dict] = []
    if task == "keywords":
        variants = _split_variants(seed)
        accents = {"train": TRAIN_ACCENTS, "valid": TRAIN_ACCENTS, "test": TEST_ACCENTS}
        vocab = [w for w in words(seed) if w not in KEYWORDS]
        for split in ("train", "valid", "test"):
            for k in range(counts[split]):
                for label in KEYWORDS:
                    left = [rng.choice(vocab) for _ in range(rng.randint(*KW_CONTEXT))]
                    right = [rng.choice(vocab) for _ in range(rng.randint(*KW_CONTEXT))]
                    items.append({
                        "split": split, "label": label, "text": " ".join(left + [label] + right),
                        "keyword_word": len(left),
                        "voice": f"{rng.choice(accents[split])}+{rng.choice(variants[split])}",
                        "rate": rng.randint(110, 250), "pitch": rng.randint(10, 90),
                        "pitch_range": rng.randint(10, 90), "speed": round(rng.uniform(*KW_SPEED), 3),
                        "rt60": round(rng.uniform(*KW_REVERB[1:]), 3) if rng.random() < KW_REVERB[0] else 0.0,
                        "noise": rng.choice(("white", "pink", "babble")), "snr": round(rng.uniform(*KW_SNR), 2),
                        "level": round(rng.uniform(-31, -19), 2), "position": rng.random(),
                        "babble": [
                            {"text": " ".join(rng.choice(vocab) for _ in range(6)),
                             "voice": f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"}
                            for _ in range(3)
                        ],
                    })  # fmt: skip
    else:
        texts = sentences(seed)
        cut = int(0.8 * len(texts))
        pools = {"train": texts[:cut], "valid": texts[cut:], "test": texts[cut:]}
        accents = {"train": TRAIN_ACCENTS, "valid": VALID_ACCENTS_SPK, "test": TEST_ACCENTS_SPK}
        for split in ("train", "valid", "test"):
            for k in range(counts[split]):
                for label in SPEAKERS:
                    items.append({
                        "split": split, "label": label, "text": rng.choice(pools[split]),
                        "voice": f"{rng.choice(accents[split])}+{label}",
                        "rate": rng.randint(140, 210), "pitch": rng.randint(35, 65),
                        "pitch_range": rng.randint(35, 65), "speed": 1.0,
                        "rt60": round(rng.uniform(0.1, 0.6), 3) if rng.random() < 0.5 else 0.0,
                        "noise": rng.choice(("white", "pink")), "snr": round(rng.uniform(5, 25), 2),
                        "level": round(rng.uniform(-31, -19), 2), "position": rng.random(),
                    })  # fmt: skip
    index = {"train": 0, "valid": 0, "test": 0}
    for i, item in enumerate(items):
        item["index"] = index[item["split"]]
        item["path"] = f"wav/{item['split']}/{item['index']:05d}.wav"
        item["seed"] = seed * 1_000_003 + i
        index[item["split"]] += 1
    return items


def _keyword_span(engine, item: dict, wav: np.ndarray, starts: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(first, end) sample of the keyword in `wav` (22.05 kHz) from espeak's word events, or None when
    espeak announced no word at the keyword's character position (some accents skip a word's event)."""
    k = item["keyword_word"]
    pos = len(" ".join(item["text"].split()[:k])) + (2 if k else 1)  # 1-based character position
    for j, (p, sample) in enumerate(starts):
        if p == pos:
            later = [s for q, s in starts[j + 1 :] if q > pos]
            return sample, (later[0] if later else len(wav))
    return None


def _render(engine, item: dict) -> tuple[np.ndarray, dict]:
    """One clip (float32 (T,) at 16 kHz) from its planned parameters, and what rendering measured."""
    rng = np.random.default_rng(item["seed"])
    engine.seed(item["seed"])
    voice = dict(voice=item["voice"], rate=item["rate"], pitch=item["pitch"], pitch_range=item["pitch_range"])
    wav, starts = engine.synth(item["text"], **voice)
    info: dict = {}
    if "keyword_word" in item:
        span = _keyword_span(engine, item, wav, starts)
        if span is None:  # fall back to the keyword alone, in the same voice
            wav, _ = engine.synth(item["label"], **voice)
            span = (0, len(wav))
            info["keyword_alone"] = True
    x = to_16k(wav, engine.sample_rate, item["speed"], quantum=500).numpy()
    if "keyword_word" in item:
        scale = len(x) / max(1, len(wav))  # 22.05 kHz sample index -> 16 kHz
        a, b = int(span[0] * scale), int(span[1] * scale)
        length = KW_WINDOW
        if b - a >= length:  # a keyword longer than the window: centre it
            lo = hi = a + (b - a - length) // 2
        else:  # any window that holds [a, b), inside the utterance where possible
            lo, hi = b - length, a
            if max(lo, 0) <= min(hi, len(x) - length):
                lo, hi = max(lo, 0), min(hi, len(x) - length)
        start = lo + int(item["position"] * (hi - lo))
        x = window(x, start, length)
        info["keyword_span"] = [a - start, b - start]
    else:
        length = SPK_WINDOW
        x = window(x, int(item["position"] * max(0, len(x) - length)), length)
    if item["rt60"] > 0:
        x = reverb(x, item["rt60"], rng)
    if item["noise"] == "babble":
        noise = np.zeros(length, np.float32)
        for talker in item["babble"]:
            w, _ = engine.synth(talker["text"], voice=talker["voice"])
            t = to_16k(w, engine.sample_rate, quantum=500).numpy()
            t = np.resize(t, max(len(t), length))  # loop short talkers
            off = int(rng.integers(0, len(t) - length + 1))
            noise += t[off : off + length] / (np.sqrt(np.mean(t**2)) + 1e-9)
    else:
        noise = colored_noise(length, item["noise"], rng)
    x = mix_at_snr(x, noise, item["snr"])
    return set_level(x, item["level"]), info


def _labeled_shard(out: str, shard: int, items: list[dict]) -> list[dict]:
    import soundfile as sf

    engine = _worker_setup(items[0]["seed"] if items else shard)
    infos = []
    for item in items:
        path = Path(out) / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        x, info = _render(engine, item)
        sf.write(path, x, SAMPLE_RATE, subtype="PCM_16")
        infos.append(info)
    return infos


def generate(out: Path, size: str = "small", seed: int = 0, task: str = "keywords") -> dict[str, Path]:
    """Generate the labeled `task` ("keywords" or "speakers") into `out` (idempotent) ->
    {"train": Path, "valid": Path, "test": Path} of labeled manifests (third column: the label)."""
    items = plan(task, size, seed)  # validates task and size
    config = {"kind": f"labeled-speech/{task}", "size": size, "seed": seed, "version": VERSION,
              "python": sys.version[:4]}  # fmt: skip

    def build(tmp: Path, final: Path) -> dict[str, str]:
        shards = [items[i : i + ITEMS_PER_SHARD] for i in range(0, len(items), ITEMS_PER_SHARD)]
        jobs = [(str(tmp), s, chunk) for s, chunk in enumerate(shards)]
        infos = [info for part in run_shards(_labeled_shard, jobs, desc=f"{task} ({size})") for info in part]
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for item, info in zip(items, infos):
                f.write(json.dumps({**item, **info}, sort_keys=True) + "\n")
        names = {}
        for split in ("train", "valid", "test"):
            rows = [(it["path"], KW_WINDOW if task == "keywords" else SPK_WINDOW, it["label"])
                    for it in items if it["split"] == split]  # fmt: skip
            write_manifest(tmp / f"{split}.tsv", final, rows)
            names[split] = f"{split}.tsv"
        return names

    return cached_generation(Path(out).expanduser(), config, build)
