"""YOLOv8 (ultralytics) adapter: prepare / train / predict for one fold.

Contract (same as every model folder, see models/README.md):

* ``prepare``: fused labels (``cxr.fusion.DEFAULT``) and the fold file -> a YOLO dataset
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

The network is built from ultralytics' model yaml: nothing is downloaded; a local ``.pt``
(``weights:``) initializes it when given.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxr.config import save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.io import atomic_path
from models.common import Detections, Infer, device, write_fold_predictions

OUTPUT = "detections"  # what merge does with the folds' tables (see models/__main__.py)


@dataclass
class Config:
    """A profile (models/yolo/demo.yaml, full.yaml); every field maps to an ultralytics train/predict arg."""

    model: str = "yolov8n.yaml"  # architecture yaml shipped in ultralytics (n/s/m/l/x)
    weights: str | None = None  # optional local .pt to start from
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


def _device(cfg: Config) -> str:
    d = device(cfg.device)
    return "0" if d == "cuda" else d  # ultralytics spells GPUs by index


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Write the YOLO dataset of ``fold`` under ``out/dataset``; returns its data.yaml."""
    root = out / "dataset"
    data_yaml = root / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    fused = data.fused()
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
    from ultralytics import YOLO

    final = out / "weights.pt"
    if final.exists():
        return final
    data_yaml = prepare(cfg, data, folds, fold, out)
    save(cfg, out / "config.yaml")
    last = out / "train" / "weights" / "last.pt"
    if last.exists():
        YOLO(str(last)).train(resume=True)
    else:
        model = YOLO(cfg.model, task="detect")
        if cfg.weights:
            model.load(cfg.weights)
        model.train(
            data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, nbs=cfg.nbs,
            warmup_epochs=cfg.warmup_epochs, workers=cfg.workers,
            device=_device(cfg), optimizer=cfg.optimizer, lr0=cfg.lr0, cos_lr=cfg.cos_lr, mosaic=cfg.mosaic,
            close_mosaic=cfg.close_mosaic, fliplr=cfg.fliplr, scale=cfg.scale, amp=cfg.amp, patience=cfg.patience,
            seed=cfg.seed, project=str(out.resolve()), name="train", exist_ok=True, pretrained=False,
            plots=False, verbose=False,
        )
    best = out / "train" / "weights" / "best.pt"
    with atomic_path(final) as tmp:
        shutil.copyfile(best if best.exists() else last, tmp)
    return final


def load_infer(cfg: Config, out: Path) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py)."""
    from ultralytics import YOLO

    weights = out / "weights.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: train this fold first (make train MODEL=yolo FOLD=k)")
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
