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


# --------------------------------------------------------------------------------------- the labeled task's split
# The labeled text task (`corpora.labeled_text`) classifies docstrings by stdlib family, with a fixed module split;
# the pretraining corpus leaves out the test modules, so a probe never tests on text the encoder was trained on.

TEST_SALT = "omnissl-labeled-text-test"
FAMILIES: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter", "idlelib", "turtle", "turtledemo", "curses"),
    "concurrency": ("asyncio", "multiprocessing", "threading", "concurrent", "queue", "sched", "subprocess",
                    "_threading_local", "selectors", "asynchat", "asyncore", "signal", "contextvars"),
    "networking": ("email", "http", "urllib", "smtplib", "smtpd", "imaplib", "nntplib", "ftplib", "poplib",
                   "socket", "socketserver", "ssl", "mailbox", "xmlrpc", "wsgiref", "ipaddress", "mimetypes",
                   "webbrowser", "cgi", "telnetlib", "mailcap", "netrc", "nturl2path"),
    "packaging": ("importlib", "distutils", "pkgutil", "zipimport", "modulefinder", "runpy", "site", "sysconfig",
                  "venv", "compileall", "py_compile", "zipapp", "imp", "lib2to3", "_aix_support", "_osx_support",
                  "_bootsubprocess"),
    "formats": ("xml", "json", "csv", "pickle", "pickletools", "_compat_pickle", "copyreg", "tarfile", "zipfile",
                "gzip", "bz2", "lzma", "_compression", "configparser", "plistlib", "html", "_markupbase", "base64",
                "codecs", "encodings", "struct", "shelve", "dbm", "sqlite3", "tomllib", "quopri", "uu", "xdrlib",
                "chunk", "aifc", "sunau", "wave", "sndhdr", "imghdr"),
    "numbers_time": ("_pydecimal", "decimal", "fractions", "numbers", "statistics", "random", "datetime",
                     "calendar", "zoneinfo", "_strptime", "colorsys", "secrets", "hashlib", "hmac", "uuid", "heapq",
                     "bisect", "graphlib"),
    "devtools": ("unittest", "doctest", "pdb", "bdb", "inspect", "ast", "dis", "opcode", "traceback", "pydoc",
                 "symtable", "tokenize", "token", "trace", "profile", "cProfile", "pstats", "timeit", "logging",
                 "warnings", "tracemalloc", "code", "codeop", "cgitb", "tabnanny", "pyclbr", "rlcompleter",
                 "linecache"),
    "text": ("string", "re", "sre_compile", "sre_constants", "sre_parse", "textwrap", "difflib", "shlex",
             "fnmatch", "gettext", "locale", "stringprep", "argparse", "optparse", "getopt", "cmd", "pprint",
             "reprlib"),
    "files_os": ("os", "pathlib", "shutil", "glob", "tempfile", "filecmp", "fileinput", "stat", "posixpath",
                 "ntpath", "genericpath", "io", "_pyio", "pty", "tty", "getpass", "platform"),
}
_FAMILY_OF = {top: fam for fam, tops in FAMILIES.items() for top in tops}


def family(module: str) -> str | None:
    """The class of a dotted module name, or None for modules outside the task."""
    return _FAMILY_OF.get(module.split(".")[0])


@functools.cache
def module_splits() -> dict[str, str]:
    """The fixed split of every module of the task: per family, modules are visited in the order of a hash
    of their name and assigned to "test" until it holds 20 % of the family's docstrings, then to "valid"
    until 10 %, the rest to "train". Docstrings are estimated by counting triple quotes in the source (cheap:
    no parsing), which is enough to balance the splits and to make none of them empty."""
    out: dict[str, str] = {}
    for fam in FAMILIES:
        mods = sorted(((m, p) for m, p in stdlib_files() if family(m) == fam),
                      key=lambda mp: stable_hash(TEST_SALT, mp[0]))
        weights = []
        for _, path in mods:
            src = path.read_bytes()
            weights.append((src.count(b'"""') + src.count(b"'''")) // 2)
        total, acc = sum(weights), {"test": 0, "valid": 0}
        for (module, _), w in zip(mods, weights):
            split = ("test" if acc["test"] < 0.2 * total else "valid" if acc["valid"] < 0.1 * total
                     else "train")
            if split != "train":
                acc[split] += w
            out[module] = split
    return out


def module_split(module: str) -> str | None:
    """"train", "valid" or "test" for a module of the task (see `module_splits`), None outside it."""
    return module_splits().get(module) if family(module) is not None else None


def is_test_module(module: str) -> bool:
    """Whether every docstring of `module` belongs to the (fixed) test split."""
    return module_split(module) == "test"


# ------------------------------------------------------------------------------------------------ the corpus


def collect(size: str, seed: int, *, exclude_test_modules: bool = True, progress: bool = True) -> list[Doc]:
    """The documents of the corpus of `size`, deduplicated, in a deterministic order."""
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
