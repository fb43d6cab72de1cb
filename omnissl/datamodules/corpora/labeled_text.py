"""Embedded text classification task: which family of the standard library a docstring comes from.

Nine classes (`FAMILIES`: gui, concurrency, networking, packaging, formats, numbers_time, devtools, text,
files_os), each a fixed set of top-level stdlib modules. The split is by *module*: modules holding about
20 % of each class's docstrings (picked in the order of a hash of their name; `module_splits`) give the test
split and 10 % the valid split, so a classifier cannot succeed by recognising the identifiers of a module it
was trained on; it must generalise from the topic of the prose. Valid and test do not depend on `seed`
(fixed across runs); the train sampling does. Classes are capped per split so that none dominates (tkinter
and idlelib alone hold 1 100 docstrings). TF-IDF + logistic regression reaches about 0.49 test accuracy
(chance 0.11; `bench/baseline_text.py`).

Layout of `out/`: `docs/<k>/<i>.txt`, `train.tsv`, `valid.tsv`, `test.tsv` (root line, then
`relpath<TAB>num_bytes<TAB>label`), `docs.jsonl` (path, source module, name, label, split).
Caps per class (train/valid/test): tiny 8/2/4, small 120/50/100, default 400/50/100.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnissl.datamodules.common import cached_generation, check_size, stable_hash, write_manifest
from omnissl.datamodules.corpora.text import (FAMILIES, MIN_CHARS, TEST_SALT, Doc, family, file_docstrings,
                                             module_split, stdlib_files)

VERSION = 2
CAPS = {"tiny": (8, 2, 4), "small": (120, 50, 100), "default": (400, 50, 100)}


def _family_docs(files: list[tuple[str, Path]], want: int, seen: set[str]) -> list[Doc]:
    """Docstrings of `files` (visited in a fixed hashed order) until at least `want` are found."""
    order = sorted(files, key=lambda mp: stable_hash("order", mp[0]))
    out: list[Doc] = []
    for module, path in order:
        for d in file_docstrings(module, path):
            if len(d.text) >= MIN_CHARS and d.text not in seen:
                seen.add(d.text)
                out.append(d)
        if len(out) >= want:
            break
    return out


def collect(size: str, seed: int, progress: bool = True) -> dict[str, list[tuple[Doc, str]]]:
    """{split: [(doc, label)]} for a size; valid and test ignore `seed`."""
    check_size(size)
    n_train, n_valid, n_test = CAPS[size]
    files = [(m, p) for m, p in stdlib_files() if family(m) is not None]
    seen: set[str] = set()
    splits: dict[str, list[tuple[Doc, str]]] = {"train": [], "valid": [], "test": []}
    # a generous pool for tiny/small (several x the caps) so sampling is not the first modules' docstrings;
    # the test pool is collected first and for every size identically up to its cap
    pool_factor = {"tiny": 3, "small": 4, "default": 10**9}[size]
    by_family = {fam: [(m, p) for m, p in files if family(m) == fam] for fam in sorted(FAMILIES)}
    # the held-out pools first and without regard to the train side, so valid and test are the same for every
    # size but tiny and for every seed
    held: dict[str, dict[str, list[Doc]]] = {"test": {}, "valid": {}}
    for split, cap in (("test", n_test), ("valid", n_valid)):
        for fam, fam_files in by_family.items():
            held[split][fam] = _family_docs([mp for mp in fam_files if module_split(mp[0]) == split],
                                            cap if size == "tiny" else 10**9, seen)
    for fam, fam_files in tqdm(by_family.items(), desc="labeled docstrings", unit="class", disable=not progress):
        train_pool = _family_docs([mp for mp in fam_files if module_split(mp[0]) == "train"],
                                  min(10**9, pool_factor * n_train), seen)
        sizes = {"train": len(train_pool), "valid": len(held["valid"][fam]), "test": len(held["test"][fam])}
        if min(sizes.values()) == 0:
            raise RuntimeError(f"labeled_text: class {fam!r} has {sizes} docstrings on Python "
                               f"{sys.version.split()[0]}; the task needs all three splits")
        for split, cap in (("test", n_test), ("valid", n_valid)):
            pool = held[split][fam]
            rng = np.random.default_rng(stable_hash(TEST_SALT, split, fam) % 2**32)
            splits[split] += [(pool[i], fam) for i in sorted(rng.permutation(len(pool))[:cap].tolist())]
        perm = np.random.default_rng([seed, stable_hash(fam) % 2**32]).permutation(len(train_pool)).tolist()
        splits["train"] += [(train_pool[i], fam) for i in sorted(perm[:n_train])]
    return splits


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the task to `out` (once per (size, seed, Python version)) -> {"train", "valid", "test": tsv}."""
    check_size(size)
    config = {"corpus": "labeled_text", "version": VERSION, "size": size, "seed": seed,
              "python": list(sys.version_info[:3])}

    def build(tmp: Path, final: Path) -> dict[str, str]:
        splits = collect(size, seed)
        i = 0
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as meta:
            for split, items in splits.items():
                rows = []
                for doc, label in items:
                    rel = f"docs/{i // 1000:03d}/{i:06d}.txt"
                    data = doc.text.encode("utf-8")
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(data)
                    rows.append((rel, len(data), label))
                    meta.write(json.dumps({"path": rel, "source": doc.source, "name": doc.name, "label": label,
                                           "split": split}, sort_keys=True) + "\n")
                    i += 1
                write_manifest(tmp / f"{split}.tsv", final, rows)
        return {split: f"{split}.tsv" for split in splits}

    return cached_generation(Path(out), config, build)
