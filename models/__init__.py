"""Model adapters (see models/README.md) and THE table of models.

Adding a model means a folder ``models/<name>/`` with ``<name>.py`` (the adapter contract in
models/README.md), ``demo.yaml`` and ``full.yaml``, plus one line in :data:`MODELS`. Everything
else (the Makefile, ``python -m models``, the ensemble, the bench scripts, the install check)
reads this table. It is a plain dict, not a registry: an adapter module is imported only when
its model is asked for, so this file stays importable without the frameworks.

Nothing may download at run time: the defaults below turn off ultralytics' and albumentations'
online checks for every entry point (the Makefile exports the same); a user may override them.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

# the Makefile exports the same; the scheduler hands them to every job on every node (Ray's runtime_env)
OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

Kind = Literal["detector", "classifier"]

# name -> (adapter module, kind). Detectors write boxes (fused by the ensemble); the classifier
# writes p_abnormal (the ensemble's gate).
MODELS: dict[str, tuple[str, Kind]] = {
    "yolo": ("models.yolo.yolo", "detector"),
    "detectron": ("models.detectron.detectron", "detector"),
    "effdet": ("models.effdet.effdet", "detector"),
    "classifier": ("models.classifier.classifier", "classifier"),
}


def names(kind: Kind | None = None) -> list[str]:
    """Model names in table order, optionally only one kind."""
    return [m for m, (_, k) in MODELS.items() if kind is None or k == kind]


def adapter(name: str) -> ModuleType:
    """Import and return the adapter module of model ``name``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name][0])


def kind(name: str) -> Kind:
    return MODELS[name][1]
