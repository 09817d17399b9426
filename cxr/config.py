"""Typed configs: dataclasses filled from YAML, unknown keys rejected, values checked against their range,
resolved copy saved per run.

Usage::

    @dataclass
    class TrainConfig:
        epochs: Count = 10            # int >= 1
        lr: Positive = 1e-3           # float > 0
        imgsz: ImageSize = 256        # a positive multiple of 32
        p: Annotated[float, Range(0, 1)] = 0.5

    cfg = load(TrainConfig, "models/yolo/demo.yaml", overrides={"epochs": 1})
    save(cfg, run_dir / "config.yaml")

One rule for every value a user gives (YAML key, ``--set``, a make variable passed as ``--set``): its
type and its :class:`Range` are checked where it enters (:func:`from_dict`), and a bad one is one
:class:`DataError` naming where it came from, the key and the value, before anything is written.
A range is part of the field's type (``typing.Annotated``), so it reads beside the field and
holds inside lists too (``list[Annotated[float, Range(0, 1)]]``).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from cxr.io import DataError, atomic_path

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts: ``low <= v <= high`` (``<`` where open), and a multiple
    of ``step`` when given. Attach it to the type: ``epochs: Annotated[int, Range(low=1)]``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    step: int | None = None

    def holds(self, v: float) -> bool:
        return (math.isfinite(v) and (self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or (v < self.high if self.open_high else v <= self.high))
                and (self.step is None or v % self.step == 0))

    def __str__(self) -> str:
        if self.step is not None:
            return f"a multiple of {self.step}" + (f" >= {self.low:g}" if self.low is not None else "")
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"{'<' if self.open_high else '<='} {self.high:g}"


# The ranges most fields need, by name.
Count = Annotated[int, Range(low=1)]  # epochs, batch sizes, iterations, periods
NonNegative = Annotated[int, Range(low=0)]  # workers, seeds, patience
Positive = Annotated[float, Range(low=0, open_low=True)]  # learning rates, standard deviations
NonNegativeFloat = Annotated[float, Range(low=0)]  # weight decay, warmup epochs, clipping norms
Fraction = Annotated[float, Range(0, 1)]  # probabilities, score and IoU thresholds
ImageSize = Annotated[int, Range(low=32, step=32)]  # every network here downsamples by 32
IoU = Annotated[float, Range(0, 1, open_low=True)]  # an overlap threshold: 0 would merge disjoint boxes
Zoom = Annotated[float, Range(0, 1, open_high=True)]  # augmentation: zoom in [1 - v, 1 + v]; EMA decays
Degrees = Annotated[float, Range(0, 180)]  # augmentation: rotation +- degrees


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` is a number (YAML 1.1, which PyYAML follows,
    wants ``1.0e-4`` and reads ``1e-4`` as a string, so ``--set lr=1e-4`` failed as 'expected float')."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """YAML text -> Python values, safely (no object construction), with YAML 1.2's floats."""
    return yaml.load(text, Loader=_Loader)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and values out of their
    :class:`Range` raise :class:`DataError` (``where: key: value ...``)."""
    try:
        return cls(**_values(cls, data, where))
    except TypeError as e:  # a required field is missing
        raise DataError(where, str(e)) from e


def load(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None,
         overrides_from: str = "--set") -> T:
    """Read ``path`` (YAML) into ``cls``, then apply ``overrides`` (e.g. from the command line; their
    errors name ``overrides_from`` instead of the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "config file not found")
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from None
    except yaml.YAMLError as e:  # the line and column of a syntax error, on one line
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise DataError(path, f"YAML syntax error at {where}{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be a mapping")
    values = {**_values(cls, data, str(path)), **_values(cls, nest(overrides or {}, data, cls), overrides_from)}
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise DataError(path, str(e)) from e


def nest(overrides: dict[str, Any], base: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """Dotted override keys into the nested mapping they name, on top of ``base``'s (the profile's) values:
    ``{"labels.select": "only"}`` -> ``{"labels": {**profile's labels, "select": "only"}}``, so one key of a
    nested setting changes from the command line (make's SET is split at spaces: no YAML mapping fits it).
    Only a key whose head is a field of ``cls`` holding a dataclass is nested; others stay as they are."""
    nested = ({f.name for f in dataclasses.fields(cls)
               if dataclasses.is_dataclass(typing.get_type_hints(cls).get(f.name))} if cls is not None else None)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if not dot or (nested is not None and head not in nested):
            out[key] = value
            continue
        inner = out.get(head, base.get(head))
        inner = dict(inner) if isinstance(inner, dict) else {}
        out[head] = {**inner, **nest({rest: value}, inner)}
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically, so every run folder says how it was made."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# The frameworks' own names (ultralytics, detectron2) and older names of keys the model configs share under one
# name: an unknown key found here is answered with the shared one
SYNONYMS = {"lr0": "lr", "base_lr": "lr", "max_iter": "epochs", "warmup_iters": "warmup_epochs",
            "eval_period": "validate_every", "val_period": "validate_every", "shift": "translate", "rotate": "degrees",
            "conf": "score_thr", "iou": "nms_iou", "hsv_v": "brightness_contrast", "flip": "fliplr"}
# Keys the model configs had and no longer have, with why
REMOVED = {"checkpoint_period": "gone: every model saves a checkpoint every epoch",
           "affine_p": "gone: the albumentations affine applies with p=0.5 in every model"}


def unknown_keys(cls: type, unknown: list[str]) -> str:
    """``unknown key 'epoch' (did you mean 'epochs'?) for yolo Config`` plus where framework keys go (the
    class's ``PASSTHROUGH``); the known keys when nothing is close."""
    fields = [f.name for f in dataclasses.fields(cls)]

    def closest(key: str) -> str | None:
        if SYNONYMS.get(key) in fields:
            return SYNONYMS[key]
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        return close[0] if close else None

    def hint(key: str) -> str:
        if key in REMOVED:
            return f" ({REMOVED[key]})"
        return f" (did you mean {closest(key)!r}?)" if closest(key) else ""

    parts = [f"unknown key {key!r}{hint(key)}" for key in unknown]
    text = f"{'; '.join(parts)} for {cls.__module__.rsplit('.', 1)[-1]} {cls.__name__}"
    passthrough = getattr(cls, "PASSTHROUGH", "")
    if passthrough:
        text += f"; {passthrough}"
    if not all(closest(k) or k in REMOVED for k in unknown):
        text += f"; known: {', '.join(sorted(fields))}"
    return text


def describe(cls: type, shared: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(key, type, meaning) of every field of dataclass ``cls``, in order. The meaning is ``shared[key]``
    when given (a vocabulary common to several configs), else the trailing ``# comment`` of the field's
    line(s) in the class's source, else ''."""
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _field_comments(cls)
    return [(f.name, type_text(hints[f.name]), (shared or {}).get(f.name) or comments.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment(s) on its logical line in ``cls``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    name, comments, first = None, [], True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and first:
            name = tok.string
        first = tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.COMMENT) and first
        if tok.type == tokenize.COMMENT and name is not None:
            comments.append(tok.string.lstrip("#").strip())
        if tok.type == tokenize.NEWLINE:
            if name is not None and comments:
                out[name] = " ".join(comments)
            name, comments, first = None, [], True
    return out


def type_text(hint: Any) -> str:
    """A field's type in words: ``int >= 1``, ``float in [0, 1]``, ``one of SGD|AdamW``, ``str or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        ranges = [str(r) for r in hint.__metadata__ if isinstance(r, Range)]
        return ", ".join([type_text(args[0]), *ranges]).replace(", >", " >").replace(", <", " <").replace(", in ", " in ")
    if origin in (typing.Union, types.UnionType):
        options = [type_text(a) for a in args if a is not type(None)]
        return " | ".join(options) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + "|".join(repr(a) if a == "" else str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_text(args[0]) if args else 'values'}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(hint):
        return hint.__name__
    return getattr(hint, "__name__", str(hint))


def _values(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data``'s keys checked against ``cls``'s fields, each value coerced to its type and checked."""
    if not isinstance(data, dict):
        raise DataError(where, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise DataError(where, unknown_keys(cls, unknown))
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: _coerce(hints[name], value, f"{where}: {name}") for name, value in data.items()}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(args[0], value, where)
        for rule in hint.__metadata__:
            if isinstance(rule, Range) and isinstance(value, (int, float)) and not rule.holds(value):
                raise DataError(where, f"{value!r} is out of range: must be {rule}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (its range, its type)
            return _coerce(options[0], value, where)
        for arg in options:
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
