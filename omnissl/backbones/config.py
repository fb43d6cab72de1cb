"""Backbone modules described by their constructor arguments, and rebuilt from that description.

`@recorded` on a backbone class makes every instance remember the arguments it was built with.
`module_config(encoder)` then describes the whole module tree as plain JSON data

    {"class": "omnissl.backbones.encoder.Encoder",
     "args": {"frontend": {"class": "omnissl.backbones.frontends.ConvFeatureExtractor", "args": {...}},
              "trunk": {...}, "positions": {...} | null, "feature_norm": true, ...}}

and `build_module(config)` rebuilds it. Rebuilding only ever instantiates `@recorded` classes defined in an
`omnissl.backbones` module: a config is data, never an import path to arbitrary code. Every argument is
checked against the constructor's signature and type hints, and errors name the offending option by its
path in the config (`encoder.trunk.depth`).

Module-valued arguments (an Encoder's frontend, trunk, positions) are described from the live submodule of
the same attribute name, so a submodule swapped after construction is described as it is now.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import types
import typing
from typing import Any, Union

from torch import nn

_PACKAGE = "omnissl.backbones."
_MARK = "_omnissl_recorded"


def recorded(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: instances keep their constructor arguments (`_init_args`, module-valued ones by name
    in `_init_modules`) for `module_config`."""
    init = cls.__init__
    signature = inspect.signature(init)
    for p in list(signature.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"@recorded {cls.__qualname__} must not take *args / **kwargs ({p.name})")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is not cls:  # a subclass describes itself (or cannot be described)
            return
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.items())[1:]
        self._recorded_class = cls
        self._init_args = {k: v for k, v in values if not isinstance(v, nn.Module)}
        self._init_modules = tuple(k for k, v in values if isinstance(v, nn.Module))

    cls.__init__ = __init__
    setattr(cls, _MARK, True)
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _to_json(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}={value!r}: non-finite numbers cannot be written to a config")
        return value
    if isinstance(value, (tuple, list)):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{path}: a {type(value).__name__} argument cannot be written to a config")


def module_config(module: nn.Module, path: str = "encoder") -> dict:
    """{"class", "args"} of a module built from `@recorded` omnissl.backbones classes, recursively."""
    cls = getattr(module, "_recorded_class", None)
    if cls is None or not isinstance(module, cls):
        raise ValueError(
            f"{path}: a {_qualname(type(module))} cannot be described by its constructor arguments; only "
            "omnissl.backbones classes marked @recorded can (build the encoder from omnissl.backbones parts)"
        )
    args = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in module._init_args:
            args[name] = _to_json(module._init_args[name], f"{path}.{name}")
        elif name in module._init_modules:
            sub = getattr(module, name, None)
            if not isinstance(sub, nn.Module):
                raise ValueError(f"{path}.{name}: the module argument is no longer a submodule of that name")
            args[name] = module_config(sub, f"{path}.{name}")
    return {"class": _qualname(cls), "args": args}


def _recorded_class(name: Any, path: str) -> type[nn.Module]:
    if not isinstance(name, str) or not name.startswith(_PACKAGE) or name.count(".") < 3:
        raise ValueError(f"{path}.class={name!r}: only classes of omnissl.backbones modules can be built")
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{path}.class={name!r}: no such omnissl.backbones module") from e
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and cls.__dict__.get(_MARK) and cls.__module__ == module_name):
        raise ValueError(f"{path}.class={name!r} is not a buildable (@recorded) omnissl.backbones class")
    return cls


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does the JSON value fit the type hint, the value converted: lists -> tuples where a tuple is hinted)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _matches(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None) or hint is None:
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False, value
        items = typing.get_args(hint)
        if origin is tuple and len(items) == 2 and items[1] is Ellipsis:
            items = (items[0],) * len(value)
        elif origin is list:
            items = (items[0] if items else Any,) * len(value)
        if items and len(items) != len(value):
            return False, value
        out = []
        for v, h in zip(value, items or (Any,) * len(value)):
            ok, converted = _matches(v, h)
            if not ok:
                return False, value
            out.append(converted)
        return True, tuple(out) if origin is tuple else out
    return False, value


def build_module(config: Any, path: str = "encoder") -> nn.Module:
    """Rebuild a module described by `module_config`. Errors name the option by its path."""
    if not isinstance(config, dict) or set(config) != {"class", "args"}:
        raise ValueError(f"{path}: expected an object with exactly the keys 'class' and 'args', got {config!r:.200}")
    cls = _recorded_class(config["class"], path)
    args = config["args"]
    if not isinstance(args, dict):
        raise ValueError(f"{path}.args must be an object, got {type(args).__name__}")
    params = dict(list(inspect.signature(cls.__init__).parameters.items())[1:])
    hints = typing.get_type_hints(cls.__init__)
    for name in args:
        if name not in params:
            raise ValueError(f"{path}.{name}: {cls.__name__} has no argument {name!r} (it takes {sorted(params)})")
    for name, p in params.items():
        if name not in args and p.default is inspect.Parameter.empty:
            raise ValueError(f"{path}.{name}: missing required argument of {cls.__name__}")
    kwargs = {}
    for name, value in args.items():
        hint = hints.get(name, Any)
        if isinstance(value, dict):
            sub = build_module(value, f"{path}.{name}")
            if not isinstance(sub, nn.Module) or not _matches_module(sub, hint):
                raise ValueError(f"{path}.{name}: a {type(sub).__name__} does not fit the argument type {hint}")
            kwargs[name] = sub
            continue
        ok, converted = _matches(value, hint)
        if not ok:
            raise ValueError(f"{path}.{name}={value!r:.100} does not fit the argument type {hint}")
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} ({cls.__name__}): {e}") from e


def _matches_module(module: nn.Module, hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_matches_module(module, h) for h in typing.get_args(hint))
    return isinstance(hint, type) and isinstance(module, hint)
