"""Model adapters (see models/README.md).

Nothing may download at run time: these defaults turn off ultralytics' and albumentations'
online checks for every entry point (the Makefile exports the same); a user may override them.
"""
import os

for _key, _value in {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "NO_ALBUMENTATIONS_UPDATE": "1",
                     "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)
