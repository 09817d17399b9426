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

Multi-GPU: ``gpus: N`` hands ultralytics ``device=0,...,N-1`` (its own DDP, over the cards
``CUDA_VISIBLE_DEVICES`` shows) and ``batch`` x N, since ``batch`` is per GPU here and ultralytics
divides its ``batch`` by the device count. ultralytics keeps the nominal batch ``nbs`` by
accumulating less; what it cannot absorb scales ``lr0`` (``models.common.scale_for_gpus``'s rule).
ultralytics' AMP check, which downloads yolo26n.pt at every GPU start, is replaced by
:func:`check_amp` (nothing downloads).

Every ultralytics train key without a field here (``mixup``, ``translate``, ``degrees``, ``hsv_v``,
``lrf``, ...) goes in ``train_args`` and is passed through: checked against ultralytics' own
default-config keys and types, so a misspelt key is a clear error, not a silent no-op.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import ultralytics.engine.trainer
import yaml
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK

from cxr.config import Count, Fraction, ImageSize, NonNegative, NonNegativeFloat, Positive, save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.fusion import DEFAULT, FusionConfig
from cxr.io import DataError, atomic_path
from models.common import (Detections, Infer, decode_workers, device, loader_workers, trained_weights,
                           write_fold_predictions)
from models.weights import resolve, transfer

OUTPUT = "detections"  # what merge does with the folds' tables (see models/__main__.py)


@dataclass
class Config:
    """A profile (models/yolo/demo.yaml, full.yaml); every field maps to an ultralytics train/predict arg."""

    model: str = "yolov8n.yaml"  # architecture yaml shipped in ultralytics (n/s/m/l/x)
    weights: str | None = None  # local ultralytics .pt to start from (e.g. weights/yolov8x.pt); None: from scratch
    labels: FusionConfig = field(default_factory=lambda: DEFAULT)  # reader fusion of the training labels
    imgsz: ImageSize = 256
    epochs: Count = 10
    batch: Count = 16  # per GPU
    nbs: Count = 64  # nominal batch: ultralytics accumulates gradients up to it (set = batch on small data)
    warmup_epochs: NonNegativeFloat = 3.0  # ultralytics warms up for at least 100 iterations whenever this is > 0
    workers: NonNegative = 2  # loader workers per GPU at most (fewer when the job has fewer cores)
    optimizer: Literal["SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "auto"] = "SGD"
    lr0: Positive = 0.01  # for the nominal batch nbs (see scale_for_gpus)
    cos_lr: bool = False
    mosaic: Fraction = 1.0
    close_mosaic: NonNegative = 0
    fliplr: Fraction = 0.5
    scale: NonNegativeFloat = 0.3
    amp: bool = True  # on GPU only: training, validation and prediction
    patience: NonNegative = 100  # 0: no early stop
    seed: NonNegative = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: a usable GPU, else the CPU; cuda: a GPU or stop
    gpus: Count = 1  # GPUs of one training job: ultralytics' DDP over the first N visible cards
    conf: Fraction = 0.001  # low: the metric does not punish extra boxes
    iou: Fraction = 0.6  # NMS IoU at prediction time
    max_det: Count = 300
    tta: bool = False  # horizontal-flip TTA merged with WBF
    predict_batch: Count = 16
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
    dev = _device(cfg, cfg.gpus)
    if cfg.gpus > 1 and dev == "cpu":
        raise DataError("gpus", f"{cfg.gpus}: ultralytics trains on several devices on CUDA only; set gpus=1 on the CPU")
    return dict(
        data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch * cfg.gpus, nbs=cfg.nbs,
        warmup_epochs=cfg.warmup_epochs, workers=loader_workers(cfg.workers, cfg.gpus), device=dev,
        optimizer=cfg.optimizer, lr0=cfg.lr0 * lr_factor(cfg), cos_lr=cfg.cos_lr, mosaic=cfg.mosaic,
        close_mosaic=cfg.close_mosaic, fliplr=cfg.fliplr,
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


def _accumulate(nbs: int, batch: int) -> int:
    return max(round(nbs / batch), 1)  # ultralytics' own: batches accumulated up to the nominal batch


def lr_factor(cfg: Config) -> float:
    """``lr0``'s factor on ``gpus`` cards: the nominal batch ultralytics reaches (batch x GPUs x its
    accumulation) over the one-GPU nominal batch; 1.0 while accumulating less absorbs the GPUs."""
    total = cfg.batch * cfg.gpus
    return total * _accumulate(cfg.nbs, total) / (cfg.batch * _accumulate(cfg.nbs, cfg.batch))


def plan(cfg: Config) -> str:
    """The batch, accumulation and learning rate of a training job, on one line."""
    total = cfg.batch * cfg.gpus
    return (f"yolo: {cfg.gpus} x batch {cfg.batch} = {total} per step, ultralytics accumulates "
            f"{_accumulate(cfg.nbs, total)} (nbs {cfg.nbs}) = nominal batch {total * _accumulate(cfg.nbs, total)} "
            f"(profile: {cfg.batch} x {_accumulate(cfg.nbs, cfg.batch)} on one GPU); lr0 {cfg.lr0:g} x {lr_factor(cfg):g}; "
            f"{loader_workers(cfg.workers, cfg.gpus)} loader workers per GPU")


def _device(cfg: Config, gpus: int = 1) -> str:
    d = device(cfg.device)
    return ",".join(str(i) for i in range(gpus)) if d == "cuda" else d  # ultralytics spells GPUs by index


# ultralytics' list of cards whose fp16 gives NaN losses or zero mAP (ultralytics.utils.checks.check_amp)
_BROKEN_AMP = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
                         re.IGNORECASE)


def check_amp(model: torch.nn.Module) -> bool:
    """ultralytics' AMP check without its download: ultralytics fetches yolo26n.pt at every GPU start to
    compare fp32 and AMP boxes (and skips that offline, keeping AMP); this keeps its card list: AMP on,
    except on the cards whose fp16 it knows to be broken."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return False
    name = torch.cuda.get_device_name(dev)
    if _BROKEN_AMP.search(name):
        print(f"AMP off: fp16 training on {name} gives NaN losses or zero mAP (ultralytics' list)")
        return False
    return True


ultralytics.engine.trainer.check_amp = check_amp  # also in ultralytics' DDP workers, which import this module


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
    # bad train_args, a missing start checkpoint or a CPU with gpus > 1 stop here, before any work
    kwargs = None if last.exists() else train_kwargs(cfg, out / "dataset" / "data.yaml", out)
    prepare(cfg, data, folds, fold, out)
    print(plan(cfg), flush=True)
    # the checkpoint holds the network and every train argument
    model = YOLO(str(last)) if kwargs is None else YOLO(cfg.model, task="detect")
    model.add_callback("on_train_start", _config_saver(cfg, out))
    if kwargs is None:
        model.train(resume=True)
    else:
        model.train(trainer=PretrainedTrainer, **kwargs)
    best = out / "train" / "weights" / "best.pt"
    with atomic_path(final) as tmp:
        shutil.copyfile(best if best.exists() else last, tmp)
    return final


def _config_saver(cfg: Config, out: Path):
    """An ultralytics callback writing ``config.yaml`` once training really starts (data cached, model
    built; in the DDP workers, rank 0)."""

    def on_train_start(trainer) -> None:
        if RANK in {-1, 0}:
            save(cfg, out / "config.yaml")

    return on_train_start


def load_infer(cfg: Config, out: Path) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py)."""
    weights = trained_weights(out / "weights.pt", "yolo")
    model = YOLO(str(weights), task="detect")

    dev = _device(cfg)

    def infer(images: list[np.ndarray]) -> list[Detections]:
        bgr = [np.repeat(im[:, :, None], 3, axis=2) for im in images]
        results = model.predict(bgr, imgsz=cfg.imgsz, conf=cfg.conf, iou=cfg.iou, max_det=cfg.max_det,
                                device=dev, half=cfg.amp and dev != "cpu", verbose=False)
        return [(r.boxes.xyxyn.cpu().numpy(), r.boxes.conf.cpu().numpy(), r.boxes.cls.cpu().numpy()) for r in results]

    return infer


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    """Write ``oof.csv`` and ``test.csv`` for ``fold`` from its trained weights."""
    return write_fold_predictions(load_infer(cfg, out), data, folds, fold, out, cfg.tta, cfg.predict_batch,
                                  decode_workers(cfg.workers, device(cfg.device)))
