"""YOLOv8 (ultralytics) adapter: prepare / train / predict for one fold.

Contract (same as every model folder, see models/README.md):

* ``prepare``: fused labels (``labels:``, default ``cxr.fusion.DEFAULT``) and the fold file -> a YOLO dataset
  in ``<run>/yolo/fold<k>/dataset``: symlinks to the squashed PNGs, one txt per image
  (``class cx cy w h`` normalized: because the PNGs are squashed, dividing original pixels
  by the original width/height gives exactly the normalized position in the PNG), an empty
  txt for a normal image (background), and ``data.yaml``. Skipped when done.
* ``train``: ultralytics' own trainer on every fold but k, validating on fold k every ``validate_every``
  epochs and at the last one. Each validation runs ultralytics' validator (its losses and metrics) and the
  competition mAP@0.4 (:func:`models.common.validation_map`) of the EMA network it validates; that mAP is
  ultralytics' fitness, so its ``best.pt`` and ``patience`` follow it. Files in the fold folder:
  ``metrics.csv`` + ``tensorboard/`` (:class:`models.curves.Curves`, the columns every model writes),
  ``train/results.csv`` + ``train/args.yaml`` + ultralytics' own TensorBoard events in ``train/`` (its plots
  there too with ``plots: true``), ``config.yaml`` (ours), ``weights.pt`` = ultralytics' final ``last.pt``
  (the EMA weights of the last epoch, moved out of ``train/weights/``; marks a finished run) and ``best.pt`` = its ``best.pt`` (the best
  mAP@0.4 epoch). A killed run resumes from ``train/weights/last.pt``; a finished one is left alone.
* ``predict``: ``oof.csv`` for fold k's images and ``test.csv`` for the test set in the
  shared prediction format, original pixels, low score threshold, optional flip TTA, from
  ``weights.pt`` or, with ``checkpoint: best``, ``best.pt``.

The network is built from ultralytics' model yaml (``model:``) with 14 classes; nothing is
downloaded. ``weights:`` names a local ultralytics ``.pt`` (e.g. the COCO ``yolov8x.pt``, 80
classes): :class:`PretrainedTrainer` copies every tensor that fits through
:func:`models.weights.transfer` (one ``loaded N of M tensors`` line; the class branch of the
Detect head is re-initialised for 14 classes). ultralytics' own ``train(pretrained=False)`` would
throw the file away, and its ``load`` rebuilds the class branch at the file's width.

Multi-GPU: ``gpus: N`` hands ultralytics ``device=0,...,N-1`` (its own DDP, over the cards
``CUDA_VISIBLE_DEVICES`` shows) and ``batch`` x N, since ``batch`` is per GPU here and ultralytics
divides its ``batch`` by the device count. ultralytics keeps the nominal batch ``nbs`` by
accumulating less; what it cannot absorb scales ``lr`` (``models.common.scale_for_gpus``'s rule).
ultralytics' AMP check, which downloads yolo26n.pt at every GPU start, is replaced by
:func:`check_amp` (nothing downloads).

Fields with ultralytics names of their own: ``lr`` -> ``lr0``, ``brightness_contrast`` -> ``hsv_v``,
``score_thr`` -> ``conf``, ``nms_iou`` -> ``iou``. Every other ultralytics train key (``mixup``, ``lrf``,
``shear``, ...) goes in ``train_args`` and is passed through: checked against ultralytics' own
default-config keys and types, so a misspelt key is a clear error, not a silent no-op.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import ultralytics.engine.trainer
import yaml
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg
from ultralytics.data.augment import LetterBox
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOCAL_RANK, RANK
from ultralytics.utils.callbacks import tensorboard as ultralytics_tensorboard
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import scale_boxes
from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first, unwrap_model

from cxr.config import Count, Degrees, Fraction, ImageSize, NonNegative, NonNegativeFloat, Positive, Zoom, save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.fusion import DEFAULT, FusionConfig
from cxr.wbf import WBF
from cxr.io import DataError, atomic_path
from models.common import (DETECTOR_PREDICT_ONLY, TTA_FUSION, Detections, Infer, amp_autocast, decode_workers, device,
                           loader_workers, fold_infers, snapshot_epochs, snapshot_path, trained_weights,
                           validation_map, write_fold_predictions)
from models.curves import Curves
from models.weights import resolve, transfer

OUTPUT = "detections"  # what merge does with the folds' tables (see models/__main__.py)
# the keys that only change prediction: `python -m models yolo predict` may set them apart from the fold's config.yaml
PREDICT_ONLY = DETECTOR_PREDICT_ONLY | {"nms_iou", "predict_batch"}
MAP_KEY = "metrics/mAP40(competition)"  # our mAP@0.4 in ultralytics' results.csv, its TensorBoard and checkpoints


@dataclass
class Config:
    """A profile (models/yolo/demo.yaml, full.yaml). Most fields are ultralytics train/predict args (four
    under other names, see the module doc); validate_every, checkpoint, tta, tta_fusion, snapshots,
    checkpoint_views, share_weights and predict_batch are ours."""

    PASSTHROUGH: ClassVar[str] = "other ultralytics train keys go in train_args, e.g. --set 'train_args={mixup: 0.1}'"

    model: str = "yolov8n.yaml"  # architecture yaml shipped in ultralytics (n/s/m/l/x)
    weights: str | None = None  # local ultralytics .pt to start from (e.g. weights/yolov8x.pt); None: from scratch
    labels: FusionConfig = field(default_factory=lambda: DEFAULT)
    imgsz: ImageSize = 256
    epochs: Count = 10
    batch: Count = 16
    nbs: Count = 64  # nominal batch: ultralytics accumulates gradients up to it (set = batch on small data)
    warmup_epochs: NonNegativeFloat = 3.0  # ultralytics: at most epochs - 1
    workers: NonNegative = 2
    optimizer: Literal["SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop",
                       "auto"] = "SGD"  # ultralytics' optimizer
    lr: Positive = 0.01  # ultralytics' lr0, for the nominal batch nbs (see scale_for_gpus)
    cos_lr: bool = False  # cosine learning-rate decay to lr x lrf (ultralytics' lrf: 0.01); false: linear
    validate_every: Count = 1
    checkpoint: Literal["last", "best"] = "last"
    patience: NonNegative = 100  # stop after this many epochs without a better validation mAP@0.4; 0: never
    mosaic: Fraction = 1.0  # probability of a 4-image mosaic
    close_mosaic: NonNegative = 0  # the last N epochs train without mosaic
    fliplr: Fraction = 0.5
    translate: Fraction = 0.1
    scale: Zoom = 0.3
    degrees: Degrees = 0.0
    brightness_contrast: Fraction = 0.4  # ultralytics' hsv_v
    amp: bool = True
    seed: NonNegative = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpus: Count = 1  # ultralytics' DDP over the first N visible cards
    score_thr: Fraction = 0.001  # ultralytics' conf
    nms_iou: Fraction = 0.6  # IoU above which NMS drops the lower-scored box of a class (ultralytics' iou)
    max_det: Count = 300
    tta: bool | tuple[str | float, ...] = False
    tta_fusion: WBF = field(default_factory=lambda: TTA_FUSION)
    share_weights: str | None = None
    snapshots: NonNegative = 0
    checkpoint_views: bool = False
    predict_batch: Count = 16  # images per forward pass at prediction and validation
    plots: bool = False  # ultralytics' plots in train/: training batches, labels, results.png, PR curves
    train_args: dict[str, Any] = field(default_factory=dict)  # any other ultralytics train key: {mixup: 0.1, shear: 2.0}


# ultralytics keys the adapter sets itself: where the data and the run live, how the start is made; `val`:
# validate_every decides (PretrainedTrainer.validate)
_OWNED = {"task", "mode", "model", "data", "project", "name", "exist_ok", "pretrained", "resume", "verbose", "val"}
# our fields that ultralytics spells otherwise
_ULTRALYTICS_NAME = {"lr": "lr0", "brightness_contrast": "hsv_v", "score_thr": "conf", "nms_iou": "iou"}


def train_kwargs(cfg: Config, data_yaml: Path, out: Path) -> dict[str, Any]:
    """The ``YOLO.train`` arguments of ``cfg``: its fields, then ``train_args`` checked against
    ultralytics' own default config (unknown keys, keys set elsewhere and wrong types are errors)."""
    by_field = {_ULTRALYTICS_NAME.get(f.name, f.name): f.name for f in fields(Config)}
    by_field = {k: v for k, v in by_field.items() if k in DEFAULT_CFG_DICT}
    unknown = sorted(set(cfg.train_args) - set(DEFAULT_CFG_DICT))
    if unknown:
        raise DataError("train_args", f"unknown ultralytics train key(s) {unknown}; known: see ultralytics/cfg/default.yaml")
    taken = sorted(set(cfg.train_args) & (set(by_field) | _OWNED))
    if taken:
        named = ", ".join(f"{k}: field {by_field[k]}" for k in taken if k in by_field and by_field[k] != k)
        raise DataError("train_args", f"{taken} are set by their own field or by the adapter, not in train_args"
                                      + (f" ({named})" if named else ""))
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
        optimizer=cfg.optimizer, lr0=cfg.lr * lr_factor(cfg), cos_lr=cfg.cos_lr, mosaic=cfg.mosaic,
        close_mosaic=cfg.close_mosaic, fliplr=cfg.fliplr, translate=cfg.translate, scale=cfg.scale,
        degrees=cfg.degrees, hsv_v=cfg.brightness_contrast, amp=cfg.amp, patience=cfg.patience, seed=cfg.seed,
        conf=cfg.score_thr, iou=cfg.nms_iou, max_det=cfg.max_det, plots=cfg.plots, **extra,
        project=str(out.resolve()), name="train", exist_ok=True, verbose=False,
        # a path: the trainer's get_model receives the file's network and transfers it (PretrainedTrainer)
        pretrained=str(resolve(cfg.weights)) if cfg.weights else False,
    )


def network_infer(net: torch.nn.Module, cfg: Config, dev: torch.device | str, amp: bool) -> Infer:
    """``infer`` over an ultralytics network in memory (the EMA being validated), the steps of ultralytics'
    predictor: letterbox to ``imgsz``, forward (``amp``: mixed precision on GPU), NMS at ``score_thr`` /
    ``nms_iou`` / ``max_det``, boxes back to the given image, normalized. Leaves the network as it is (no
    fusing; ultralytics' EMA network is always in eval mode)."""
    stride = int(max(getattr(net, "stride", torch.tensor([32.0]))))

    def infer(images: list[np.ndarray]) -> list[Detections]:
        letterbox = LetterBox((cfg.imgsz, cfg.imgsz), auto=len({im.shape for im in images}) == 1, stride=stride)
        x = np.stack([letterbox(image=np.repeat(im[:, :, None], 3, axis=2)) for im in images])
        x = torch.from_numpy(x).to(dev).permute(0, 3, 1, 2).float().div_(255)
        with torch.inference_mode(), amp_autocast(str(dev), amp):
            preds = net(x)
        out = []
        for p, im in zip(non_max_suppression(preds, cfg.score_thr, cfg.nms_iou, max_det=cfg.max_det), images):
            h, w = im.shape[:2]
            boxes = scale_boxes(x.shape[2:], p[:, :4].float(), (h, w)) / torch.tensor([w, h, w, h], device=p.device)
            out.append((boxes.cpu().numpy(), p[:, 4].float().cpu().numpy(), p[:, 5].cpu().numpy()))
        return out

    return infer


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


class PretrainedTrainer(DetectionTrainer):
    """ultralytics' detection trainer with our start, validation schedule and checkpoint rule:

    * a start checkpoint (``pretrained=PATH``) is copied in by :func:`models.weights.transfer`: what fits by
      name and shape loads, the rest (the 80-class branch of the head) keeps its fresh init, and one line
      says which;
    * it validates every ``cfg.validate_every`` epochs and at the last one; an epoch that does not validate
      leaves its validation cells empty (``nan`` in results.csv) and no fitness, so ultralytics keeps its
      best.pt and its patience counter from the last validation;
    * its fitness is the competition mAP@0.4 of the EMA network it validates (:func:`validation_map` on the
      validation fold), so best.pt and ``patience`` follow it.

    Train with :func:`fold_trainer` (this class bound to a fold's config, data and validation images)."""

    cfg: ClassVar[Config | None] = None
    data_root: ClassVar[str] = ""
    val_ids: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # ultralytics adds its Ray Tune callback whenever ray is installed (SETTINGS raytune); outside a Tune
        # session it only asks Ray for a trial id, and Ray answers with a `get_trial_id` UserWarning every epoch
        self.callbacks["on_fit_epoch_end"] = [c for c in self.callbacks["on_fit_epoch_end"]
                                              if getattr(c, "__module__", "") != "ultralytics.utils.callbacks.raytune"]
        # where the user's ultralytics settings turn TensorBoard on too, its originals of the two we wrap run once
        for event, callbacks in self.callbacks.items():
            wrapped = {getattr(c, "wraps", None) for c in callbacks}
            self.callbacks[event] = [c for c in callbacks if c not in wrapped]
        self.improved = False  # the last validation's mAP@0.4 beat the best so far
        self.val_map = float("nan")  # the last validation's mAP@0.4
        self._fold_data: DataFolder | None = None

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        if self.resume:  # ultralytics' own load of its last.pt (every tensor fits)
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        if weights is not None:
            source = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
            n_backbone = len(model.yaml["backbone"])  # layers model.0 .. model.{n-1}

            def is_backbone(name: str) -> bool:
                return name.startswith("model.") and int(name.split(".")[1]) < n_backbone

            transfer(model, source.float().state_dict(), self.args.pretrained, is_backbone,
                     log=print if RANK in {-1, 0} else lambda _: None)
        return model

    def validates(self) -> bool:
        """Whether this epoch validates: every ``validate_every`` epochs, the last one, and a run that stops
        now (ultralytics' time limit). The same answer on every DDP rank (they all validate together)."""
        n = self.epoch + 1
        every = self.cfg.validate_every if self.cfg is not None else 1
        return n % every == 0 or n >= self.epochs or bool(self.stop)

    def validate(self):
        if not self.validates():
            if RANK not in {-1, 0}:
                return None, None
            return {**{k: float("nan") for k in self.metrics}, MAP_KEY: float("nan")}, None
        # ultralytics' validator turns its own plots off at the first validation that is not the last epoch
        # (plots &= last or a possible stop) and only ultralytics' final_eval, not run here, turned them back
        # on: from the profile's setting each time, the last epoch draws the PR curves and confusion matrix
        self.validator.args.plots = self.args.plots
        metrics = self.validator(self)  # every rank: ultralytics validates across DDP ranks
        ema = self.ema.ema if self.ema else unwrap_model(self.model)
        score = self.validation_map(ema)  # every rank, each its share of the images
        if metrics is None:  # DDP ranks > 0
            return None, None
        metrics.pop("fitness", None)
        fitness = score if math.isfinite(score) else 0.0
        metrics[MAP_KEY] = round(score, 5)
        self.val_map = score  # unrounded, for the curves
        # strictly better only: on a tie the earlier epoch stays best (ultralytics would rewrite best.pt)
        self.improved = self.best_fitness is None or self.best_fitness < fitness
        if self.improved:
            self.best_fitness = fitness
        return metrics, fitness

    def validation_map(self, net: torch.nn.Module) -> float:
        """Competition mAP@0.4 of ``net`` on the fold's validation images, predicted as ``predict`` does (no TTA)."""
        if self.cfg is None:
            raise RuntimeError("PretrainedTrainer needs its fold: train with fold_trainer(cfg, data, val_ids)")
        if self._fold_data is None:
            self._fold_data = DataFolder(self.data_root)
        workers = decode_workers(self.cfg.workers, self.device.type)
        infer = network_infer(net, self.cfg, self.device, amp=bool(self.amp))  # self.amp: after check_amp
        return validation_map(infer, self._fold_data, list(self.val_ids),
                              batch_size=self.cfg.predict_batch, workers=workers)

    def save_model(self):
        fitness = self.fitness
        # best.pt only for an epoch that validated and improved: ultralytics writes it when best_fitness ==
        # fitness, which holds for None == None (no validation yet) and for a tie
        if fitness is None or not self.improved:
            self.fitness = float("nan")
        try:
            return super().save_model()
        finally:
            self.fitness = fitness

    def final_eval(self):
        """ultralytics' end of training without its second validation of best.pt: the optimizer state is
        stripped from last.pt and best.pt as ultralytics does, but best.pt is not validated again (nor
        logged as an extra epoch). Its mAP@0.4 is already in metrics.csv (the epoch that made it best),
        predict scores the weights that predict (weights.pt by default, not best.pt), and that pass over
        the whole validation fold cost as much as an epoch's validation (8 s of the full-profile test's 80
        on a CPU). With ``plots: true`` the last epoch's validation draws the PR curves (:meth:`validate`)."""
        with torch_distributed_zero_first(LOCAL_RANK):  # rank 0 writes, the others wait
            if RANK in {-1, 0}:
                last = strip_optimizer(self.last) if self.last.exists() else {}
                if self.best.exists():
                    strip_optimizer(self.best, updates={"train_results": last.get("train_results")})


def fold_trainer(cfg: Config, data: DataFolder, val_ids: list[str]) -> type[PretrainedTrainer]:
    """:class:`PretrainedTrainer` bound to ``cfg`` and the fold's validation images (ultralytics builds the
    trainer from its class; in DDP its workers get this class pickled by value, cloudpickle)."""
    return type("FoldTrainer", (PretrainedTrainer,),
                {"cfg": cfg, "data_root": str(Path(data.root).resolve()), "val_ids": tuple(val_ids),
                 "__module__": __name__})


def _accumulate(nbs: int, batch: int) -> int:
    return max(round(nbs / batch), 1)  # ultralytics' own: batches accumulated up to the nominal batch


def lr_factor(cfg: Config) -> float:
    """``lr``'s factor on ``gpus`` cards: the nominal batch ultralytics reaches (batch x GPUs x its
    accumulation) over the one-GPU nominal batch; 1.0 while accumulating less absorbs the GPUs."""
    total = cfg.batch * cfg.gpus
    return total * _accumulate(cfg.nbs, total) / (cfg.batch * _accumulate(cfg.nbs, cfg.batch))


def plan(cfg: Config) -> str:
    """The batch, accumulation and learning rate of a training job, on one line."""
    total = cfg.batch * cfg.gpus
    return (f"yolo: {cfg.gpus} x batch {cfg.batch} = {total} per step, ultralytics accumulates "
            f"{_accumulate(cfg.nbs, total)} (nbs {cfg.nbs}) = nominal batch {total * _accumulate(cfg.nbs, total)} "
            f"(profile: {cfg.batch} x {_accumulate(cfg.nbs, cfg.batch)} on one GPU); lr {cfg.lr:g} x {lr_factor(cfg):g}; "
            f"{loader_workers(cfg.workers, cfg.gpus)} loader workers per GPU; validates every {cfg.validate_every} "
            f"epoch(s) and at the last on mAP@0.4")


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
    sizes = data.train_sizes.set_index("image_id")
    for part, ids in zip(("train", "val"), split(folds, fold)):
        # training labels follow the run's reader fusion and selection (an image it drops is not trained on,
        # never a normal one); validation always scores every held-out image against the default fusion
        fused = data.fused(cfg.labels if part == "train" else DEFAULT)
        if part == "train":
            kept = set(fused["image_id"])
            ids = [i for i in ids if i in kept]
        fused = fused[fused["class_id"] != NO_FINDING]
        by_image = dict(tuple(fused.groupby("image_id")))
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
    """Train fold ``fold`` with ultralytics' trainer (resuming a killed run); returns the final weights
    (``weights.pt``; ``best.pt`` beside it)."""
    final = out / "weights.pt"
    if final.exists():
        return final
    weights = out / "train" / "weights"
    last = weights / "last.pt"
    # bad train_args, a missing start checkpoint or a CPU with gpus > 1 stop here, before any work
    kwargs = None if last.exists() else train_kwargs(cfg, out / "dataset" / "data.yaml", out)
    prepare(cfg, data, folds, fold, out)
    print(plan(cfg), flush=True)
    # the checkpoint holds the network and every train argument
    model = YOLO(str(last)) if kwargs is None else YOLO(cfg.model, task="detect")
    for event, callback in _callbacks(cfg, out):
        model.add_callback(event, callback)
    trainer = fold_trainer(cfg, data, split(folds, fold)[1])
    if kwargs is not None:
        model.train(trainer=trainer, **kwargs)
    elif model.ckpt.get("optimizer") is not None:  # else ultralytics' final strip ran: only the copies below were left
        model.train(trainer=trainer, resume=True)
    # moved, not copied: one file each (a killed move is finished by the next call: last.pt is still there)
    best = weights / "best.pt"
    if best.exists():
        os.replace(best, out / "best.pt")
    os.replace(last, final)  # last: it marks a finished run
    return final


def _callbacks(cfg: Config, out: Path) -> list[tuple[str, Any]]:
    """Our ultralytics callbacks (rank 0 acts; in DDP they reach the workers pickled): ``config.yaml`` once
    training really starts (data cached, model built); the fold's :class:`Curves` (metrics.csv and
    TensorBoard), one row per epoch; ultralytics' own TensorBoard writer (events in ``train/``), added here
    so that it runs whatever the user's ultralytics settings say (they are never written), and without
    writing nan points for epochs that do not validate (ultralytics' TensorBoard callbacks are empty under pytest)."""
    state: dict[str, Curves] = {}

    def on_train_start(trainer) -> None:
        if RANK in {-1, 0}:
            save(cfg, out / "config.yaml")
            state["curves"] = Curves(out, _done_rows(out, trainer.start_epoch))

    def on_fit_epoch_end(trainer) -> None:
        if RANK in {-1, 0} and "curves" in state:
            state["curves"].add(epoch_row(trainer))
        epoch = trainer.epoch + 1  # ultralytics saved this epoch's last.pt just before this callback
        if RANK in {-1, 0} and epoch in snapshot_epochs(cfg.epochs, cfg.snapshots) and Path(trainer.last).is_file():
            with atomic_path(snapshot_path(out, epoch)) as tmp:
                shutil.copyfile(trainer.last, tmp)

    def teardown(trainer) -> None:
        if "curves" in state:
            state.pop("curves").close()

    def tensorboard_fit_epoch_end(trainer) -> None:
        metrics = trainer.metrics
        trainer.metrics = {k: v for k, v in (metrics or {}).items() if not _nan(v)}
        try:
            ultralytics_tensorboard.on_fit_epoch_end(trainer)
        finally:
            trainer.metrics = metrics

    def tensorboard_train_start(trainer) -> None:
        with warnings.catch_warnings():  # its graph is a torch.jit.trace, which torch deprecates in 3 warnings
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
            warnings.filterwarnings("ignore", message="The input to trace is already a ScriptModule")
            ultralytics_tensorboard.on_train_start(trainer)

    tensorboard_fit_epoch_end.wraps = ultralytics_tensorboard.on_fit_epoch_end
    tensorboard_train_start.wraps = ultralytics_tensorboard.on_train_start
    ours = {"on_fit_epoch_end": tensorboard_fit_epoch_end, "on_train_start": tensorboard_train_start}
    board = [(k, ours.get(k, v)) for k, v in ultralytics_tensorboard.callbacks.items()]  # empty under pytest
    return [("on_train_start", on_train_start), ("on_fit_epoch_end", on_fit_epoch_end), ("teardown", teardown), *board]


def epoch_row(trainer) -> dict[str, Any]:
    """The shared metrics row (models.curves) of the epoch ultralytics just finished."""
    metrics = trainer.metrics or {}
    validated = not _nan(metrics.get(MAP_KEY, float("nan")))
    val_loss = sum(float(v) for k, v in metrics.items() if k.startswith("val/") and "loss" in k)
    weight_lr = [g["lr"] for g in trainer.optimizer.param_groups if g.get("param_group") == "weight"]
    return {
        "epoch": trainer.epoch + 1,
        "train_loss": sum(float(v) for v in trainer.tloss.values()) if trainer.tloss else None,
        "val_loss": val_loss if validated else None,
        "val_map": float(getattr(trainer, "val_map", metrics[MAP_KEY])) if validated else None,
        "lr": float((weight_lr or [trainer.optimizer.param_groups[0]["lr"]])[0]),
        "seconds": float(trainer.epoch_time or 0.0),
    }


def _done_rows(out: Path, start_epoch: int) -> list[dict[str, Any]]:
    """The metrics rows of the epochs a resumed run already did (none for a fresh run): from metrics.csv,
    or rebuilt from ultralytics' results.csv for an epoch whose row did not reach it (a run killed between
    writing last.pt and the end of the epoch; results.csv is written before last.pt)."""
    if start_epoch == 0:
        return []
    rows: dict[int, dict[str, Any]] = {}
    if (out / "train" / "results.csv").exists():
        results = pd.read_csv(out / "train" / "results.csv")
        results = results[results["epoch"] <= start_epoch].drop_duplicates("epoch", keep="last")
        seconds = results["time"].diff().fillna(results["time"])
        for row, sec in zip(results.to_dict("records"), seconds):
            val_loss = sum(v for k, v in row.items() if k.startswith("val/") and "loss" in k)
            rows[int(row["epoch"])] = {
                "epoch": int(row["epoch"]), "train_loss": sum(v for k, v in row.items() if k.startswith("train/")),
                "val_loss": val_loss, "val_map": row.get(MAP_KEY), "lr": row.get("lr/pg0"), "seconds": sec}
    if (out / "metrics.csv").exists():
        done = pd.read_csv(out / "metrics.csv")
        rows.update({int(r["epoch"]): r for r in done[done["epoch"] <= start_epoch].to_dict("records")})
    return [{k: (None if pd.isna(v) else v) for k, v in rows[e].items()} for e in sorted(rows)]


def load_infer(cfg: Config, out: Path, snapshot: Path | None = None) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py): ``weights.pt`` (the final
    weights), or ``best.pt`` with ``checkpoint: best``, or the file ``snapshot``."""
    weights = trained_weights(out / "weights.pt", "yolo")
    if cfg.checkpoint == "best":
        weights = trained_weights(out / "best.pt", "yolo")
    weights = snapshot or weights
    model = YOLO(str(weights), task="detect")

    dev = _device(cfg)

    def infer(images: list[np.ndarray], size: int | None = None) -> list[Detections]:
        bgr = [np.repeat(im[:, :, None], 3, axis=2) for im in images]
        results = model.predict(bgr, imgsz=size or cfg.imgsz, conf=cfg.score_thr, iou=cfg.nms_iou, max_det=cfg.max_det,
                                # fp16 on GPU when amp; `quantize` is the 8.4 name of the deprecated `half` flag
                                device=dev, quantize=16 if cfg.amp and dev != "cpu" else None, verbose=False)
        return [(r.boxes.xyxyn.cpu().numpy(), r.boxes.conf.cpu().numpy(), r.boxes.cls.cpu().numpy()) for r in results]

    return infer


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    """Write ``oof.csv`` and ``test.csv`` for ``fold`` from its trained weights."""
    return write_fold_predictions(fold_infers(load_infer, cfg, out), data, folds, fold, out, cfg, cfg.predict_batch,
                                  decode_workers(cfg.workers, device(cfg.device)))
