"""Checkpoints and encoder packages: the one way to read a trained encoder back.

An encoder package is a directory

    config.json        {"format": "omnissl-backbone", "version": 1, "encoder": {"class", "args"}, "heads": {...},
                        "info": {...}}: the module tree as constructor arguments (backbones/config.py)
    model.safetensors  "encoder.*" weights (frontend included) and, when asked, "heads.<name>.*"; its metadata
                       holds a copy of config.json's "encoder" and "heads" entries

    save_backbone(encoder, dir, heads=None)   write one (heads: objective modules whose weights ride along)
    load_backbone(dir) -> Encoder             rebuild it (train mode, like any fresh module; call .eval())
    load_head_weights(dir) -> {name: state}   the heads' weights (never instantiated here)
    read_checkpoint(ckpt) -> Checkpoint       a Lightning checkpoint of any objective: its encoder rebuilt from
                                              checkpoint["omnissl"] with its weights, the other modules' weights
    load_encoder(path) -> Encoder             either of the two above, by what `path` is
    load_encoder_weights(encoder, ckpt)       a checkpoint's encoder.* weights into an existing encoder, strictly
    read_tokenizer(path) -> str | None        the tokenizer.json text that travels with a text encoder (a package's
                                              tokenizer.json, a checkpoint's checkpoint["omnissl"]["tokenizer"])

Loading is data-only: JSON, safetensors and `torch.load(weights_only=True)`, never an unpickled object, and only
`@recorded` omnissl.backbones classes are ever instantiated. config.json must agree with the copy in
model.safetensors (an edited option is named), and the weights must match the rebuilt module key for key and
shape for shape (a missing, unexpected or mis-shaped key is named), and be finite (the first tensor holding a NaN
or an infinity is named). "info" (widths, frame rate, where the package
came from) is informational only.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from omnissl.backbones.config import build_module, module_config
from omnissl.backbones.encoder import Encoder
from omnissl.ops import first_nonfinite

__all__ = ["save_backbone", "load_backbone", "load_head_weights", "load_strict", "read_checkpoint", "Checkpoint",
           "load_encoder", "load_encoder_weights", "write_package", "encoder_info", "qualname", "read_tokenizer",
           "TOKENIZER"]

FORMAT, VERSION = "omnissl-backbone", 1
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
_HEAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def encoder_info(encoder: Encoder, **extra) -> dict:
    return {"dim": encoder.dim, "num_layers": encoder.num_layers, "samples_per_token": encoder.samples_per_token,
            "frontend": type(encoder.frontend).__name__, **extra}


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}", a.get(key, "<absent>"), b.get(key, "<absent>")
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if (a == b and type(a) is type(b)) else (path, a, b)


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key, and the first tensor holding a
    NaN or an infinity (weights of a diverged run are refused, not probed or exported), with `source` in the
    message."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the module: missing keys {missing}, unexpected keys "
                         f"{unexpected}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the module expects "
                             f"{tuple(value.shape)}")
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise ValueError(f"{source}: tensor {bad} is not finite (NaN or infinity): the run that wrote these weights "
                         "diverged; use a checkpoint from before the divergence")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Packages


def write_package(path: str | Path, encoder_config: dict, state: dict[str, Tensor], heads: dict[str, str],
                   info: dict, overwrite: bool = True) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files")
    out.mkdir(parents=True, exist_ok=True)
    described = {"encoder": encoder_config, "heads": heads}
    # clone: safetensors refuses tensors that share storage (views of a fused weight, tied heads)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT, "config": json.dumps(described)})
    config = {"format": FORMAT, "version": VERSION, **described, "info": info}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_backbone(encoder: Encoder, path: str | Path, *, heads: dict[str, nn.Module] | None = None) -> Path:
    """Write `encoder` (and the weights of `heads`, e.g. {"quantizer": objective.quantizer}) as a package.

    Raises ValueError when the encoder cannot be rebuilt exactly from its constructor arguments (a part that
    is not an omnissl.backbones class, or a module changed after construction, e.g. a LayerNorm eps set by
    hand), naming the part.
    """
    if not isinstance(encoder, Encoder):
        raise ValueError(f"save_backbone writes omnissl Encoders, got {qualname(encoder)}")
    config = module_config(encoder)
    plain = json.loads(json.dumps(config))
    try:
        with torch.device("meta"):  # structure only: no second copy of the weights in memory
            rebuilt = build_module(plain)
    except (RuntimeError, NotImplementedError):  # a frontend that computes values at init (torchaudio mel)
        rebuilt = build_module(plain)
    mine, theirs = repr(encoder).splitlines(), repr(rebuilt).splitlines()
    if mine != theirs:
        line = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
        raise ValueError(f"the encoder differs from what its constructor arguments build (changed after "
                         f"construction?): {mine[line].strip() if line < len(mine) else '<end>'} vs "
                         f"{theirs[line].strip() if line < len(theirs) else '<end>'}")
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    names = {}
    for name, module in (heads or {}).items():
        if not _HEAD_NAME.match(name) or name == "encoder":
            raise ValueError(f"head name {name!r} must be a Python identifier other than 'encoder'")
        names[name] = qualname(module)
        state.update({f"heads.{name}.{k}": v for k, v in module.state_dict().items()})
    return write_package(path, config, state, names, encoder_info(encoder))


def _read_package(path: str | Path) -> tuple[dict, dict[str, Tensor], Path]:
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    config_file, weights_file = root / CONFIG, root / WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{root} is not an omnissl backbone package: {f.name} is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file}: format={got!r}, expected {FORMAT!r} (a transformers directory loads "
                         "with encoder_from_hf)")
    if config.get("version") != VERSION:
        raise ValueError(f"{config_file}: version={config.get('version')!r}, this omnissl reads version {VERSION}")
    for key, kind in (("encoder", dict), ("heads", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{config_file}: '{key}' must be an object")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{weights_file}: not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{weights_file}: no omnissl package metadata (format / config)")
    written = json.loads(metadata["config"])
    diff = _first_difference({"encoder": config["encoder"], "heads": config["heads"]}, written, "config")
    if diff:
        where, now, then = diff
        raise ValueError(f"{config_file}: {where[len('config.'):]} is {now!r} but the weights were exported with "
                         f"{then!r}; the config was edited after export (it must describe these weights)")
    return config, tensors, weights_file


def load_backbone(path: str | Path) -> Encoder:
    """Rebuild the Encoder of a package written by save_backbone / `omnissl export` (weights only).

    Usable from a recipe: `encoder: {class_path: omnissl.checkpoints.load_backbone, init_args: {path: DIR}}`.
    """
    config, tensors, weights_file = _read_package(path)
    encoder = build_module(config["encoder"], "encoder")
    if not isinstance(encoder, Encoder):
        raise ValueError(f"{Path(path) / CONFIG}: encoder.class must be omnissl.backbones.encoder.Encoder")
    heads = config["heads"]
    stray = sorted(k for k in tensors if not k.startswith("encoder.")
                   and not (k.startswith("heads.") and k.split(".")[1] in heads))
    if stray:
        raise ValueError(f"{weights_file}: unexpected keys {stray} (neither encoder.* nor a listed head)")
    load_strict(encoder, {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")},
                str(weights_file))
    return encoder


def load_head_weights(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """{head name: state dict} of the heads a package carries (empty when exported without heads)."""
    config, tensors, _ = _read_package(path)
    return {name: {k[len(f"heads.{name}."):]: v for k, v in tensors.items() if k.startswith(f"heads.{name}.")}
            for name in config["heads"]}


# ---------------------------------------------------------------------------------------------------------
# Lightning checkpoints


class Checkpoint(NamedTuple):
    """What `read_checkpoint` returns: the rebuilt encoder with its weights, the other top-level modules'
    weights by name, and `checkpoint["omnissl"]` (objective, head classes, objective metadata)."""

    encoder: Encoder
    heads: dict[str, dict[str, Tensor]]
    info: dict
    global_step: int | None


def _torch_load(path: Path, what: str) -> dict:
    """torch.load(weights_only=True) of a Lightning checkpoint, every failure named with the file."""
    if path.is_dir():
        # FSDP2 (ModelParallelStrategy) folders keep the weights under "state_dict": fabric's consolidation writes
        # a checkpoint omnissl reads; lightning.pytorch's expects FSDPStrategy's "model" key (docs/scale.md)
        raise ValueError(f"{path} is a directory (a distributed checkpoint?); {what} reads single-file Lightning "
                         "checkpoints: consolidate it first with `python -m lightning.fabric.utilities."
                         f"consolidate_checkpoint {path}` (writes {path}.consolidated)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # mmap: a large checkpoint's optimizer state is not read into memory just to be ignored
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: it holds pickled objects other than tensors and plain data, "
                         f"and omnissl never unpickles code (torch.load weights_only=True said: {e})") from e
    except RuntimeError as e:  # not a torch zip file: truncated, corrupt, or another format
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or another format?): {e}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def _encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A Lightning checkpoint written by an omnissl objective -> Checkpoint, loaded weights-only."""
    path = Path(path)
    ckpt = _torch_load(path, "omnissl")
    info = ckpt.get("omnissl")
    if not isinstance(info, dict) or "encoder" not in info:
        why = info.get("encoder_error") if isinstance(info, dict) else None
        raise ValueError(f"{path} has no encoder description (checkpoint['omnissl']['encoder']): "
                         + (why or "it was not written by an omnissl objective, or by a version before export"))
    encoder = build_module(info["encoder"], "checkpoint.omnissl.encoder")
    state = ckpt["state_dict"]
    load_strict(encoder, _encoder_state(state), f"{path} (state_dict encoder.*)")
    heads: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name != "encoder":
            heads.setdefault(name, {})[rest] = value
    step = ckpt.get("global_step")
    return Checkpoint(encoder, heads, info, int(step) if isinstance(step, int) else None)


def read_progress(path: str | Path) -> int | None:
    """The optimizer step (`global_step`) a Lightning checkpoint file (or FSDP2 checkpoint folder) was written at,
    read weights-only (memory-mapped: nothing else is read); None when the file does not record it."""
    path = Path(path)
    if path.is_dir() and (path / "meta.pt").is_file():
        # a sharded (FSDP2) checkpoint: Lightning keeps everything but weights and optimizer state in meta.pt
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        step = meta.get("global_step") if isinstance(meta, dict) else None
    else:
        step = _torch_load(path, "omnissl").get("global_step")
    return int(step) if isinstance(step, int) else None


def load_encoder(path: str | Path) -> Encoder:
    """The encoder of an omnissl package directory (load_backbone) or of a Lightning checkpoint file
    (read_checkpoint), with its weights; the one entry point of probe, features, units and fine-tuning."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no encoder package or checkpoint at {path}")
    if path.is_dir() and not (path / ".metadata").exists():  # a distributed checkpoint: read_checkpoint explains
        return load_backbone(path)
    return read_checkpoint(path).encoder


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load the `encoder.*` weights of a Lightning checkpoint (any objective's) or of a package into an existing
    `encoder`, strictly (every missing, unexpected or mis-shaped key named). Used to start a student (and so its
    teacher) or a fine-tuned model from another run."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG).exists():
        _, tensors, weights_file = _read_package(path)
        state, source = _encoder_state(tensors), str(weights_file)
    else:
        state, source = _encoder_state(_torch_load(path, "omnissl")["state_dict"]), f"{path} (state_dict encoder.*)"
    if not state:
        raise ValueError(f"{path} holds no 'encoder.*' weights")
    load_strict(encoder, state, source)


def read_tokenizer(path: str | Path) -> str | None:
    """The tokenizer (HF `tokenizers` JSON text) that travels with a text encoder: a package's tokenizer.json,
    or what a Lightning checkpoint stored under checkpoint["omnissl"]["tokenizer"] (the text of its run's
    DataModule tokenizer file); None when there is none (audio and image encoders, older checkpoints)."""
    path = Path(path)
    if path.is_dir():
        file = path / TOKENIZER
        return file.read_text(encoding="utf-8") if file.is_file() else None
    info = _torch_load(path, "omnissl").get("omnissl")
    text = info.get("tokenizer") if isinstance(info, dict) else None
    return text if isinstance(text, str) else None
