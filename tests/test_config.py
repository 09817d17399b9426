"""Typed YAML configs: unknown keys, wrong types and values out of range rejected with the file (or --set)
named; resolved config saved."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import pytest
import yaml

from cxr.config import Count, Fraction, ImageSize, Positive, Range, from_dict, load, save
from cxr.fusion import FusionConfig
from cxr.io import DataError


@dataclass
class Run:
    epochs: Count = 3
    lr: Positive = 0.01
    name: str | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    imgsz: ImageSize = 64
    stds: list[Positive] = field(default_factory=lambda: [1.0])
    ema: Annotated[float, Range(0, 1, open_high=True)] | None = None
    p: Fraction = 0.5


def test_load_override_and_save(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 5\nlr: 1\nfusion:\n  mode: nms\n  drop_readers: [R8]\n")
    cfg = load(Run, path, overrides={"name": "x"})
    assert cfg == Run(epochs=5, lr=1.0, name="x", fusion=FusionConfig(mode="nms", drop_readers=("R8",)))
    saved = save(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(saved.read_text())["fusion"]["mode"] == "nms"
    assert load(Run, saved) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 5\n", r"unknown key .epoch. \(did you mean .epochs.\?\) for test_config Run"),
        ("epochs: five\n", "epochs: expected int, got 'five'"),
        ("fusion:\n  mode: soft\n", "'soft' is not one of"),
        ("fusion:\n  iou: 0.5\n", r"unknown key .iou. \(did you mean .iou_thr.\?\) for fusion FusionConfig"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_rejects_bad_config(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        load(Run, path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": -1}, "epochs: -1 is out of range: must be >= 1"),
        ({"epochs": 0}, "epochs: 0 is out of range: must be >= 1"),
        ({"lr": 0}, r"lr: 0.0 is out of range: must be > 0"),
        ({"lr": float("nan")}, r"lr: nan is out of range: must be > 0"),
        ({"imgsz": 0}, "imgsz: 0 is out of range: must be a multiple of 32 >= 32"),
        ({"imgsz": 100}, "imgsz: 100 is out of range: must be a multiple of 32 >= 32"),
        ({"stds": [1.0, -2]}, r"stds\[1\]: -2.0 is out of range: must be > 0"),
        ({"ema": 1.0}, r"ema: 1.0 is out of range: must be in \[0, 1\)"),
        ({"p": 1.5}, r"p: 1.5 is out of range: must be in \[0, 1\]"),
    ],
)
def test_values_out_of_range_name_the_key_and_value(tmp_path, values, message):
    """One rule for every value: its range is part of the field's type and checked where it enters."""
    with pytest.raises(DataError, match=f"^x.yaml: {message}$"):
        from_dict(Run, values, "x.yaml")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(DataError, match=f"^{path}: {message}$"):
        load(Run, path)
    path.write_text("epochs: 2\n")  # a good file, the bad value from the command line: --set is named
    with pytest.raises(DataError, match=f"^--set: {message}$"):
        load(Run, path, overrides=values)


def test_values_in_range_and_none_pass():
    cfg = from_dict(Run, {"epochs": 1, "lr": 1e-9, "imgsz": 32, "stds": [0.5], "ema": 0.0, "p": 1})
    assert (cfg.epochs, cfg.imgsz, cfg.ema, cfg.p) == (1, 32, 0.0, 1.0)
    assert from_dict(Run, {"ema": None}).ema is None


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.2's floats: `lr: 1e-4` (and --set lr=1e-4) is a number; PyYAML alone reads it as a string."""
    from models.__main__ import parse_overrides

    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-4\n")
    assert load(Run, path).lr == 3e-4
    assert load(Run, path, overrides=parse_overrides(["lr=1e-30"])).lr == 1e-30
    assert parse_overrides(["name=1e5x"]) == {"name": "1e5x"}


def test_a_dotted_key_changes_one_key_of_a_nested_setting(tmp_path):
    """``labels.select=only`` (make's SET cannot hold a YAML mapping with spaces) changes that key and keeps the
    profile's others; a dotted key naming no field is the usual one-line error."""
    from cxr.config import load
    from models.effdet.effdet import Config

    profile = tmp_path / "p.yaml"
    profile.write_text("labels: {mode: nms, drop_readers: [R1]}\n")
    cfg = load(Config, profile, {"labels.select": "only", "labels.images_read_only_by": ["R8", "R9"]})
    assert (cfg.labels.mode, cfg.labels.drop_readers, cfg.labels.select, cfg.labels.images_read_only_by) == \
        ("nms", ("R1",), "only", ("R8", "R9"))
    assert load(Config, profile, {"tta_fusion.iou_thr": 0.6}).tta_fusion.iou_thr == 0.6
    with pytest.raises(DataError, match="labels: unknown key"):
        load(Config, profile, {"labels.nope": 1})
