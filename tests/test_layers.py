"""The package is a layered DAG: no module imports a module of a higher layer (README "Layout").

    batch  <-  ops, optim  <-  backbones  <-  checkpoints  <-  ssl parts  <-  ssl.base  <-  ssl objectives
    datamodules (import only batch, ops)
    eval (any of the above)  <-  train  <-  commands  <-  cli

Every `import` / `from ... import` of omnissl is checked, function-level ones included. Two more rules: an ssl
objective never imports another objective (shared math lives in the parts), and only commands/ and cli import
omnissl inside a function (lazy imports elsewhere hide the graph).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "omnissl"

# ssl modules that are parts (maths shared by objectives); every other ssl module but base is an objective
SSL_PARTS = {"masking", "losses", "heads", "quantizer", "teacher", "monitors", "frames", "targets"}


def layer(module: str) -> tuple[int, str]:
    """(rank, name) of an omnissl module; a module may import only modules of a lower or equal rank."""
    parts = module.split(".")[1:]
    top = parts[0] if parts else ""
    if top in ("", "batch", "progress"):  # progress: the tqdm bars of long jobs, a leaf like batch
        return 0, "batch"
    if top in ("ops", "optim"):
        return 1, "ops"
    if top == "datamodules":
        return 2, "datamodules"  # special-cased in allowed(): data never sees models
    if top == "backbones":
        return 3, "backbones"
    if top == "checkpoints":
        return 4, "checkpoints"
    if top == "ssl":
        sub = parts[1] if len(parts) > 1 else ""
        if sub in SSL_PARTS or sub == "":
            return 5, "ssl parts"
        if sub == "base":
            return 6, "ssl.base"
        return 7, "ssl objectives"
    if top == "eval":
        return 8, "eval"
    if top == "train":
        return 9, "train"
    if top == "commands":
        return 10, "commands"
    if top in ("cli", "__main__"):
        return 11, "cli"
    raise AssertionError(f"module {module} belongs to no layer: add it to tests/test_layers.py and the README")


def allowed(importer: str, imported: str) -> str | None:
    """None when `importer` may import `imported`, else why not."""
    (ri, li), (rj, lj) = layer(importer), layer(imported)
    if li == "datamodules" and lj not in ("batch", "ops", "datamodules"):
        return f"datamodules import only batch and ops, not {lj}"
    if lj == "datamodules" and li not in ("datamodules",) and ri < layer("omnissl.eval")[0]:
        return f"{li} is below the data layer's users (eval and up): it cannot import datamodules"
    if li == lj == "ssl objectives" and importer.split(".")[2] != imported.split(".")[2]:
        return "an objective never imports another objective: move the shared code into an ssl part"
    if rj > ri:
        return f"upward import: {li} (rank {ri}) imports {lj} (rank {rj})"
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def omnissl_imports(source: str, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported omnissl module, inside a function?) for every import in `source`."""
    tree = ast.parse(source)
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function) for a in child.names if a.name.startswith("omnissl"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import: resolve against the importing package
                    base = module.split(".")[: -child.level] if not module_is_package(module) else module.split(".")
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                if name.startswith("omnissl"):
                    found.append((child.lineno, name, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def module_is_package(module: str) -> bool:
    return (ROOT.parent / Path(*module.split(".")) / "__init__.py").exists()


def violations(source: str, module: str) -> list[str]:
    out = []
    for line, imported, in_function in omnissl_imports(source, module):
        why = allowed(module, imported)
        if why:
            out.append(f"{module}:{line} imports {imported}: {why}")
        if in_function and layer(module)[1] not in ("commands", "cli"):
            out.append(f"{module}:{line} imports {imported} inside a function: import at the top (only commands/ "
                       "and cli import lazily)")
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_imports_upward(path: Path):
    assert violations(path.read_text(), module_name(path)) == []


@pytest.mark.parametrize("importer,imported,source", [
    ("omnissl.ssl.targets", "omnissl.datamodules.collate", "from omnissl.datamodules.collate import Collate\n"),
    ("omnissl.ssl.losses", "omnissl.ssl.wav2vec2", "def f():\n    from omnissl.ssl.wav2vec2 import Wav2Vec2\n"),
    ("omnissl.ssl.data2vec2", "omnissl.ssl.data2vec", "from omnissl.ssl.data2vec import Data2Vec\n"),
    ("omnissl.eval.probe", "omnissl.train.loggers", "import omnissl.train.loggers\n"),
    ("omnissl.datamodules.audio", "omnissl.backbones.encoder", "from omnissl.backbones.encoder import Encoder\n"),
    ("omnissl.backbones.encoder", "omnissl.checkpoints", "from omnissl.checkpoints import load_backbone\n"),
])
def test_a_planted_violation_is_caught(importer, imported, source):
    assert violations(source, importer), f"{importer} importing {imported} was not flagged"


def test_allowed_imports_pass():
    assert violations("from omnissl.batch import Batch\nfrom omnissl.ops import mean_pool\n",
                      "omnissl.datamodules.audio") == []
    assert violations("from omnissl.ssl.masking import span_mask\nfrom omnissl.ssl.base import SSLModule\n",
                      "omnissl.ssl.wav2vec2") == []
    assert violations("def main():\n    from omnissl.eval.probe import run_probe\n", "omnissl.commands.probe") == []


def test_every_module_has_a_layer():
    for path in MODULES:
        layer(module_name(path))
