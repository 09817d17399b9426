"""Typed configs: dataclasses filled from YAML, unknown keys rejected, resolved copy saved per run.

Usage::

    @dataclass
    class TrainConfig:
        epochs: int = 10
        lr: float = 1e-3

    cfg = load(TrainConfig, "models/yolo/demo.yaml", overrides={"epochs": 1})
    save(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cxr.io import DataError, atomic_path

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`DataError`."""
    if not isinstance(data, dict):
        raise DataError(where, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DataError(where, f"unknown key(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise DataError(where, str(e)) from e


def load(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Read ``path`` (YAML) into ``cls``, then apply ``overrides`` (e.g. from the command line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from None
    except yaml.YAMLError as e:  # the line and column of a syntax error, on one line
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise DataError(path, f"YAML syntax error at {where}{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be a mapping")
    data.update(overrides or {})
    return from_dict(cls, data, str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically, so every run folder says how it was made."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except DataError:
                pass
        raise DataError(where, f"{value!r} does not fit {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise DataError(where, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DataError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise DataError(where, f"{value!r} is not one of {list(args)}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise DataError(where, f"expected {hint.__name__}, got {value!r}")
    return value
