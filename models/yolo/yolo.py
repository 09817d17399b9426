"""YOLOv8 (ultralytics) adapter: prepare / train / predict for one fold.

Contract (same as every model folder, see models/README.md):

* ``prepare``: fused labels (``labels:``, default ``cxr.fusion.DEFAULT``) and the fold file -> a YOLO dataset
  in ``<run>/yolo/fold<k>/dataset``: symlinks to the squashed PNGs, one txt per image
  (``class cx cy w h`` normalized: because the PNGs are squashed, dividing original pixels
  by the original width/height gives exactly the normalized position in the PNG), an empty
  txt for a normal image (background), and ``data.yaml``. Skipped when done.
* ``train``: ultralytics' own trainer on every fold but k, validating on fold k; its
  ``results.csv`` is the per-epoch metrics log, ``args.yaml`` its resolved arguments,
  ``config.yaml`` ours. A killed run resumes from ``train/weights/last.pt``; a finished one
  is left alone (``weights.pt`` marks it).
* ``predict``: ``oof.csv`` for fold k's images and ``test.csv`` for the test set in the
  shared prediction format, original pixels, low score threshold, optional flip TTA.

The network is built from ultralytics' model yaml (``model:``) with 14 classes; nothing is
downloaded. ``weights:`` names a local ultralytics ``.pt`` (e.g. the COCO ``yolov8x.pt``, 80
classes): :class:`PretrainedTrainer` copies every tensor that fits through
:func:`models.weights.transfer` (one ``loaded N of M tensors`` line; the class branch of the
Detect head is re-initialised for 14 classes). ultralytics' own ``train(pretrained=False)`` would
throw the file away, and its ``load`` rebuilds the class branch at the file's width.

Every ultralytics train key without a field here (``mixup``, ``translate``, ``degrees``, ``hsv_v``,
``lrf``, ...) goes in ``train_args`` and is passed through: checked against ultralytics' own
default-config keys and types, so a misspelt key is a clear error, not a silent no-op.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK

from cxr.config import save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.fusion import DEFAULT, FusionConfig
from cxr.io import DataError, atomic_path
from models.common import Detections, Infer, device, trained_weights, write_fold_predictions
from models.weights import resolve, transfer

OUTPUT = "detections"  # what merge does with the folds' tables (see models/__main__.py)


@dataclass
class Config:
    """A profile (models/yolo/demo.yaml, full.yaml); every field maps to an ultralytics train/predict arg."""

    model: str = "yolov8n.yaml"  # architecture yaml shipped in ultralytics (n/s/m/l/x)
    weights: str | None = None  # local ultralytics .pt to start from (e.g. weights/yolov8x.pt); None: from scratch
    labels: FusionConfig = field(default_factory=lambda: DEFAULT)  # reader fusion of the training labels
    imgsz: int = 256
    epochs: int = 10
    batch: int = 16
    nbs: int = 64  # nominal batch: ultralytics accumulates gradients up to it (set = batch on small data)
    warmup_epochs: float = 3.0  # ultralytics warms up for at least 100 iterations whenever this is > 0
    workers: int = 2
    optimizer: str = "SGD"
    lr0: float = 0.01
    cos_lr: bool = False
    mosaic: float = 1.0
    close_mosaic: int = 0
    fliplr: float = 0.5
    scale: float = 0.3
    amp: bool = True  # used on GPU only
    patience: int = 100
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "0", or "0,1,2,3" for ultralytics' own DDP
    conf: float = 0.001  # low: the metric does not punish extra boxes
    iou: float = 0.6  # NMS IoU at prediction time
    max_det: int = 300
    tta: bool = False  # horizontal-flip TTA merged with WBF
    predict_batch: int = 16
    train_args: dict[str, Any] = field(default_factory=dict)  # any other ultralytics train key: {mixup: 0.1, degrees: 10}


# ultralytics keys the adapter sets itself (where the data and the run live, how the start is made)
_OWNED = {"task", "mode", "model", "data", "project", "name", "exist_ok", "pretrained", "resume", "plots", "verbose"}


def train_kwargs(cfg: Config, data_yaml: Path, out: Path) -> dict[str, Any]:
    """The ``YOLO.train`` arguments of ``cfg``: its fields, then ``train_args`` checked against
    ultralytics' own default config (unknown keys, keys set elsewhere and wrong types are errors)."""
    explicit = {f.name for f in fields(Config)} & set(DEFAULT_CFG_DICT)
    unknown = sorted(set(cfg.train_args) - set(DEFAULT_CFG_DICT))
    if unknown:
        raise DataError("train_args", f"unknown ultralytics train key(s) {unknown}; known: see ultralytics/cfg/default.yaml")
    taken = sorted(set(cfg.train_args) & (explicit | _OWNED))
    if taken:
        raise DataError("train_args", f"{taken} are set by their own field or by the adapter, not in train_args")
    extra = dict(cfg.train_args)
    try:
        check_cfg(extra)
    except (TypeError, ValueError) as e:
        raise DataError("train_args", str(e)) from None
    return dict(
        data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, nbs=cfg.nbs,
        warmup_epochs=cfg.warmup_epochs, workers=cfg.workers, device=_device(cfg), optimizer=cfg.optimizer,
        lr0=cfg.lr0, cos_lr=cfg.cos_lr, mosaic=cfg.mosaic, close_mosaic=cfg.close_mosaic, fliplr=cfg.fliplr,
        scale=cfg.scale, amp=cfg.amp, patience=cfg.patience, seed=cfg.seed, **extra,
        project=str(out.resolve()), name="train", exist_ok=True, plots=False, verbose=False,
        # a path: the trainer's get_model receives the file's network and transfers it (PretrainedTrainer)
        pretrained=str(resolve(cfg.weights)) if cfg.weights else False,
    )


class PretrainedTrainer(DetectionTrainer):
    """ultralytics' detection trainer, except that a start checkpoint (``pretrained=PATH``) is
    copied in by :func:`models.weights.transfer`: what fits by name and shape loads, the rest
    (the 80-class branch of the head) keeps its fresh init, and one line says which."""

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        if weights is not None:
            source = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
            n_backbone = len(model.yaml["backbone"])  # layers model.0 .. model.{n-1}

            def is_backbone(name: str) -> bool:
                return name.startswith("model.") and int(name.split(".")[1]) < n_backbone

            transfer(model, source.float().state_dict(), self.args.pretrained, is_backbone,
                     log=print if RANK in {-1, 0} else lambda _: None)
        return model


def _device(cfg: Config) -> str:
    d = device(cfg.device)
    return "0" if d == "cuda" else d  # ultralytics spells GPUs by index


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Write the YOLO dataset of ``fold`` under ``out/dataset``; returns its data.yaml."""
    root = out / "dataset"
    data_yaml = root / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    fused = data.fused(cfg.labels)
    fused = fused[fused["class_id"] != NO_FINDING]
    by_image = dict(tuple(fused.groupby("image_id")))
    sizes = data.train_sizes.set_index("image_id")
    for part, ids in zip(("train", "val"), split(folds, fold)):
        (root / "images" / part).mkdir(parents=True, exist_ok=True)
        (root / "labels" / part).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            link = root / "images" / part / f"{image_id}.png"
            if not link.exists():
                os.symlink(data.image("train", image_id).resolve(), link)
            w, h = sizes.loc[image_id, ["width", "height"]]
            boxes = by_image.get(image_id)
            lines = []
            if boxes is not None:
                b = boxes[BOX_COLUMNS].to_numpy(dtype=float) / np.array([w, h, w, h])
                for c, (x0, y0, x1, y1) in zip(boxes["class_id"], b.clip(0, 1)):
                    lines.append(f"{c} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
            (root / "labels" / part / f"{image_id}.txt").write_text("\n".join(lines))
    spec = {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
            "names": {c: CLASS_NAMES[c] for c in FINDING_CLASSES}}
    with atomic_path(data_yaml) as tmp:
        tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Train fold ``fold`` with ultralytics' trainer (resuming a killed run); returns the best weights."""
    final = out / "weights.pt"
    if final.exists():
        return final
    last = out / "train" / "weights" / "last.pt"
    # bad train_args or a missing start checkpoint stop here, before any work
    kwargs = None if last.exists() else train_kwargs(cfg, out / "dataset" / "data.yaml", out)
    prepare(cfg, data, folds, fold, out)
    save(cfg, out / "config.yaml")
    if kwargs is None:
        YOLO(str(last)).train(resume=True)  # the checkpoint holds the network and every train argument
    else:
        YOLO(cfg.model, task="detect").train(trainer=PretrainedTrainer, **kwargs)
    best = out / "train" / "weights" / "best.pt"
    with atomic_path(final) as tmp:
        shutil.copyfile(best if best.exists() else last, tmp)
    return final


def load_infer(cfg: Config, out: Path) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py)."""
    weights = trained_weights(out / "weights.pt", "yolo")
    model = YOLO(str(weights), task="detect")

    def infer(images: list[np.ndarray]) -> list[Detections]:
        bgr = [np.repeat(im[:, :, None], 3, axis=2) for im in images]
        results = model.predict(bgr, imgsz=cfg.imgsz, conf=cfg.conf, iou=cfg.iou, max_det=cfg.max_det,
                                device=_device(cfg), verbose=False)
        return [(r.boxes.xyxyn.cpu().numpy(), r.boxes.conf.cpu().numpy(), r.boxes.cls.cpu().numpy()) for r in results]

    return infer


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    """Write ``oof.csv`` and ``test.csv`` for ``fold`` from its trained weights."""
    return write_fold_predictions(load_infer(cfg, out), data, folds, fold, out, cfg.tta, cfg.predict_batch)
