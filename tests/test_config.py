"""Typed YAML configs: unknown keys and wrong types rejected with the file named; resolved config saved."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from cxr.config import load, save
from cxr.fusion import FusionConfig
from cxr.io import DataError


@dataclass
class Run:
    epochs: int = 3
    lr: float = 0.01
    name: str | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)


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
        ("epoch: 5\n", r"unknown key\(s\) \['epoch'\] for Run"),
        ("epochs: five\n", "epochs: expected int, got 'five'"),
        ("fusion:\n  mode: soft\n", "'soft' is not one of"),
        ("fusion:\n  iou: 0.5\n", r"unknown key\(s\) \['iou'\] for FusionConfig"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_rejects_bad_config(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        load(Run, path)
    assert str(path) in str(e.value)
