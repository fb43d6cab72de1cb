"""Embedded image classification task where pretraining has something to learn: generated 32x32 shapes.

Eight classes (`SHAPES`: disk, ring, triangle, square, frame, cross, star, crescent), one shape per image,
drawn at a random position, size (circumradius 6-11 px), rotation and colour over a smooth random two-colour
texture, with 0-2 thin clutter lines across the picture. Rendered at 4x and box-downsampled (anti-aliased
edges), saved as RGB PNG.

Held-out factor: the shape's hue. Train and valid shapes take hues in [0, 0.8); test shapes take hues in
[0.8, 1.0) (magenta-red) that no train image has, so a probe must recognize the shape, not its colour
statistics. Raw pixels + logistic regression stay far below the ceiling here (translation, rotation and
texture defeat a linear model on pixels; `bench/baseline_images.py --corpus shapes`), while the label is
fully determined by the image.

Everything is drawn with numpy and scipy from a generator seeded by (seed, split, index); only the images
differ across `seed`s, not the rules. Layout of `out/`: `<split>/<label>/<index>.png` and `train.tsv`,
`valid.tsv`, `test.tsv` (root line, then `relpath<TAB>num_pixels<TAB>label`), `shapes.jsonl` (the factors of
every image). The unlabeled use (MAE pretraining) reads `train.tsv` and ignores its labels; test images are
never in it. Sizes (images per class in train/valid/test): "tiny" 8/2/4, "small" 500/50/150, "default"
2000/200/500.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np

from omnissl.datamodules.common import cached_generation, check_size, write_manifest

VERSION = 1
SIZE = 32
SCALE = 4  # rendered at SIZE * SCALE, then box-downsampled
SHAPES = ("disk", "ring", "triangle", "square", "frame", "cross", "star", "crescent")
PER_CLASS = {"tiny": {"train": 8, "valid": 2, "test": 4},
             "small": {"train": 500, "valid": 50, "test": 150},
             "default": {"train": 2000, "valid": 200, "test": 500}}
HUES = {"train": (0.0, 0.8), "valid": (0.0, 0.8), "test": (0.8, 1.0)}  # the held-out factor
SPLIT_KEYS = {"train": 0, "valid": 1, "test": 2}


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Inside-test of `shape` of circumradius `radius` on rotated, centred coordinates (u, v) -> bool."""
    r = np.hypot(u, v)
    if shape == "disk":
        return r < radius
    if shape == "ring":
        return (r < radius) & (r > 0.6 * radius)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.75 * radius
    if shape == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m < 0.8 * radius) & (m > 0.45 * radius)
    if shape == "cross":
        return ((abs(u) < 0.3 * radius) & (abs(v) < radius)) | ((abs(v) < 0.3 * radius) & (abs(u) < radius))
    if shape == "crescent":
        return (r < radius) & (np.hypot(u - 0.5 * radius, v) > 0.8 * radius)
    theta = np.arctan2(v, u)
    if shape == "triangle":  # equilateral: every edge's half-plane, edges at distance radius / 2
        return np.all([u * math.cos(a) + v * math.sin(a) < 0.5 * radius
                       for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))], axis=0)
    if shape == "star":  # five points: the boundary radius goes linearly between outer and inner vertices
        sector = (theta % (2 * math.pi / 5)) / (2 * math.pi / 5)  # 0 at a point, 0.5 between two
        edge = radius * (1.0 - 0.6 * (1.0 - abs(2 * sector - 1.0)))
        return r < edge
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth two-colour background (SIZE * SCALE, SIZE * SCALE, 3) in [0, 1]: two random colours mixed by
    noise blurred over 2-10 px (drawn at SIZE, repeated SCALE times: the downsampling restores it exactly)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((SIZE, SIZE)), sigma=rng.uniform(2.0, 10.0), mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-8)
    w = 1.0 / (1.0 + np.exp(-2.0 * field))[..., None]
    a, b = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    return np.repeat(np.repeat(w * a + (1.0 - w) * b, SCALE, axis=0), SCALE, axis=1)


def draw(rng: np.random.Generator, shape: str, hue_range: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """One image (SIZE, SIZE, 3) uint8 and its factors."""
    n = SIZE * SCALE
    img = texture(rng)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    for _ in range(int(rng.integers(0, 3))):  # clutter: thin lines across the picture
        angle, offset = rng.uniform(0, math.pi), rng.uniform(-0.4, 0.4) * n
        dist = (xx - n / 2) * math.sin(angle) - (yy - n / 2) * math.cos(angle) - offset
        img[abs(dist) < 0.5 * SCALE] = rng.uniform(0.0, 1.0, 3)
    radius = rng.uniform(6.0, 11.0) * SCALE  # circumradius 6-11 px of 32
    margin = radius * 0.8
    cx, cy = rng.uniform(margin, n - margin, 2)
    rot = rng.uniform(0.0, 2 * math.pi)
    u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
    v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
    mask = shape_mask(shape, u, v, radius)
    hue = rng.uniform(*hue_range)
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
    colour = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    bg = img[mask].mean(0) if mask.any() else img.mean((0, 1))
    luma = np.array([0.299, 0.587, 0.114])
    if abs(float((colour - bg) @ luma)) < 0.2:  # keep the shape visible: darken or brighten it
        val = val * 0.35 if float(bg @ luma) > 0.5 else 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    img[mask] = colour
    small = img.reshape(SIZE, SCALE, SIZE, SCALE, 3).mean((1, 3))
    factors = {"shape": shape, "hue": round(hue, 4), "radius_px": round(radius / SCALE, 2),
               "centre_px": [round(cx / SCALE, 2), round(cy / SCALE, 2)], "rotation": round(rot, 4)}
    return np.round(small * 255).clip(0, 255).astype(np.uint8), factors


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the shapes task to `out` (once per (size, seed)) -> {"train", "valid", "test": tsv}."""
    from PIL import Image

    check_size(size)
    config = {"corpus": "shapes", "version": VERSION, "size": size, "seed": seed}

    def build(tmp: Path, final: Path) -> dict[str, str]:
        meta = []
        for split, per_class in PER_CLASS[size].items():
            rows = []
            for c, shape in enumerate(SHAPES):
                (tmp / split / shape).mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, SPLIT_KEYS[split], c, i])
                    pixels, factors = draw(rng, shape, HUES[split])
                    rel = f"{split}/{shape}/{i:05d}.png"
                    Image.fromarray(pixels, mode="RGB").save(tmp / rel, format="PNG")
                    rows.append((rel, SIZE * SIZE, shape))
                    meta.append({"path": rel, "split": split, **factors})
            order = np.random.default_rng([seed, SPLIT_KEYS[split]]).permutation(len(rows))
            write_manifest(tmp / f"{split}.tsv", final, [rows[i] for i in order])
        with open(tmp / "shapes.jsonl", "w", encoding="utf-8") as f:
            for m in meta:
                f.write(json.dumps(m, sort_keys=True) + "\n")
        return {"train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv"}

    return cached_generation(Path(out), config, build)
