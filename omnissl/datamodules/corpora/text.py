"""Embedded text corpus: the docstrings of the Python standard library and the `pydoc_data` topics.

Real, varied English technical prose that ships with every Python, so nothing is downloaded. Modules are
never imported (importing some stdlib modules has side effects: `antigravity` opens a browser, `this`
prints); their source files are parsed with `ast` and the module, class and function docstrings are read
from the tree. `pydoc_data.topics` is pure data and is imported. One document per docstring or topic;
documents under 40 characters and exact duplicates are dropped.

Docstrings of the modules held out as the test split of `labeled_text` are left out, so a text encoder
pretrained on this corpus has not seen the documents it is later probed on.

Layout of `out/`: `docs/<k>/<i>.txt` (one document each, UTF-8, exactly the docstring), `train.tsv` and
`valid.tsv` (manifests: root line, then `relpath<TAB>num_bytes`; valid = 5 % of documents, seeded),
`docs.jsonl` (per document: path, source module or "pydoc_data.topics", name, kind, split).
Sizes: "tiny" (10 small modules and 8 topics; tests), "small" (40 % of the modules and topics, seeded),
"default" (all: about 7 000 documents, 2 MB on CPython 3.11). The text depends on the Python version, which
is part of the cache key.
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnissl.datamodules.common import cached_generation, check_size, stable_hash, write_manifest

VERSION = 2
MIN_CHARS = 40
VALID_FRACTION = 0.05
SMALL_FRACTION = 0.4
TINY_MODULES = ("bisect", "colorsys", "fnmatch", "glob", "heapq", "keyword", "numbers", "shlex", "string",
                "textwrap")
TINY_TOPICS = 8
# test suites (some hold deliberately broken code), bundled third-party code and build leftovers
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "ensurepip"}


@dataclass(frozen=True)
class Doc:
    """One document: `source` is a dotted module name (or "pydoc_data.topics"), `name` the qualified name
    inside it ("" for the module docstring), `kind` one of module/class/function/topic."""

    source: str
    name: str
    kind: str
    text: str


@functools.cache
def stdlib_files() -> tuple[tuple[str, Path], ...]:
    """(dotted module name, source path) of every pure-Python stdlib module, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") or "-" in part for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or "-" in parts[-1]:
            continue
        found.append((".".join(parts), path))
    return tuple(sorted(found))


def file_docstrings(module: str, path: Path) -> list[Doc]:
    """Docstrings of a source file's module, classes and functions, in source order; [] if it does not parse."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    docs: list[Doc] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                text = ast.get_docstring(child, clean=True)
                if text:
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    docs.append(Doc(module, name, kind, text))
                visit(child, name + ".")

    text = ast.get_docstring(tree, clean=True)
    if text:
        docs.append(Doc(module, "", "module", text))
    visit(tree, "")
    return docs


def topic_docs() -> list[Doc]:
    """The help topics of `pydoc_data.topics` (the language reference's sections), sorted by topic name."""
    from pydoc_data.topics import topics

    return [Doc("pydoc_data.topics", name, "topic", topics[name].strip()) for name in sorted(topics)]


def keep_fraction(items: list, fraction: float, seed: int, salt: str) -> list:
    """A seeded subset of `items` (in their original order) of about `fraction` of them."""
    return [it for it in items if stable_hash(salt, seed, str(it)) % 10_000 < fraction * 10_000]


def collect(size: str, seed: int, *, exclude_test_modules: bool = True, progress: bool = True) -> list[Doc]:
    """The documents of the corpus of `size`, deduplicated, in a deterministic order."""
    from omnissl.datamodules.corpora.labeled_text import is_test_module

    check_size(size)
    files = stdlib_files()
    topics = topic_docs()
    if size == "tiny":
        files = [(m, p) for m, p in files if m in TINY_MODULES]
        topics = topics[:TINY_TOPICS]
    elif size == "small":
        files = [(m, p) for m, p in files if (m, p) in set(keep_fraction(files, SMALL_FRACTION, seed, "files"))]
        topics = keep_fraction(topics, SMALL_FRACTION, seed, "topics")
    if exclude_test_modules:
        files = [(m, p) for m, p in files if not is_test_module(m)]
    docs: list[Doc] = []
    for module, path in tqdm(files, desc="stdlib docstrings", unit="file", disable=not progress):
        docs.extend(file_docstrings(module, path))
    docs.extend(topics)
    seen: set[str] = set()
    unique = []
    for d in docs:
        if len(d.text) >= MIN_CHARS and d.text not in seen:
            seen.add(d.text)
            unique.append(d)
    return unique


def write_docs(tmp: Path, docs: list[Doc]) -> list[tuple[str, int]]:
    """Write each document to `tmp/docs/<k>/<i>.txt` -> [(relpath, num_bytes)]."""
    rows = []
    for i, d in enumerate(tqdm(docs, desc="writing documents", unit="doc")):
        rel = f"docs/{i // 1000:03d}/{i:06d}.txt"
        data = d.text.encode("utf-8")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
        rows.append((rel, len(data)))
    return rows


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the corpus to `out` (once per (size, seed, Python version)) -> {"train": tsv, "valid": tsv}."""
    check_size(size)
    config = {"corpus": "text", "version": VERSION, "size": size, "seed": seed,
              "python": list(sys.version_info[:3])}

    def build(tmp: Path, final: Path) -> dict[str, str]:
        docs = collect(size, seed)
        rows = write_docs(tmp, docs)
        perm = np.random.default_rng(seed).permutation(len(docs))
        valid = set(perm[: max(1, round(VALID_FRACTION * len(docs)))].tolist())
        write_manifest(tmp / "train.tsv", final, [r for i, r in enumerate(rows) if i not in valid])
        write_manifest(tmp / "valid.tsv", final, [r for i, r in enumerate(rows) if i in valid])
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for i, (d, (rel, _)) in enumerate(zip(docs, rows)):
                meta = {"path": rel, "source": d.source, "name": d.name, "kind": d.kind,
                        "split": "valid" if i in valid else "train"}
                f.write(json.dumps(meta, sort_keys=True) + "\n")
        return {"train": "train.tsv", "valid": "valid.tsv"}

    return cached_generation(Path(out), config, build)
