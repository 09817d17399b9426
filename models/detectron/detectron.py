"""Faster R-CNN (detectron2) adapter: prepare / train / predict for one fold.

Contract: see models/README.md. detectron2 specifics, top to bottom:

* :func:`records`: one dict per image with the PNG path, the ORIGINAL size (from the meta
  table; no PNG is decoded) and the fused boxes (``labels:``, default ``cxr.fusion.DEFAULT``)
  in original pixels. Images without a finding stay in training, so normal images teach the
  background. The records are handed to the trainer as a list: nothing is registered in
  detectron2's global catalogs.
* :class:`Mapper`: record -> model input at ``imgsz``: the squashed PNG is resized, boxes go
  from original pixels to network pixels with ``cxr.boxes.to_resized``; in training,
  albumentations flip (``fliplr``), an affine translate/scale/rotate (p=0.5) and brightness/contrast (p=0.5).
* :func:`build_cfg`: the zoo architecture (``zoo_config``, ``depth``) with the profile's
  normalization, frozen stages and pixel statistics, and the schedule in iterations
  (:func:`iterations_per_epoch`); ``opts`` (raw detectron2 ``KEY VALUE`` pairs) are merged last. Two starts:
  from scratch (demo): GroupNorm everywhere, nothing frozen, gray-image statistics;
  from a checkpoint (full): the statistics the file was trained with (model zoo and the MSRA
  ImageNet ``R-50.pkl``/``R-101.pkl``: FrozenBN, BGR 0-255, means 103.53/116.28/123.675, std 1,
  ``freeze_at: 2``, no norm in FPN and box head).
* :func:`load_weights`: a model-zoo ``.pkl``/``.pth`` or an ImageNet ``.pkl`` (Caffe2 names,
  renamed by detectron2's own ``c2_model_loading``) -> :func:`models.weights.transfer`; the
  81-way (80 + background) COCO class and box layers are re-initialised for 14 classes.
* :class:`Trainer`: detectron2's ``DefaultTrainer`` with our records and mapper, and these
  hooks: timer, LR schedule, :class:`ValidationHook` (at every epoch's end: the epoch's row of
  ``metrics.csv`` through :class:`models.curves.Curves`; every ``validate_every`` epochs and at the
  end the validation loss and the competition mAP@0.4, and ``best.pth`` when it improved), a
  checkpoint at every epoch's end of which only the latest is kept (a 10-epoch R101 run would
  otherwise keep 10 of ~0.5 GB), and the writers (console, ``train/metrics.json``, TensorBoard
  events in ``train/``). ``resume_or_load(resume=True)`` continues a killed run, its curves and best score.
* :func:`train`: trains (``gpus: N``: one process per GPU through detectron2's ``launch`` on a free
  local port), writing ``config.yaml`` (ours), ``detectron2.yaml`` (detectron2's resolved config)
  and ``model.txt`` (the network, kept off the console) once training starts, then ``weights.pth``
  (the final model; it marks a finished run); detectron2's own checkpoints are then deleted.
  ``load_infer`` loads ``weights.pth``, or ``best.pth`` with ``checkpoint: best``.

Epochs: detectron2 counts iterations over an endless sampler; an epoch here is
``ceil(training images / (batch x gpus))`` iterations, so ``epochs``, ``warmup_epochs`` and
``validate_every`` become iteration counts at train time (the plan line prints them). Multi-GPU:
``batch`` is per GPU; detectron2 has no gradient accumulation, so N GPUs follow its own
``auto_scale_workers`` rule: N x the images per iteration, N x the learning rate (the linear
scaling rule, ``models.common.scale_for_gpus``), 1/N of the iterations per epoch: the same epochs.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import albumentations as A
import numpy as np
import pandas as pd
import torch

with warnings.catch_warnings():
    # detectron2.model_zoo imports pkg_resources (setuptools: "pkg_resources is deprecated as an API"), and
    # detectron2's modules run torch.jit.script at import ("`torch.jit.script` is deprecated"): its code,
    # not ours, and nothing to act on here
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler
    from detectron2.engine import DefaultTrainer, HookBase, hooks, launch
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from cxr.boxes import to_original, to_resized
from cxr.config import Count, Degrees, Fraction, ImageSize, NonNegative, NonNegativeFloat, Positive, Range, Zoom, save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, FINDING_CLASSES, NO_FINDING
from cxr.fusion import DEFAULT, FusionConfig
from cxr.images import read_image
from cxr.wbf import WBF
from cxr.io import DataError, atomic_path
from models.common import (DETECTOR_PREDICT_ONLY, TTA_FUSION, Detections, Infer, all_gather, amp_autocast,
                           decode_workers, device, loader_workers, fold_infers, scale_for_gpus, snapshot_epochs,
                           snapshot_path, trained_weights, validation_map, write_fold_predictions)
from models.curves import Curves
from models.weights import resolve, transfer

# detectron2's RoI pooler asks torch.fx whether it is being traced; torch logs (once per process, on the
# console) that `is_fx_tracing` also covers torch.export: a note for detectron2's authors, not for a run
logging.getLogger("torch.fx._symbolic_trace").addFilter(
    lambda record: not record.getMessage().startswith("is_fx_tracing will return true"))

OUTPUT = "detections"
PREDICT_ONLY = DETECTOR_PREDICT_ONLY  # keys that only change prediction


@dataclass
class Config:
    PASSTHROUGH: ClassVar[str] = ("other detectron2 config keys go in opts as KEY VALUE strings, e.g. "
                                  "--set 'opts=[MODEL.RPN.NMS_THRESH, \"0.6\"]'")

    zoo_config: str = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"  # detectron2 zoo config: architecture only
    depth: Literal[18, 34, 50, 101, 152] = 50  # ResNet depth
    # How the network is normalised and fed must match its start: GN + nothing frozen + gray statistics
    # trains from scratch; a zoo/ImageNet file wants FrozenBN, freeze_at 2, no FPN/head norm, BGR 0-255 means.
    norm: Literal["GN", "FrozenBN", "SyncBN", "BN"] = "GN"  # ResNet's normalization
    head_norm: Literal["", "GN", "SyncBN", "BN"] = "GN"  # FPN and box head normalization ('' = none, as in the zoo)
    freeze_at: Annotated[int, Range(0, 5)] = 0  # ResNet stages frozen: 0 trains everything; 2: stem and res2 (the zoo's)
    pixel_format: Literal["BGR", "RGB"] = "BGR"  # channel order of pixel_mean/std (gray images: 3 equal channels)
    pixel_mean: list[Annotated[float, Range(0, 255)]] = field(
        default_factory=lambda: [128.0, 128.0, 128.0])  # per-channel input mean (0-255), subtracted
    pixel_std: list[Positive] = field(default_factory=lambda: [64.0, 64.0, 64.0])  # per-channel input std (0-255)
    weights: str | None = None  # None (from scratch) or a local zoo .pkl/.pth or ImageNet R-50.pkl/R-101.pkl
    labels: FusionConfig = field(default_factory=lambda: DEFAULT)
    imgsz: ImageSize = 1024
    batch: Count = 8  # images per iteration and GPU (detectron2 has no gradient accumulation)
    epochs: Count = 10
    lr: Positive = 0.01  # for `batch` images per iteration (one GPU); N GPUs: N x
    warmup_epochs: NonNegativeFloat = 0.3
    lr_steps: list[Annotated[float, Range(0, 1, open_low=True, open_high=True)]] = field(
        default_factory=lambda: [0.7, 0.9])  # LR x 0.1 at these fractions of the run's iterations
    validate_every: Count = 1
    checkpoint: Literal["last", "best"] = "last"
    checkpoint_minutes: NonNegativeFloat = 30.0  # also checkpoint within an epoch every N minutes of training (0: off)
    anchor_sizes: list[Count] = field(
        default_factory=lambda: [32, 64, 128, 256, 512])  # anchor side (network px) per FPN level P2..P6
    fpn_channels: Count = 256  # FPN output channels
    box_head_dim: Count = 1024  # width of the box head's two fully connected layers
    rpn_pre_nms_topk_train: Count = 2000  # RPN proposals per level before NMS, training
    rpn_post_nms_topk_train: Count = 2000  # RPN proposals per image after NMS, training
    rpn_post_nms_topk_test: Count = 1000  # RPN proposals per image after NMS, prediction
    roi_batch_per_image: Count = 512  # RoIs sampled per image to train the box head
    # training augmentation (albumentations): horizontal flip (fliplr), then an affine translate-scale-rotate
    # with p=0.5, then brightness/contrast +-brightness_contrast with p=0.5
    fliplr: Fraction = 0.5
    translate: Fraction = 0.05
    scale: Zoom = 0.1
    degrees: Degrees = 5.0
    brightness_contrast: Fraction = 0.15
    score_thr: Fraction = 0.001  # low: the metric does not punish extra boxes
    max_det: Count = 100
    amp: bool = True
    gpus: Count = 1
    workers: NonNegative = 2
    seed: NonNegative = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    tta: bool | tuple[str | float, ...] = False
    tta_fusion: WBF = field(default_factory=lambda: TTA_FUSION)
    share_weights: str | None = None
    snapshots: NonNegative = 0
    checkpoint_views: bool = False
    opts: list[str] = field(
        default_factory=list)  # other detectron2 keys: KEY VALUE strings for CfgNode.merge_from_list, applied last


def records(data: DataFolder, ids: list[str], fusion: FusionConfig = DEFAULT) -> list[dict]:
    """Dataset dicts for ``ids``: PNG path, original ``width``/``height`` (meta table), and the
    fused finding boxes (``boxes`` (N, 4) original pixels, ``classes`` (N,)); the mapper scales. An id the
    fusion's reader selection (or dropped readers) left out has no record: it is not a normal image."""
    fused = data.fused(fusion)
    kept = set(fused["image_id"])
    ids = [i for i in ids if i in kept]
    by_image = {k: g for k, g in fused[fused["class_id"] != NO_FINDING].groupby("image_id")}
    wh = data.train_sizes.set_index("image_id")[["width", "height"]]
    out = []
    for n, image_id in enumerate(ids):
        g = by_image.get(image_id)
        w, h = wh.loc[image_id]
        out.append({
            "file_name": str(data.image("train", image_id)), "image_id": n, "name": image_id,
            "width": int(w), "height": int(h),
            "boxes": np.zeros((0, 4)) if g is None else g[BOX_COLUMNS].to_numpy(dtype=float),
            "classes": np.zeros(0, dtype=int) if g is None else g["class_id"].to_numpy(dtype=int),
        })
    return out


class Mapper:
    """Record (see :func:`records`) -> detectron2 model input at ``cfg.imgsz``: ``image`` (3, S, S)
    uint8 (the gray image in every channel), ``instances`` (boxes in network pixels), ``height`` and
    ``width`` = S. Augmented when ``train``."""

    def __init__(self, cfg: Config, train: bool):
        self.size = cfg.imgsz
        self._seeded_in = -1  # the process whose numpy seed the augmentation was seeded from
        self.resize = A.Resize(cfg.imgsz, cfg.imgsz)
        self.augment = A.Compose([
            A.HorizontalFlip(p=cfg.fliplr),
            A.Affine(translate_percent=(-cfg.translate, cfg.translate), scale=(1 - cfg.scale, 1 + cfg.scale),
                     rotate=(-cfg.degrees, cfg.degrees), p=0.5),
            A.RandomBrightnessContrast(cfg.brightness_contrast, cfg.brightness_contrast, p=0.5),
        ], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3)) if train else None

    def __call__(self, record: dict) -> dict:
        s = self.size
        image = self.resize(image=read_image(record["file_name"]))["image"]
        boxes = to_resized(record["boxes"], (record["width"], record["height"]), (s, s)).clip(0, s)
        ok = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)
        out = {"image": np.repeat(image[:, :, None], 3, axis=2), "bboxes": boxes[ok], "labels": record["classes"][ok]}
        if self.augment is not None:
            if self._seeded_in != os.getpid():
                # albumentations ignores global seeds: draw its seed from numpy's, which detectron2
                # seeds in each loader worker from the run's SEED, so runs see the same augmentations
                self.augment.set_random_seed(int(np.random.randint(2**31)))
                self._seeded_in = os.getpid()
            out = self.augment(**out)
        instances = Instances((s, s))
        instances.gt_boxes = Boxes(torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)))
        instances.gt_classes = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64))
        image = torch.as_tensor(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return {"file_name": record["file_name"], "image_id": record["image_id"], "image": image,
                "instances": instances, "height": s, "width": s}


def iterations_per_epoch(train_images: int, batch: int, gpus: int = 1) -> int:
    """Iterations of one epoch: every training image once, ``batch x gpus`` images per iteration."""
    return max(1, math.ceil(train_images / (batch * gpus)))


def build_cfg(cfg: Config, out: Path, gpus: int = 1, train_images: int = 0) -> CfgNode:
    """The detectron2 config: zoo architecture, the profile's normalization, input statistics, sizes and the
    solver in iterations for ``train_images`` images (0: a model built to predict; its solver is never read);
    for ``gpus`` processes the solver follows detectron2's ``auto_scale_workers`` (module docstring).
    ``cfg.opts`` are merged last; a key detectron2 does not have, or one set here from a field, is a
    :class:`DataError`."""
    # Every model here is built from this config, so here is where its forward passes are prepared for:
    # detectron2's anchor generator calls torch.meshgrid without `indexing=` (it relies on the 'ij' default,
    # which is what it wants), and torch warns "torch.meshgrid: in an upcoming release, it will be required
    # to pass the indexing argument" at the first forward pass. Its call, not ours: silenced by its message
    # (idempotent: an equal filter replaces the earlier one).
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    _, lr_factor = scale_for_gpus(1, gpus)  # no accumulation to absorb more GPUs: linear scaling
    per_epoch = iterations_per_epoch(train_images, cfg.batch, gpus)
    max_iter = cfg.epochs * per_epoch

    d2 = get_cfg()
    d2.merge_from_file(model_zoo.get_config_file(cfg.zoo_config))
    owner: dict[str, str] = {}  # detectron2 key -> the field (or the reason) it is set from here

    def put(key: str, value: Any, source: str) -> None:
        *parents, leaf = key.split(".")
        node = d2
        for name in parents:
            node = node[name]
        node[leaf] = value
        owner[key] = source

    # a start checkpoint goes through load_weights (and transfer), never detectron2's loader
    put("MODEL.WEIGHTS", "", "weights")
    put("MODEL.DEVICE", device(cfg.device), "device")
    put("INPUT.FORMAT", cfg.pixel_format, "pixel_format")
    put("MODEL.PIXEL_MEAN", list(cfg.pixel_mean), "pixel_mean")
    put("MODEL.PIXEL_STD", list(cfg.pixel_std), "pixel_std")
    put("MODEL.RESNETS.DEPTH", cfg.depth, "depth")
    put("MODEL.RESNETS.RES2_OUT_CHANNELS", 64 if cfg.depth in (18, 34) else 256, "depth")
    put("MODEL.RESNETS.NORM", cfg.norm, "norm")
    put("MODEL.FPN.NORM", cfg.head_norm, "head_norm")
    put("MODEL.ROI_BOX_HEAD.NORM", cfg.head_norm, "head_norm")
    put("MODEL.BACKBONE.FREEZE_AT", cfg.freeze_at, "freeze_at")
    put("MODEL.ANCHOR_GENERATOR.SIZES", [[s] for s in cfg.anchor_sizes], "anchor_sizes")
    put("MODEL.FPN.OUT_CHANNELS", cfg.fpn_channels, "fpn_channels")
    put("MODEL.ROI_BOX_HEAD.FC_DIM", cfg.box_head_dim, "box_head_dim")
    put("MODEL.RPN.PRE_NMS_TOPK_TRAIN", cfg.rpn_pre_nms_topk_train, "rpn_pre_nms_topk_train")
    put("MODEL.RPN.POST_NMS_TOPK_TRAIN", cfg.rpn_post_nms_topk_train, "rpn_post_nms_topk_train")
    put("MODEL.RPN.POST_NMS_TOPK_TEST", cfg.rpn_post_nms_topk_test, "rpn_post_nms_topk_test")
    put("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", cfg.roi_batch_per_image, "roi_batch_per_image")
    put("MODEL.ROI_HEADS.NUM_CLASSES", len(FINDING_CLASSES), "(the 14 finding classes)")
    put("MODEL.ROI_HEADS.SCORE_THRESH_TEST", cfg.score_thr, "score_thr")
    put("TEST.DETECTIONS_PER_IMAGE", cfg.max_det, "max_det")
    put("DATASETS.TRAIN", (), "(the trainer gets the records themselves)")
    put("DATASETS.TEST", (), "(the trainer gets the records themselves)")
    put("DATALOADER.NUM_WORKERS", loader_workers(cfg.workers, gpus), "workers")
    put("INPUT.MIN_SIZE_TRAIN", (cfg.imgsz,), "imgsz")
    put("INPUT.MAX_SIZE_TRAIN", cfg.imgsz, "imgsz")
    put("INPUT.MIN_SIZE_TEST", cfg.imgsz, "imgsz")
    put("INPUT.MAX_SIZE_TEST", cfg.imgsz, "imgsz")
    put("SOLVER.IMS_PER_BATCH", cfg.batch * gpus, "batch")  # detectron2's batch is all GPUs together
    put("SOLVER.BASE_LR", cfg.lr * lr_factor, "lr")
    put("SOLVER.MAX_ITER", max_iter, "epochs")
    put("SOLVER.WARMUP_ITERS", min(round(cfg.warmup_epochs * per_epoch), max_iter // 2), "warmup_epochs")
    # strictly increasing and inside the run, or detectron2's scheduler refuses them (short demo/test runs)
    put("SOLVER.STEPS", tuple(sorted({int(f * max_iter) for f in cfg.lr_steps} & set(range(1, max_iter)))),
        "lr_steps")
    put("SOLVER.CHECKPOINT_PERIOD", per_epoch, "(a checkpoint at every epoch's end)")
    put("SOLVER.AMP.ENABLED", cfg.amp and d2.MODEL.DEVICE == "cuda", "amp")
    put("TEST.EVAL_PERIOD", cfg.validate_every * per_epoch, "validate_every")
    put("SEED", cfg.seed, "seed")
    put("OUTPUT_DIR", str(out / "train"), "(the fold folder)")
    merge_opts(d2, cfg.opts, owner)
    d2.freeze()
    return d2


def merge_opts(d2: CfgNode, opts: list[str], owner: dict[str, str]) -> None:
    """``opts`` (``KEY VALUE`` pairs, detectron2's command-line form) into ``d2`` through ``merge_from_list``;
    a key detectron2 does not have, a group of keys, a key in ``owner`` (set from a field) or a value of
    the wrong type is one :class:`DataError` naming it."""
    if len(opts) % 2:
        raise DataError("opts", f"expected KEY VALUE pairs, got {len(opts)} strings: {opts}")
    for key in opts[::2]:
        source = owner.get(key)
        if source is not None:
            raise DataError("opts", f"{key} is set by the adapter {source}" if source.startswith("(")
                            else f"{key} is set from the field '{source}': set {source} instead")
        node: Any = d2
        for name in key.split("."):
            if not isinstance(node, CfgNode) or name not in node:
                raise DataError("opts", f"{key}: detectron2's config has no such key")
            node = node[name]
        if isinstance(node, CfgNode):
            raise DataError("opts", f"{key} is a group of keys: set its keys one by one")
    try:
        d2.merge_from_list(list(opts))
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # yacs: a value of another type than the default
        raise DataError("opts", f"{e}") from None


def load_weights(model: torch.nn.Module, path: str, log=print) -> None:
    """Copy a checkpoint into ``model`` by name and shape (:func:`models.weights.transfer`).

    Formats, read as detectron2 reads them: a model-zoo ``.pkl`` (``{'model': {name: ndarray},
    '__author__': ...}``, detectron2 names); a Caffe2/Detectron1 ``.pkl`` such as the MSRA ImageNet
    ``R-50.pkl`` (``res2_0_branch2a_w`` ...: renamed by ``c2_model_loading``); a ``.pth``
    (``{'model': state_dict}`` or a bare state dict). The backbone is ``backbone.bottom_up``.
    """
    file = resolve(path)
    if file.suffix == ".pkl":
        ckpt = DetectionCheckpointer(model)._load_file(str(file))  # detectron2's own pickle-format reader
    else:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        ckpt = ckpt if "model" in ckpt else {"model": ckpt}
    state = {k: torch.as_tensor(v) for k, v in ckpt["model"].items()}
    if ckpt.get("matching_heuristics"):  # Caffe2 / pycls names -> this model's
        state = align_and_update_state_dicts(model.state_dict(), state, c2_conversion=ckpt.get("__author__") == "Caffe2")
    transfer(model, state, file, lambda name: name.startswith("backbone.bottom_up."), log=log)


def frozen_bn_checkpoint(path: Path, cfg: Config, images: list[Path]) -> Path:
    """A model-zoo-format checkpoint (``{'model': {name: ndarray}, '__author__': ...}``, 80 COCO classes) of
    ``cfg``'s FrozenBN architecture that trains as stably as the real file: its frozen statistics are
    those of one BatchNorm pass over ``images`` (random weights with identity statistics diverge). For
    tests and ``bench/gpu_check.py``, which run the full profile's FrozenBN path without the zoo file."""
    import pickle
    from dataclasses import replace

    from detectron2.layers import FrozenBatchNorm2d

    d2 = build_cfg(replace(cfg, norm="BN", freeze_at=0, device="cpu"), path.parent).clone()
    d2.defrost()
    d2.MODEL.ROI_HEADS.NUM_CLASSES = 80
    model = build_model(d2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative: after one pass the running statistics are the batch's
    mapper = Mapper(cfg, train=False)
    batch = [mapper({"file_name": str(p), "image_id": 0, "width": 1, "height": 1, "boxes": np.zeros((0, 4)),
                     "classes": np.zeros(0, dtype=int)}) for p in images]
    model.train()
    with torch.no_grad():
        model.backbone(model.preprocess_image(batch).tensor)
    model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "Detectron2 Model Zoo"}, f)
    return path


class ValidationHook(HookBase):
    """At every epoch's end: the epoch's row of ``metrics.csv`` (:class:`models.curves.Curves`, rank 0:
    ``train_loss`` = the mean total loss of the epoch's iterations, ``lr``, ``seconds``); every
    ``validate_every`` epochs and at the last, the validation loss and mAP@0.4 (into the row and the event
    storage) and ``best.pth`` (the bare model, as ``weights.pth``) when the mAP improved.

    Validation runs on every rank, each on its share of the images (``val_ids[rank::world]``; the numbers
    are gathered), so no rank waits in the next step's all-reduce while another validates alone. Its state
    (the rows so far, the best mAP) is saved in every checkpoint, so a resumed run keeps both."""

    def __init__(self, cfg: Config, data: DataFolder, val_ids: list[str], per_epoch: int, out: Path, workers: int = 0):
        self.cfg, self.data, self.val_ids, self.per_epoch, self.out, self.workers = cfg, data, val_ids, per_epoch, out, workers
        self.records = records(data, val_ids[comm.get_rank()::comm.get_world_size()])
        self.mapper = Mapper(cfg, train=False)
        self.log: list[dict] = []  # metrics.csv's rows of the epochs done
        self.best = -math.inf
        self.curves: Curves | None = None
        self.started = 0.0

    def state_dict(self) -> dict:
        return {"log": self.curves.log if self.curves is not None else self.log, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.log, self.best = list(state["log"]), float(state["best"])

    def before_train(self) -> None:
        self.started = time.perf_counter()
        if comm.is_main_process():
            self.curves = Curves(self.out, self.log)

    def after_train(self) -> None:
        if self.curves is not None:
            self.curves.close()

    def after_step(self) -> None:
        it = self.trainer.iter + 1
        last = it == self.trainer.max_iter
        if it % self.per_epoch and not last:
            return
        epoch = math.ceil(it / self.per_epoch)
        row: dict[str, Any] = {"epoch": epoch}
        storage = self.trainer.storage
        if "total_loss" in storage.histories():  # rank 0 only: detectron2 gathers the losses there
            losses = [v for v, i in storage.history("total_loss").values() if i >= it - self.per_epoch]
            row["train_loss"] = float(np.mean(losses)) if losses else None
        if epoch % self.cfg.validate_every == 0 or last:
            loss, m = self.evaluate(self.trainer.model)
            storage.put_scalars(val_loss=loss, val_map=m, smoothing_hint=False)
            row.update(val_loss=loss, val_map=m)
            if m > self.best:
                self.best = m
                if comm.is_main_process():
                    model = getattr(self.trainer.model, "module", self.trainer.model)
                    with atomic_path(self.out / "best.pth") as tmp:
                        torch.save({"model": model.state_dict()}, tmp)
        if epoch in snapshot_epochs(self.cfg.epochs, self.cfg.snapshots) and not last and comm.is_main_process():
            model = getattr(self.trainer.model, "module", self.trainer.model)
            with atomic_path(snapshot_path(self.out, epoch, ".pth")) as tmp:
                torch.save({"model": model.state_dict()}, tmp)
        if "lr" in storage.histories():
            row["lr"] = float(storage.history("lr").latest())
        now = time.perf_counter()
        row["seconds"], self.started = now - self.started, now
        if self.curves is not None:
            self.curves.add(row)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        model = getattr(model, "module", model)  # the bare network: DDP's forward would sync with the other ranks
        was_training = model.training
        total = 0.0
        dev_type = next(model.parameters()).device.type
        with torch.no_grad(), amp_autocast(dev_type, self.cfg.amp):
            model.train()  # detectron2 returns losses only in training mode
            for start in range(0, len(self.records), self.cfg.batch):
                batch = [self.mapper(r) for r in self.records[start : start + self.cfg.batch]]
                total += sum(v.item() for v in model(batch).values()) * len(batch)
        m = validation_map(_infer_fn(model, self.cfg), self.data, self.val_ids, self.cfg.batch, self.workers)
        model.train(was_training)
        sums = np.sum(all_gather((total, len(self.records))), axis=0)
        return float(sums[0] / max(sums[1], 1)), float(m)


class TimedCheckpointer(HookBase):
    """A checkpoint every ``minutes`` of training, also within an epoch (detectron2's own checkpointer counts
    iterations only): ``train/model_timed.pth``, overwritten each time, with ``train/last_checkpoint``
    pointing at it, so a killed job resumes from it (``resume_or_load``: the model, optimizer, schedule,
    iteration and the validation hook's rows). Its data loader restarts its seeded stream on resume."""

    def __init__(self, checkpointer: Any, minutes: float):
        self.checkpointer, self.every, self.saved = checkpointer, 60.0 * minutes, time.perf_counter()

    def after_step(self) -> None:
        it = self.trainer.iter
        if time.perf_counter() - self.saved >= self.every and it + 1 < self.trainer.max_iter:
            self.checkpointer.save("model_timed", iteration=it)
            self.saved = time.perf_counter()


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` fed with our records and :class:`Mapper`, with our hooks."""

    def __init__(self, d2: CfgNode, train_records: list[dict], mapper: Mapper, validation: ValidationHook | None,
                 checkpoint_minutes: float = 0.0):
        # read by build_train_loader / build_hooks, which DefaultTrainer.__init__ calls
        self.train_records, self.mapper, self.validation = train_records, mapper, validation
        self.checkpoint_minutes = checkpoint_minutes
        super().__init__(d2)

    @classmethod
    def build_model(cls, d2: CfgNode) -> torch.nn.Module:
        """detectron2's model, whose printout (hundreds of lines, which DefaultTrainer logs to the console)
        goes to ``model.txt`` in the fold folder instead."""
        model = build_model(d2)
        if comm.is_main_process():
            path = Path(d2.OUTPUT_DIR).parent / "model.txt"
            with atomic_path(path) as tmp:
                tmp.write_text(f"{model}\n")
            print(f"detectron2 model: {sum(p.numel() for p in model.parameters()):,} parameters, layers in {path}",
                  flush=True)
        return model

    def build_train_loader(self, d2: CfgNode):
        # the sampler's shuffle seed is the run's (detectron2 draws a random one otherwise), the same on every rank
        return build_detection_train_loader(self.train_records, mapper=self.mapper, total_batch_size=d2.SOLVER.IMS_PER_BATCH,
                                            sampler=TrainingSampler(len(self.train_records), seed=d2.SEED),
                                            num_workers=d2.DATALOADER.NUM_WORKERS)

    def build_hooks(self) -> list[HookBase]:
        """Timer, LR schedule, validation (and the epoch's curves row), the latest epoch checkpoint only
        (+ model_final), a timed one within epochs (:class:`TimedCheckpointer`), writers. Validation runs
        before the checkpoint, so the checkpoint holds the epoch's row and best score (a run resumed from it
        neither loses nor repeats an epoch's row), and before the writers, so its scalars reach metrics.json
        and TensorBoard."""
        main = comm.is_main_process()
        keep_last = hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=1)
        timed = [TimedCheckpointer(self.checkpointer, self.checkpoint_minutes)] if main and self.checkpoint_minutes else []
        writer = hooks.PeriodicWriter(self.build_writers(), period=20)
        return [hooks.IterationTimer(), hooks.LRScheduler(), *([self.validation] if self.validation is not None else []),
                *([keep_last] if main else []), *timed, *([writer] if main else [])]

    def build_writers(self):
        """Console, ``train/metrics.json`` and detectron2's TensorBoard events (every loss term) in ``train/``."""
        return [CommonMetricPrinter(self.max_iter), JSONWriter(str(Path(self.cfg.OUTPUT_DIR) / "metrics.json")),
                TensorboardXWriter(self.cfg.OUTPUT_DIR)]


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[int, int]:
    """Check that fold ``fold``'s records build (images present, sizes known); nothing is written.
    Returns the number of (train, validation) images."""
    train_ids, val_ids = split(folds, fold)
    return len(records(data, train_ids, cfg.labels)), len(records(data, val_ids))


def _train_worker(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> None:
    """One rank of :func:`train` (the only one with ``gpus: 1``)."""
    world, main = comm.get_world_size(), comm.is_main_process()
    train_ids, val_ids = split(folds, fold)
    train_records = records(data, train_ids, cfg.labels)
    d2 = build_cfg(cfg, out, world, len(train_records))
    per_epoch = d2.SOLVER.CHECKPOINT_PERIOD
    Path(d2.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    if d2.MODEL.DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True  # every image is imgsz x imgsz: tune the kernels once
    seed_all_rng(cfg.seed + comm.get_rank())  # what detectron2's default_setup would do with SEED: same init, same run
    validation = ValidationHook(cfg, data, val_ids, per_epoch, out, decode_workers(cfg.workers, d2.MODEL.DEVICE))
    trainer = Trainer(d2, train_records, Mapper(cfg, train=True), validation, cfg.checkpoint_minutes)
    trainer.resume_or_load(resume=True)  # continues from train/last_checkpoint after a kill
    if trainer.start_iter == 0 and cfg.weights:  # a fresh run starts from the profile's checkpoint
        load_weights(trainer.checkpointer.model, cfg.weights, log=print if main else lambda _: None)
    if main:
        s = d2.SOLVER
        print(f"detectron2: {world} x batch {cfg.batch} = {s.IMS_PER_BATCH} images per iteration; lr {cfg.lr:g} x "
              f"{world} = {s.BASE_LR:g} (linear scaling rule); {len(train_records)} training images = {per_epoch} "
              f"iterations per epoch x {cfg.epochs} epochs = {s.MAX_ITER} iterations; warmup {s.WARMUP_ITERS}, "
              f"LR x 0.1 at {list(s.STEPS)}; validation every {cfg.validate_every} epoch(s) and at the end, a "
              f"checkpoint every epoch{f' and every {cfg.checkpoint_minutes:g} min' if cfg.checkpoint_minutes else ''}; "
              f"{d2.DATALOADER.NUM_WORKERS} loader workers per rank", flush=True)
        save(cfg, out / "config.yaml")  # only now that training really starts
        with atomic_path(out / "detectron2.yaml") as tmp:
            tmp.write_text(d2.dump())
    trainer.train()


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Train fold ``fold`` (resuming a killed run) on ``cfg.gpus`` processes; returns ``weights.pth``
    (the final model; ``best.pth`` holds the best validation epoch's)."""
    final = out / "weights.pth"
    if final.exists():
        return final
    if cfg.weights:
        resolve(cfg.weights)  # a missing file stops here, before any work
    elif cfg.norm == "FrozenBN":  # frozen identity statistics: an unnormalized ResNet that diverges
        raise DataError("norm", "FrozenBN keeps a checkpoint's statistics and needs weights; to train from scratch "
                                "set norm=GN head_norm=GN freeze_at=0 pixel_mean=[128,128,128] pixel_std=[64,64,64] "
                                "(the demo profile's choice)")
    if cfg.gpus > 1 and device(cfg.device) == "cpu":  # its create_ddp_model always passes CUDA device_ids
        raise DataError("gpus", f"{cfg.gpus}: detectron2 trains on several processes on CUDA only; set gpus=1 on the CPU")
    build_cfg(cfg, out)  # a bad `opts` pair stops here, before anything is written
    # dist_url auto: a free local port (without one, launch stops on "MASTER_ADDR expected")
    launch(_train_worker, cfg.gpus, dist_url="auto", args=(cfg, data, folds, fold, out))
    train_dir = out / "train"
    model = torch.load(train_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    with atomic_path(final) as tmp:
        torch.save({"model": model}, tmp)
    # a finished fold keeps one final (weights.pth) and one best (best.pth) file: detectron2's checkpoints, with
    # the optimizer state (model_final.pth: 2x the weights) go; weights.pth marks the fold finished, so none is needed
    for checkpoint in [*train_dir.glob("model_*.pth"), train_dir / "last_checkpoint"]:
        checkpoint.unlink(missing_ok=True)
    return final


def _infer_fn(model: torch.nn.Module, cfg: Config) -> Infer:
    """``model`` as an ``infer`` function: gray images (any size) -> boxes normalized to [0, 1]."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def infer(images: list[np.ndarray], size: int | None = None) -> list[Detections]:
        s = size or cfg.imgsz
        resize = A.Resize(s, s)
        was_training = model.training
        model.eval()
        batch = [{"image": torch.as_tensor(np.repeat(resize(image=im)["image"][None], 3, axis=0)).to(dev, non_blocking=True),
                  "height": s, "width": s} for im in images]
        outs = []
        with amp_autocast(dev.type, cfg.amp):  # detectron2 decodes the boxes in fp32 itself
            results = model(batch)
        for o in results:
            inst = o["instances"].to("cpu")
            boxes = to_original(inst.pred_boxes.tensor.numpy(), (s, s), (1, 1))  # network pixels -> [0, 1]
            outs.append((boxes, inst.scores.numpy(), inst.pred_classes.numpy()))
        model.train(was_training)
        return outs

    return infer


def load_infer(cfg: Config, out: Path, snapshot: Path | None = None) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py): the final weights, or the best
    validation epoch's with ``checkpoint: best``, or the file ``snapshot``."""
    weights = trained_weights(out / "weights.pth", "detectron")  # also: the run finished
    if cfg.checkpoint == "best":
        weights = trained_weights(out / "best.pth", "detectron")
    weights = snapshot or weights
    model = build_model(build_cfg(cfg, out))
    DetectionCheckpointer(model).load(str(weights))
    return _infer_fn(model, cfg)


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    return write_fold_predictions(fold_infers(load_infer, cfg, out), data, folds, fold, out, cfg, cfg.batch,
                                  decode_workers(cfg.workers, device(cfg.device)))
