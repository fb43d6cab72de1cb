"""Embedded captioned-audio corpus for CLAP-style training: synthetic sound scenes with exact captions.

Each clip is a short scene of 1-3 foreground events in sequence, separated by silence, optionally over a
faint background for the whole clip:
* tone: a steady tone, pure (sine) or buzzy (harmonics of random brightness and bandwidth, below), low (its
  fundamental at 150-400 Hz) / mid-pitched (400-1200 Hz) / high-pitched (1200-3000 Hz);
* sweep: a tone gliding up ("rising sweep") or down ("falling sweep") on a log-frequency scale;
* noise: white, pink (1/f power) or brown (1/f^2 power) noise;
* beeps: 2-5 short beeps of one pitch (a sine at 150-3000 Hz);
* speech: one English word spoken by a man or a woman ('a woman saying "window"'), synthesized by espeak-ng
  through `omnissl.datamodules.corpora.speech` (a fixed list of 130 common words, four accents, eleven
  voices, varied rate and pitch); only when its `espeakng-loader` wheel is installed (the cache key
  records whether it was);
* background: faint hiss (white noise) or a faint rumble (brown noise), each 35-50 dB below full scale, or a low
  electrical hum (50/60 Hz and two harmonics).
Events may be quiet (14 dB down); every synthetic event's level is jittered by +-3 dB. Captions compose event phrases in temporal order ("A, followed by B",
"A, then B, then C") and name the background ("... over faint hiss").

The scene is laid out on a longer timeline and then cropped to the clip; only then are the events clipped to
the crop (a remnant shorter than 0.25 s is dropped, a beep or a word cut at all is dropped), rendered, and the caption
written, so a caption never describes a part that was cut and every rendered event is described. The
generating factors after the crop (kind, start/end seconds, frequencies, colour, beep count and times, level,
background) are saved as labels.

Zero-shot is zero-shot: `HELD_OUT` names three classes of events ("low pure tone", "mid-pitched buzzy tone",
"high-pitched beeps") that combine factors seen in training but never together; no train or valid clip holds
one. They form a Latin square over the 3 pitches x {pure tone, buzzy tone, beeps}: every pitch word and every
sound kind of a held-out class occurs in training in two other combinations ("low" in "low buzzy tone" and "low
beeps", "pure tone" at mid and high pitch, ...), so a held-out class is new only as a combination. The test
split is made of scenes with such an event (retrieval on unseen combinations), and `zeroshot.tsv` of
single-event clips of all 14 `CLASSES` (zero-shot classification, held-out classes marked; many more clips of
the held-out classes, so that their accuracy has a binomial standard error of about 0.02 at "small"). Every clip has
`NUM_CAPTIONS` captions: the canonical one (above) and paraphrases (other words and orders for the same
factors: "a buzzy tone at a high pitch", "first ..., then ...", "with a faint hiss in the background").
`coarse_captions` writes vaguer captions of a training clip from its labels, naming each tone or beeps event by
its pitch or its sound only ("a low sound", "a buzzy tone", "three beeps"); they are not part of the corpus on
disk (`AudioTextDataModule(coarse_captions=k)` adds them to the train clips).

Version 5: the pitch words name the fundamental, not where the energy is. In version 4 a crude spectral cue
named the pitch words as well as the fundamental did: a buzzy tone was a square wave (odd harmonics at 1/k), so
its energy band followed its pitch, beeps (300-3000 Hz) left the lower part of "low" to tones, and the background
(hiss or hum) was fixed. An audio tower could fit every training caption with "pitch = the bands that hold
energy" and never read the fundamental, and CLAP's trained audio towers did: the held-out "low pure tone" clips
sat with brown noise and low beeps, the "mid-pitched buzzy tone" ones (whose odd harmonics fill 1.2-8 kHz) with
the high-pitched classes (docs/clap.md). Version 5 keeps every caption true and the held-out design, and breaks
that cue:
* a buzzy tone has harmonics 1..K of its fundamental f0 (all of them, random phases) with amplitudes k^-tilt,
  tilt uniform in [-0.5, 1] (bright to dark: its strongest harmonic may be any one), K log-uniform from 4 (2-3
  above 1.9 kHz) up to all harmonics below 7.6 kHz (a random low-pass): its energy lies anywhere from f0 to
  7.6 kHz whatever its pitch, and only its lowest component says its pitch. The fundamental is never more
  than 20 dB below the strongest harmonic, so "low" still means a fundamental at 150-400 Hz;
* beeps take the whole 150-3000 Hz range, so each pitch band is covered by pure tones, buzzy tones and beeps alike;
* the background (none 35 %, hiss 25 %, rumble 25 %, hum 15 %) is drawn independently of the events, noise
  backgrounds at a random level: low-band energy without a low event (rumble, hum), high-band energy without a
  high one (hiss), named in the caption;
* a +-3 dB level jitter per event, so that level is no class cue either.
Measured (`tests/datamodules/test_caption_cues.py`, the single-event zero-shot clips of the 9 pitch x sound
classes): a logistic regression on the mean log-mel energy of 8 bands, trained on the sine events (pure tones,
beeps) to name the pitch word, names it on buzzy tones at 0.37 (chance 0.33; version 4: 0.61), and trained on
buzzy tones, on the sine events at 0.44 (version 4: 0.65); the same regression on the log fundamental read off
the audio (the lowest strong spectral peak) at 0.97 and 0.93. Noise events are left as they were (white, pink,
brown over the whole band): band-limiting them would make their colour words untrue.

Layout of `out/`: `clips/<k>/<i>.wav`, `test/<i>.wav`, `zeroshot/<i>.wav` (16 kHz mono PCM-16); `train.tsv`,
`valid.tsv`, `test.tsv` (root line, then `relpath<TAB>num_samples<TAB>caption`, the canonical caption; valid =
5 % of the training clips, seeded); `<split>.captions.tsv` (one row per caption, 5 per clip);
`zeroshot.tsv` (`relpath<TAB>num_samples<TAB>class`) and `zeroshot.classes.json`; `<split>.labels.jsonl` (one
JSON object per manifest row, same order). Sizes: "tiny" 12 clips of 1-2 s (+ 3 test, 14 zero-shot; tests),
"small" 600 clips of 2-4 s (+ 360 test; zero-shot 20 per seen class, 200 per held-out class: 820), "default"
5 000 clips of 2-4 s (+ 1 000 test; zero-shot 40 / 400 per class: 1 640; about 450 MB).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnissl.batch import SAMPLE_RATE
from omnissl.datamodules.common import cached_generation, check_size, write_manifest
from omnissl.datamodules.corpora.speech import espeak, run_shards

VERSION = 5  # 5: spectral cues decorrelated from the pitch words (see "Version 5" above); 4: Latin-square held-out
NUM_CLIPS = {"tiny": 12, "small": 600, "default": 5000}
NUM_TEST = {"tiny": 3, "small": 360, "default": 1000}  # scenes with a held-out combination
# single-event clips per zero-shot class: (seen class, held-out class); the held-out accuracy is the measurement
ZEROSHOT_PER_CLASS = {"tiny": (1, 1), "small": (20, 200), "default": (40, 400)}
NUM_CAPTIONS = 5  # captions per clip (Clotho and AudioCaps' evaluation sets have 5)
DURATION_S = {"tiny": (1.0, 2.0), "small": (2.0, 4.0), "default": (2.0, 4.0)}
VALID_FRACTION = 0.05
MIN_EVENT_S = 0.25
RAMP_S = 0.005
PEAK = {"normal": 0.3, "quiet": 0.3 * 10 ** (-14 / 20)}
GAIN_DB = (-3.0, 3.0)  # every synthetic event's level is jittered around PEAK by this much (uniform, dB)
NOISE_BG_DB = (-50.0, -35.0)  # RMS of a hiss / rumble background, dBFS (uniform)
HUM_AMP = 0.01
# background of a clip, drawn independently of its events: none, hiss (white), rumble (brown), mains hum
BACKGROUNDS = {None: 0.35, "hiss": 0.25, "rumble": 0.25, "hum": 0.15}
BUZZY_MAX_HZ = 7600.0  # a buzzy tone's harmonics stay below this
BUZZY_TILT = (-0.5, 1.0)  # harmonic k has amplitude k^-tilt (then low-passed): dark to bright
BUZZY_MIN_FUNDAMENTAL = 0.1  # ... but the fundamental is never more than 20 dB below the strongest harmonic
KINDS = ("tone", "sweep", "noise", "beeps", "speech")
SPEECH_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029")
SPEECH_VOICES = {"man": ("m1", "m2", "m3", "m4", "m5", "m7"), "woman": ("f1", "f2", "f3", "f4", "f5")}
SHARD_CLIPS = 200  # clips per generating process when speech is on (espeak-ng keeps state within a process)
COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^alpha
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PITCH_BANDS = {"low": (150.0, 400.0), "mid-pitched": (400.0, 1200.0), "high-pitched": (1200.0, 3000.0)}
BEEP_RANGE = (150.0, 3000.0)  # every pitch band whole, as for tones (v4: 300)
# The zero-shot classes: what one non-speech event is, named by its generating factors. The held-out ones are
# combinations of factors that each occur in training but never together (no train or valid clip holds such
# an event, in audio or caption): a zero-shot evaluation on them is zero-shot. They are a Latin square over
# pitch x {pure tone, buzzy tone, beeps}, so that each of their words trains in two other combinations.
CLASSES = (
    "low pure tone", "low buzzy tone", "mid-pitched pure tone", "mid-pitched buzzy tone", "high-pitched pure tone",
    "high-pitched buzzy tone", "rising sweep", "falling sweep", "white noise", "pink noise", "brown noise",
    "low beeps", "mid-pitched beeps", "high-pitched beeps",
)
HELD_OUT = ("low pure tone", "mid-pitched buzzy tone", "high-pitched beeps")


def zeroshot_labels(size: str) -> list[str]:
    """The class of every zero-shot clip of a corpus size, in clip order (`ZEROSHOT_PER_CLASS`, classes
    interleaved)."""
    seen, held = ZEROSHOT_PER_CLASS[size]
    count = {c: held if c in HELD_OUT else seen for c in CLASSES}
    return [c for k in range(max(seen, held)) for c in CLASSES if k < count[c]]


def pitch_word(freq_hz: float) -> str:
    """low (< 400 Hz), mid-pitched (< 1200 Hz), high-pitched."""
    return "low" if freq_hz < 400 else "mid-pitched" if freq_hz < 1200 else "high-pitched"


# --------------------------------------------------------------------------------------------------- scene


Speaker = Callable[..., np.ndarray]  # (word, voice=, rate=, pitch=, key=) -> float (T,) at 16 kHz


def event_class(ev: dict[str, Any]) -> str | None:
    """The zero-shot class of an event (`CLASSES`), None for speech."""
    if ev["kind"] == "tone":
        return f"{pitch_word(ev['freq_hz'])} {ev['timbre']} tone"
    if ev["kind"] == "sweep":
        return f"{ev['direction']} sweep"
    if ev["kind"] == "noise":
        return f"{ev['color']} noise"
    if ev["kind"] == "beeps":
        return f"{pitch_word(ev['freq_hz'])} beeps"
    return None


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def draw_harmonics(rng: np.random.Generator, f0: float) -> int:
    """How many harmonics a buzzy tone of fundamental f0 has (a random low-pass, so that its bandwidth does not
    follow its pitch): K log-uniform in [min(4, top), top], top = the harmonics below BUZZY_MAX_HZ (at least 2)."""
    top = max(2, int(BUZZY_MAX_HZ // f0))
    low = min(4, top)
    return int(min(top, np.floor(_log_uniform(rng, low, top + 1))))


def draw_event(rng: np.random.Generator, kind: str, t: float, speaker: Speaker | None, words: Sequence[str],
               label: str | None = None) -> dict[str, Any]:
    """One event of `kind` starting at t; `label` (a `CLASSES` entry of that kind) fixes its class."""
    level = "quiet" if rng.random() < 0.2 else "normal"
    ev: dict[str, Any] = {"kind": kind, "level": level, "start_s": t}
    if kind != "speech":  # (a spoken word's level varies with its voice already)
        ev["gain_db"] = float(rng.uniform(*GAIN_DB))
    pitch = next((p for p in PITCH_BANDS if label and label.startswith(p + " ")), None)
    if kind == "speech":
        assert speaker is not None
        who = "man" if rng.random() < 0.5 else "woman"
        voice = f"{rng.choice(SPEECH_ACCENTS)}+{rng.choice(SPEECH_VOICES[who])}"
        word = str(words[int(rng.integers(len(words)))])
        wave = speaker(word, voice=voice, rate=int(rng.integers(130, 200)), pitch=int(rng.integers(30, 70)),
                       key=int(rng.integers(2**31)))
        ev.update(speaker=who, voice=voice, word=word, samples=wave, end_s=t + len(wave) / SAMPLE_RATE)
    elif kind == "beeps":
        lo, hi = BEEP_RANGE
        if pitch is not None:
            lo, hi = max(lo, PITCH_BANDS[pitch][0]), min(hi, PITCH_BANDS[pitch][1])
        freq = _log_uniform(rng, lo, hi)
        beep_s, gap_s = float(rng.uniform(0.08, 0.15)), float(rng.uniform(0.08, 0.2))
        count = int(rng.integers(2, 6))
        ev.update(freq_hz=freq, beep_s=beep_s, beep_times_s=[t + k * (beep_s + gap_s) for k in range(count)])
        ev["end_s"] = ev["beep_times_s"][-1] + beep_s
    else:
        ev["end_s"] = t + float(rng.uniform(0.5, 1.8))
        if kind == "tone":
            freq = _log_uniform(rng, *(PITCH_BANDS[pitch] if pitch else (150.0, 3000.0)))
            timbre = "pure" if rng.random() < 0.6 else "buzzy"
            if label is not None:
                timbre = label.split()[-2]
            ev.update(freq_hz=freq, timbre=timbre)
            if timbre == "buzzy":
                ev.update(harmonics=draw_harmonics(rng, freq), tilt=float(rng.uniform(*BUZZY_TILT)))
        elif kind == "sweep":
            lo = _log_uniform(rng, 200.0, 1000.0)
            hi = lo * _log_uniform(rng, 2.0, 4.0)
            up = bool(rng.random() < 0.5) if label is None else label == "rising sweep"
            ev.update(direction="rising" if up else "falling", f0_hz=lo if up else hi, f1_hz=hi if up else lo)
        else:
            color = str(rng.choice(list(COLORS)))
            ev["color"] = color if label is None else label.split()[0]
    return ev


def draw_scene(rng: np.random.Generator, speaker: Speaker | None = None, words: Sequence[str] = (), *,
               held_out: bool = False, first: str | None = None, num_events: int | None = None) -> dict[str, Any]:
    """A scene on an open timeline: {"events": [...], "end_s"}; beeps carry their onset list, speech its
    waveform (under "samples", never saved). Without a `speaker` there are no speech events.

    held_out False: no event is of a `HELD_OUT` class (such draws are redrawn); True: any class may occur.
    first: the class of the first event (a `CLASSES` entry). num_events: fixed count (else 1-3)."""
    kinds = KINDS if speaker is not None and words else KINDS[:-1]
    events = []
    t = float(rng.uniform(0.0, 0.4))
    count = num_events or int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    for k in range(count):
        if k == 0 and first is not None:
            ev = draw_event(rng, first.split()[-1], t, speaker, words, label=first)  # the kind ends the class
        else:
            for _ in range(100):
                ev = draw_event(rng, kinds[int(rng.integers(len(kinds)))], t, speaker, words)
                if held_out or event_class(ev) not in HELD_OUT:
                    break
        events.append(ev)
        t = ev["end_s"] + float(rng.uniform(0.15, 0.8))
    return {"events": events, "end_s": events[-1]["end_s"]}


def crop_scene(scene: dict[str, Any], start: float, duration: float) -> list[dict[str, Any]]:
    """Clip the events to [start, start + duration) -> events in clip time that survive the crop."""
    stop = start + duration
    out = []
    for ev in scene["events"]:
        if ev["kind"] == "beeps":
            times = [b - start for b in ev["beep_times_s"] if b >= start and b + ev["beep_s"] <= stop]
            if times:
                out.append({**ev, "beep_times_s": times, "count": len(times), "start_s": times[0],
                            "end_s": times[-1] + ev["beep_s"]})
            continue
        if ev["kind"] == "speech":  # a word cut at all is not that word any more: kept only whole
            if ev["start_s"] >= start and ev["end_s"] <= stop:
                out.append({**ev, "start_s": ev["start_s"] - start, "end_s": ev["end_s"] - start})
            continue
        s, e = max(ev["start_s"], start), min(ev["end_s"], stop)
        if e - s < MIN_EVENT_S:
            continue
        new = {**ev, "start_s": s - start, "end_s": e - start}
        if ev["kind"] == "sweep":  # the frequencies at the clipped ends, on the original log glide
            span = ev["end_s"] - ev["start_s"]
            at = lambda t: ev["f0_hz"] * (ev["f1_hz"] / ev["f0_hz"]) ** ((t - ev["start_s"]) / span)  # noqa: E731
            new.update(f0_hz=at(s), f1_hz=at(e))
        out.append(new)
    return out


def phrase(ev: dict[str, Any], rng: np.random.Generator) -> str:
    quiet = "quiet " if ev["level"] == "quiet" else ""
    if ev["kind"] == "tone":
        return f"a {quiet}{pitch_word(ev['freq_hz'])} {'pure' if ev['timbre'] == 'pure' else 'buzzy'} tone"
    if ev["kind"] == "sweep":
        return f"a {quiet}{ev['direction']} sweep"
    if ev["kind"] == "speech":
        return f"a {ev['speaker']} {'softly ' if quiet else ''}saying \"{ev['word']}\""
    if ev["kind"] == "noise":
        dur = ev["end_s"] - ev["start_s"]
        lead = "a short burst of " if dur < 0.8 else str(rng.choice(["steady ", ""]))
        return f"{lead}{quiet}{ev['color']} noise"
    n = ev["count"]
    pitch = pitch_word(ev["freq_hz"])
    if n == 1:
        return f"a single {quiet}{pitch} beep"
    return f"{NUMBERS[n]} {quiet}{pitch} beeps"


BACKGROUND_PHRASES = {  # the canonical phrase first
    "hiss": (" over faint hiss", " with a faint hiss in the background", " against a soft hiss"),
    "rumble": (" over a faint rumble", " with a faint rumble in the background", " against a soft rumble"),
    "hum": (" over a low electrical hum", " with a mains hum in the background", " over a humming background"),
}


def caption(events: list[dict[str, Any]], background: dict[str, Any] | None, rng: np.random.Generator,
            name: Callable[[dict[str, Any], np.random.Generator], str] | None = None) -> str:
    """The caption of the cropped clip: event phrases (`name`, default `phrase`) in time order, then the
    background."""
    parts = [(name or phrase)(ev, rng) for ev in events]
    if len(parts) == 1:
        text = parts[0]
    elif len(parts) == 2:
        text = f"{parts[0]}, {rng.choice(['followed by', 'then'])} {parts[1]}"
    else:
        text = f"{parts[0]}, then {parts[1]}, followed by {parts[2]}"
    if background is not None:
        text += BACKGROUND_PHRASES[background["kind"]][0]
    return text[0].upper() + text[1:] + "."


def paraphrase_phrase(ev: dict[str, Any], rng: np.random.Generator) -> str:
    """Another wording of one event's phrase (same factors, other words and order)."""
    quiet = ev["level"] == "quiet"
    q = str(rng.choice(["quiet ", "faint ", "soft "])) if quiet else ""
    kind = ev["kind"]
    if kind == "tone":
        p, t = pitch_word(ev["freq_hz"]), ev["timbre"]
        t2 = {"pure": str(rng.choice(["pure", "clean", "pure sine"])), "buzzy": str(rng.choice(["buzzy", "harsh buzzy"]))}[t]
        return str(rng.choice([f"a {q}{p} {t2} tone", f"a {q}{t2} tone at a {p.replace('-pitched', '')} pitch",
                               f"a steady {q}{p} {t2} tone", f"a {q}{p} tone with a {t2} timbre"]))
    if kind == "sweep":
        up = ev["direction"] == "rising"
        return str(rng.choice([f"a {q}{ev['direction']} sweep", f"a {q}tone sweeping {'up' if up else 'down'}",
                               f"a {q}pitch glide going {'up' if up else 'down'}",
                               f"a {q}{'rising' if up else 'falling'} frequency sweep"]))
    if kind == "speech":
        soft = "softly " if quiet else ""
        return str(rng.choice([f'a {ev["speaker"]} {soft}saying "{ev["word"]}"',
                               f'the word "{ev["word"]}" {soft}spoken by a {ev["speaker"]}',
                               f'a {ev["speaker"]}\'s voice {soft}saying "{ev["word"]}"']))
    if kind == "noise":
        c = ev["color"]
        short = ev["end_s"] - ev["start_s"] < 0.8
        if short:
            return str(rng.choice([f"a short burst of {q}{c} noise", f"a brief {q}{c} noise burst"]))
        return str(rng.choice([f"{q}{c} noise", f"a {q}stretch of {c} noise", f"steady {q}{c} noise"]))
    n, p = ev["count"], pitch_word(ev["freq_hz"])
    if n == 1:
        return str(rng.choice([f"a single {q}{p} beep", f"one {q}{p} beep"]))
    return str(rng.choice([f"{NUMBERS[n]} {q}{p} beeps", f"a series of {NUMBERS[n]} {q}{p} beeps",
                           f"{q}{p} beeps, {NUMBERS[n]} of them"]))


def paraphrases(events: list[dict[str, Any]], background: dict[str, Any] | None, first: str,
                rng: np.random.Generator, k: int = NUM_CAPTIONS) -> list[str]:
    """`first` (the canonical caption) and k - 1 different wordings of the same clip: other phrases for each
    event (same order), connectors, openers and background phrases."""
    out = [first]
    for _ in range(20 * k):
        if len(out) == k:
            break
        parts = [paraphrase_phrase(ev, rng) for ev in events]
        if len(parts) == 2:
            text = str(rng.choice([f"{parts[0]}, followed by {parts[1]}", f"{parts[0]}, then {parts[1]}",
                                   f"{parts[0]} and then {parts[1]}", f"first {parts[0]}, then {parts[1]}"]))
        elif len(parts) == 3:
            text = str(rng.choice([f"{parts[0]}, then {parts[1]}, followed by {parts[2]}",
                                   f"{parts[0]}, {parts[1]} and then {parts[2]}",
                                   f"first {parts[0]}, then {parts[1]}, and finally {parts[2]}"]))
        else:
            text = parts[0]
        if background is not None:
            text += str(rng.choice(BACKGROUND_PHRASES[background["kind"]]))
        text = str(rng.choice(["", "the sound of ", "you can hear ", "a recording of "])) + text
        text = text[0].upper() + text[1:] + "."
        if text not in out:
            out.append(text)
    return out


def coarse_phrase(ev: dict[str, Any], rng: np.random.Generator) -> str:
    """A tone or beeps event named by one of its two factors, drawn at random: its pitch alone ("a low sound",
    "three short high-pitched sounds") or its sound alone ("a buzzy tone", "three beeps"); any other event by its
    canonical `phrase` (it has no pitch x sound combination)."""
    if ev["kind"] not in ("tone", "beeps"):
        return phrase(ev, rng)
    quiet = "quiet " if ev["level"] == "quiet" else ""
    p = pitch_word(ev["freq_hz"])
    by_pitch = bool(rng.random() < 0.5)
    if ev["kind"] == "tone":
        return f"a {quiet}{p} sound" if by_pitch else f"a {quiet}{ev['timbre']} tone"
    n = ev["count"]
    if by_pitch:
        return f"a short {quiet}{p} sound" if n == 1 else f"{NUMBERS[n]} short {quiet}{p} sounds"
    return f"a single {quiet}beep" if n == 1 else f"{NUMBERS[n]} {quiet}beeps"


def coarse_captions(labels: dict[str, Any], k: int, rng: np.random.Generator) -> list[str]:
    """k captions of a clip (its labels: "events", "background") that name each tone or beeps event by its pitch
    or by its sound only (`coarse_phrase`), never both: what vaguer human captions do, and what teaches the two
    factors apart (LAION-CLAP's keyword-to-caption captions play that part for AudioSet's labels). Made for
    training clips only (`AudioTextDataModule(coarse_captions=k)`); a held-out class never occurs in them, as it
    does not occur in those clips. A clip without a tone or beeps event gets none (only other wordings)."""
    if not any(ev["kind"] in ("tone", "beeps") for ev in labels["events"]):
        return []
    return [caption(labels["events"], labels["background"], rng, coarse_phrase)
            for _ in range(k)]


# -------------------------------------------------------------------------------------------------- render


def colored_noise(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Unit-RMS noise of n samples whose power spectrum falls as 1 / f^alpha."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    x = np.fft.irfft(spec / f ** (alpha / 2), n)
    x -= x.mean()
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def ramp(x: np.ndarray) -> np.ndarray:
    k = min(int(RAMP_S * SAMPLE_RATE), len(x) // 2)
    if k > 0:
        w = np.linspace(0.0, 1.0, k, endpoint=False)
        x[:k] *= w
        x[-k:] *= w[::-1]
    return x


def harmonic_amplitudes(harmonics: int, tilt: float) -> np.ndarray:
    """Amplitudes of harmonics 1..harmonics of a buzzy tone: k^-tilt, the fundamental raised to at least
    BUZZY_MIN_FUNDAMENTAL of the strongest (so the fundamental is always there: the pitch word stays true)."""
    a = np.arange(1, harmonics + 1, dtype=np.float64) ** -tilt
    a[0] = max(a[0], BUZZY_MIN_FUNDAMENTAL * a.max())
    return a / a.max()


def tone(freq: float, n: int, timbre: str, rng: np.random.Generator, harmonics: int = 1,
         tilt: float = 1.0) -> np.ndarray:
    """A steady tone of peak 1: a sine (pure) or the harmonics 1..harmonics of freq with amplitudes
    `harmonic_amplitudes` and random phases (buzzy)."""
    t = np.arange(n) / SAMPLE_RATE
    if timbre == "pure":
        return np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    amps = harmonic_amplitudes(harmonics, tilt)
    phases = rng.uniform(0, 2 * np.pi, len(amps))
    x = sum(a * np.sin(2 * np.pi * (k + 1) * freq * t + ph) for k, (a, ph) in enumerate(zip(amps, phases)))
    return x / (np.max(np.abs(x)) + 1e-12)


def render(events: list[dict[str, Any]], background: dict[str, Any] | None, num_samples: int,
           rng: np.random.Generator) -> np.ndarray:
    """The clip's waveform (num_samples,) float64 in [-1, 1]."""
    y = np.zeros(num_samples)
    for ev in events:
        amp = PEAK[ev["level"]] * 10 ** (ev.get("gain_db", 0.0) / 20)
        if ev["kind"] == "beeps":
            n = int(round(ev["beep_s"] * SAMPLE_RATE))
            for t0 in ev["beep_times_s"]:
                i = int(round(t0 * SAMPLE_RATE))
                seg = ramp(np.sin(2 * np.pi * ev["freq_hz"] * np.arange(n) / SAMPLE_RATE))[: num_samples - i]
                y[i:i + len(seg)] += amp * seg
            continue
        i, j = int(round(ev["start_s"] * SAMPLE_RATE)), min(int(round(ev["end_s"] * SAMPLE_RATE)), num_samples)
        n = j - i
        if ev["kind"] == "speech":
            seg = ev["samples"][:n]
            y[i:i + len(seg)] += amp * seg / (np.max(np.abs(seg)) + 1e-9)
            continue
        if ev["kind"] == "tone":
            seg = tone(ev["freq_hz"], n, ev["timbre"], rng, ev.get("harmonics", 1), ev.get("tilt", 1.0))
        elif ev["kind"] == "sweep":
            f = ev["f0_hz"] * (ev["f1_hz"] / ev["f0_hz"]) ** (np.arange(n) / max(n - 1, 1))
            seg = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)
        else:
            seg = colored_noise(rng, n, COLORS[ev["color"]]) / 4.0  # peak ~ amp for Gaussian noise
        y[i:j] += amp * ramp(seg)
    if background is not None:
        if background["kind"] in ("hiss", "rumble"):
            alpha = COLORS["white" if background["kind"] == "hiss" else "brown"]
            y += 10 ** (background["rms_db"] / 20) * colored_noise(rng, num_samples, alpha)
        else:
            t = np.arange(num_samples) / SAMPLE_RATE
            f = background["freq_hz"]
            y += HUM_AMP * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t)
                            + 0.25 * np.sin(6 * np.pi * f * t))
    return np.clip(y, -1.0, 1.0)


SPLIT_KEYS = {"train": 0, "test": 1, "zeroshot": 2}  # a clip's random stream: (seed, split, index)


def make_clip(seed: int, index: int, size: str, speaker: Speaker | None = None,
              words: Sequence[str] = (), split: str = "train") -> tuple[np.ndarray, dict[str, Any]]:
    """One clip: (waveform (T,) float64, labels with the post-crop factors, the caption and its paraphrases).

    split "train" (train and valid): scenes without any `HELD_OUT` class; "test": scenes whose first event is of
    a held-out class (HELD_OUT[index % 3]), kept by the crop; "zeroshot": one event of class
    zeroshot_labels(size)[index] (label "label", "heldout" whether it is held out)."""
    if split not in SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_KEYS)}")
    rng = np.random.default_rng([seed, index] if split == "train" else [seed, SPLIT_KEYS[split], index])
    num_samples = int(round(float(rng.uniform(*DURATION_S[size])) * SAMPLE_RATE))
    duration = num_samples / SAMPLE_RATE
    label = None
    if split == "test":
        label = HELD_OUT[index % len(HELD_OUT)]
        scene = draw_scene(rng, speaker, words, held_out=True, first=label)
    elif split == "zeroshot":
        label = zeroshot_labels(size)[index]
        scene = draw_scene(rng, speaker, words, held_out=True, first=label, num_events=1)
    else:
        scene = draw_scene(rng, speaker, words)

    def kept(evs: list[dict[str, Any]]) -> bool:  # the crop keeps an event (of the forced class)
        return bool(evs) and (label is None or any(event_class(e) == label for e in evs))

    events: list[dict[str, Any]] = []
    for _ in range(20):  # a crop window that keeps at least one event
        start = float(rng.uniform(0.0, max(0.0, scene["end_s"] - duration * 0.5)))
        events = crop_scene(scene, start, duration)
        if kept(events):
            break
    else:
        start = scene["events"][0]["start_s"]
        events = crop_scene(scene, start, duration)
        if not kept(events):
            raise RuntimeError(f"clip {index} of split {split}: no crop keeps its {label or 'events'}")
    kinds = list(BACKGROUNDS)
    kind = kinds[int(rng.choice(len(kinds), p=list(BACKGROUNDS.values())))]  # independent of the events
    background = None if kind is None else {"kind": kind}
    if kind == "hum":
        background["freq_hz"] = float(rng.choice([50, 60]))
    elif kind is not None:
        background["rms_db"] = round(float(rng.uniform(*NOISE_BG_DB)), 2)
    text = caption(events, background, rng)
    wave = render(events, background, num_samples, rng)
    for ev in events:  # labels: rounded, clip-time, no waveforms
        ev.pop("samples", None)
        for k, v in list(ev.items()):
            if isinstance(v, float):
                ev[k] = round(v, 4)
            elif isinstance(v, list) and all(isinstance(x, float) for x in v):
                ev[k] = [round(x, 4) for x in v]
    captions = paraphrases(events, background, text, np.random.default_rng([seed, 7, SPLIT_KEYS[split], index]))
    labels = {"caption": text, "captions": captions, "num_samples": num_samples, "duration_s": duration,
              "crop_start_s": round(start, 4), "background": background, "events": events,
              "num_events": len(events), "kinds": [ev["kind"] for ev in events],
              "classes": [event_class(ev) for ev in events]}
    if split == "zeroshot":
        labels.update(label=label, heldout=label in HELD_OUT)
    if not math.isfinite(float(np.abs(wave).max())):
        raise RuntimeError(f"non-finite audio in clip {index}")
    return wave, labels


def speech_available() -> bool:
    """Whether spoken words can be synthesized (the speech corpus's espeak-ng wheel is installed)."""
    import importlib.util

    return importlib.util.find_spec("espeakng_loader") is not None


# Concrete, common English words that espeak-ng pronounces clearly (a fixed list: the corpus must not change
# when another module's vocabulary does).
WORDS = (
    "apple", "river", "window", "yellow", "seven", "garden", "music", "orange", "table", "water", "morning",
    "doctor", "pencil", "silver", "winter", "summer", "button", "candle", "forest", "island", "kitchen",
    "letter", "market", "number", "paper", "rabbit", "rocket", "school", "station", "thunder", "tiger",
    "tomato", "valley", "wagon", "zebra", "bottle", "bridge", "camera", "castle", "cloud", "copper", "dragon",
    "engine", "finger", "flower", "guitar", "hammer", "helmet", "jacket", "ladder", "lemon", "magnet",
    "mirror", "monkey", "needle", "ocean", "onion", "parrot", "pepper", "pillow", "planet", "pocket",
    "puzzle", "robot", "saddle", "salmon", "shadow", "spider", "sugar", "tunnel", "turtle", "velvet",
    "violin", "wallet", "whistle", "wizard", "anchor", "basket", "blanket", "carpet", "cherry", "circle",
    "coffee", "cookie", "desert", "dinner", "feather", "garlic", "harbor", "honey", "lantern", "meadow",
    "napkin", "oyster", "pebble", "pirate", "pumpkin", "ribbon", "sandwich", "sparrow", "stone", "train",
    "one", "two", "three", "four", "five", "six", "eight", "nine", "ten", "hello", "goodbye", "yes", "no",
    "stop", "go", "left", "right", "up", "down", "open", "close", "red", "green", "blue", "black", "white",
)  # fmt: skip


def spoken_words(seed: int = 0) -> list[str]:
    """The words speech events draw from (`WORDS`, sorted; `seed` is accepted for symmetry)."""
    return sorted(WORDS)


def _resample_to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, SAMPLE_RATE)
    return resample_poly(x, SAMPLE_RATE // g, rate // g) if rate != SAMPLE_RATE else x


def _speaker(engine_seed: int) -> Speaker:
    """A `Speaker` over this process's espeak-ng (the speech corpus's wrapper): 16 kHz float64, leading and
    trailing silence trimmed. Resampled with scipy so a generating process never has to import torch."""
    engine = espeak()
    engine.seed(engine_seed)

    def speak(word: str, *, voice: str, rate: int, pitch: int, key: int) -> np.ndarray:
        engine.seed(key)
        wav, _ = engine.synth(word, voice=voice, rate=rate, pitch=pitch)
        x = np.clip(_resample_to_16k(wav.astype(np.float64) / 32768.0, engine.sample_rate), -1.0, 1.0)
        loud = np.flatnonzero(np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9))
        return ramp(x[loud[0]:loud[-1] + 1].copy()) if len(loud) else x[:1]

    return speak


def _write_clips(out: str, seed: int, size: str, indices: list[int], speech: bool,
                 split: str = "train") -> list[dict[str, Any]]:
    """Render and write clips `indices` of `split` -> their labels (with "path"). With speech, run in a fresh
    process."""
    import soundfile as sf

    speaker = _speaker(seed * 1_000_003 + indices[0] + 7_919 * SPLIT_KEYS[split]) if speech else None
    words = spoken_words(seed) if speech else []
    labels = []
    for i in indices:
        wave, lab = make_clip(seed, i, size, speaker, words, split=split)
        rel = f"clips/{i // 1000:03d}/{i:05d}.wav" if split == "train" else f"{split}/{i:05d}.wav"
        (Path(out) / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(Path(out) / rel, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        labels.append({"path": rel, **lab})
    return labels


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the corpus to `out` (once per (size, seed, speech on/off)) -> {"train", "valid", "test": tsv}.

    train / valid: scenes without a held-out class (`HELD_OUT`); test: scenes with one (unseen combinations of
    seen factors). Their manifests hold each clip's canonical caption; `<split>.captions.tsv` beside them every
    caption (`NUM_CAPTIONS` paraphrases, one row each, the canonical one first: rows that share a file are
    captions of one clip). `zeroshot.tsv` is a labeled manifest (`relpath<TAB>num_samples<TAB>class`) of
    single-event clips of every `CLASSES` entry, with `zeroshot.classes.json` ({"classes", "heldout"}).
    Each manifest has a labels file beside it: `<split>.labels.jsonl`, one JSON object per row. Spoken words
    (espeak-ng, through `omnissl.datamodules.corpora.speech`) are one of the event kinds when its wheel is
    installed; each block of 200 clips is then rendered by a fresh process, so that espeak-ng's internal state
    and the files are the same on every run.
    """
    check_size(size)
    speech = speech_available()
    config = {"corpus": "captions", "version": VERSION, "size": size, "seed": seed, "speech": speech}

    def render_split(tmp: Path, split: str, n: int, speech: bool) -> list[dict[str, Any]]:
        blocks = [list(range(k, min(n, k + SHARD_CLIPS))) for k in range(0, n, SHARD_CLIPS)]
        if speech:
            done = run_shards(_write_clips, [(str(tmp), seed, size, b, True, split) for b in blocks],
                              f"captioned clips ({split})")
        else:
            done = [_write_clips(str(tmp), seed, size, b, False, split)
                    for b in tqdm(blocks, desc=f"captioned clips ({split})", unit="block")]
        return [lab for block in done for lab in block]

    def write_labels(path: Path, labs: list[dict[str, Any]]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for lab in labs:
                f.write(json.dumps(lab, sort_keys=True) + "\n")

    def build(tmp: Path, final: Path) -> dict[str, str]:
        n = NUM_CLIPS[size]
        perm = np.random.default_rng(seed).permutation(n)
        valid = set(perm[: max(1, round(VALID_FRACTION * n))].tolist())
        labels: dict[str, list] = {"train": [], "valid": []}
        for i, lab in enumerate(render_split(tmp, "train", n, speech)):
            labels["valid" if i in valid else "train"].append(lab)
        labels["test"] = render_split(tmp, "test", NUM_TEST[size], speech)
        for split, labs in labels.items():
            write_manifest(tmp / f"{split}.tsv", final, [(lab["path"], lab["num_samples"], lab["caption"])
                                                         for lab in labs])
            write_manifest(tmp / f"{split}.captions.tsv", final, [(lab["path"], lab["num_samples"], c)
                                                                  for lab in labs for c in lab["captions"]])
            write_labels(tmp / f"{split}.labels.jsonl", labs)
        zero = render_split(tmp, "zeroshot", len(zeroshot_labels(size)), False)
        write_manifest(tmp / "zeroshot.tsv", final, [(lab["path"], lab["num_samples"], lab["label"]) for lab in zero])
        write_labels(tmp / "zeroshot.labels.jsonl", zero)
        (tmp / "zeroshot.classes.json").write_text(json.dumps({"classes": list(CLASSES), "heldout": list(HELD_OUT)},
                                                              indent=1) + "\n")
        return {"train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv"}

    return cached_generation(Path(out), config, build)
