"""Faster R-CNN (detectron2) adapter: prepare / train / predict for one fold.

Contract: see models/README.md. detectron2 specifics:

* Datasets are registered from the shared core's fused labels and the fold file (no copy of
  the labels): ``vbd_<run>_fold<k>_{train,val}``, boxes scaled per axis from original pixels
  to the squashed PNG. Images without a finding stay in training (empty annotations are not
  filtered), so normal images teach the background.
* From scratch, the model zoo's frozen BatchNorm diverges: backbone, FPN and box head use
  GroupNorm and nothing is frozen (``FREEZE_AT=0``). ``MODEL.WEIGHTS`` is ``''`` or a
  local file: nothing is downloaded.
* Augmentation through albumentations in a dataset mapper (flip, shift-scale-rotate,
  brightness/contrast).
* detectron2's own ``DefaultTrainer``: checkpoints every ``checkpoint_period`` and
  ``resume_or_load(resume=True)``, so a killed run resumes; ``metrics.json`` holds the
  per-iteration losses, plus (every ``eval_period``) the validation loss and the
  competition mAP@0.4 from :class:`ValidationHook`; ``curves.png`` plots both.
* Multi-GPU through detectron2's ``launch`` (``num_gpus``); one process otherwise.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch

from cxr.config import save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.images import read_image
from cxr.io import atomic_path
from cxr.metric import ground_truth, mean_average_precision
from models.common import Detections, Infer, device, predict_split, write_fold_predictions

OUTPUT = "detections"


@dataclass
class Config:
    zoo_config: str = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"  # architecture only; weights never fetched
    depth: int = 50  # ResNet depth: 18, 34, 50, 101
    norm: str = "GN"  # GroupNorm: trains from scratch, unlike the zoo's FrozenBN
    weights: str = ""  # '' (from scratch) or a local .pth / .pkl
    imgsz: int = 1024
    batch: int = 8  # images per iteration, all GPUs together
    max_iter: int = 30000
    base_lr: float = 0.01
    warmup_iters: int = 1000
    lr_steps: list[float] = field(default_factory=lambda: [0.7, 0.9])  # fractions of max_iter
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    fpn_channels: int = 256
    box_head_dim: int = 1024  # width of the box head's two fully connected layers
    rpn_pre_nms_topk_train: int = 2000
    rpn_post_nms_topk_train: int = 2000
    rpn_post_nms_topk_test: int = 1000
    roi_batch_per_image: int = 512
    eval_period: int = 2000
    checkpoint_period: int = 2000
    score_thr: float = 0.001  # low: the metric does not punish extra boxes
    max_det: int = 100
    amp: bool = True  # on GPU only
    num_gpus: int = 1
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    tta: bool = False


def records(data: DataFolder, ids: list[str]) -> list[dict]:
    """detectron2 dataset dicts for ``ids``: PNG path, PNG size, fused boxes in PNG pixels."""
    from detectron2.structures import BoxMode

    fused = data.fused()
    by_image = {k: g for k, g in fused[fused["class_id"] != NO_FINDING].groupby("image_id")}
    wh = data.train_sizes.set_index("image_id")[["width", "height"]]
    out = []
    for n, image_id in enumerate(ids):
        path = data.image("train", image_id)
        h, w = read_image(path).shape
        g = by_image.get(image_id)
        annotations = []
        if g is not None:
            ow, oh = wh.loc[image_id]
            boxes = g[BOX_COLUMNS].to_numpy(dtype=float) * np.array([w / ow, h / oh, w / ow, h / oh])
            annotations = [{"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c)}
                           for b, c in zip(boxes, g["class_id"])]
        out.append({"file_name": str(path), "image_id": n, "name": image_id, "height": h, "width": w,
                    "annotations": annotations})
    return out


def register(data: DataFolder, folds: pd.DataFrame, fold: int, prefix: str) -> tuple[str, str]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []
    for part, ids in zip(("train", "val"), split(folds, fold)):
        name = f"{prefix}_fold{fold}_{part}"
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda ids=ids: records(data, ids))
            MetadataCatalog.get(name).set(thing_classes=[CLASS_NAMES[c] for c in FINDING_CLASSES])
        names.append(name)
    return names[0], names[1]


class AlbumentationsMapper:
    """Dataset dict -> model input, with albumentations augmentation when training."""

    def __init__(self, size: int, train: bool):
        aug = [A.HorizontalFlip(p=0.5), A.Affine(scale=(0.9, 1.1), translate_percent=0.05, rotate=(-5, 5), p=0.5),
               A.RandomBrightnessContrast(0.15, 0.15, p=0.5)] if train else []
        self.transform = A.Compose([A.Resize(size, size), *aug],
                                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3))

    def __call__(self, record: dict) -> dict:
        from detectron2.data import detection_utils
        from detectron2.structures import BoxMode

        record = copy.deepcopy(record)
        image = read_image(record["file_name"])
        h, w = image.shape
        boxes = np.array([a["bbox"] for a in record["annotations"]], dtype=float).reshape(-1, 4).clip(0, [w, h, w, h])
        labels = [a["category_id"] for a in record["annotations"]]
        ok = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)
        out = self.transform(image=np.repeat(image[:, :, None], 3, axis=2), bboxes=boxes[ok],
                             labels=[c for c, k in zip(labels, ok) if k])
        image = out["image"]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = [{"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c)}
                       for b, c in zip(out["bboxes"], out["labels"])]
        record["instances"] = detection_utils.annotations_to_instances(annotations, image.shape[:2])
        record["height"], record["width"] = image.shape[:2]
        return record


def build_cfg(cfg: Config, out: Path, train_name: str = "", val_name: str = ""):
    """The detectron2 config: zoo architecture, GN, no frozen stages, our solver and sizes."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    d2 = get_cfg()
    d2.merge_from_file(model_zoo.get_config_file(cfg.zoo_config))
    d2.MODEL.WEIGHTS = cfg.weights
    d2.MODEL.DEVICE = device(cfg.device)
    d2.MODEL.PIXEL_MEAN, d2.MODEL.PIXEL_STD = [128.0] * 3, [64.0] * 3  # gray X-rays, not ImageNet BGR
    d2.MODEL.RESNETS.DEPTH = cfg.depth
    if cfg.depth in (18, 34):
        d2.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d2.MODEL.RESNETS.NORM = d2.MODEL.FPN.NORM = d2.MODEL.ROI_BOX_HEAD.NORM = cfg.norm
    d2.MODEL.BACKBONE.FREEZE_AT = 0
    d2.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in cfg.anchor_sizes]
    d2.MODEL.FPN.OUT_CHANNELS = cfg.fpn_channels
    d2.MODEL.ROI_BOX_HEAD.FC_DIM = cfg.box_head_dim
    d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.rpn_pre_nms_topk_train
    d2.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.rpn_post_nms_topk_train
    d2.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.rpn_post_nms_topk_test
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = cfg.roi_batch_per_image
    d2.MODEL.ROI_HEADS.NUM_CLASSES = len(FINDING_CLASSES)
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_thr
    d2.TEST.DETECTIONS_PER_IMAGE = cfg.max_det
    d2.DATASETS.TRAIN, d2.DATASETS.TEST = (train_name,), ()
    d2.DATALOADER.NUM_WORKERS = cfg.workers
    d2.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # normal images are part of training
    d2.INPUT.MIN_SIZE_TRAIN, d2.INPUT.MAX_SIZE_TRAIN = (cfg.imgsz,), cfg.imgsz
    d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST = cfg.imgsz, cfg.imgsz
    d2.SOLVER.IMS_PER_BATCH = cfg.batch
    d2.SOLVER.BASE_LR = cfg.base_lr
    d2.SOLVER.MAX_ITER = cfg.max_iter
    d2.SOLVER.WARMUP_ITERS = min(cfg.warmup_iters, cfg.max_iter // 2)
    # strictly increasing and inside the run, or detectron2's scheduler refuses them (short demo/test runs)
    d2.SOLVER.STEPS = tuple(sorted({int(f * cfg.max_iter) for f in cfg.lr_steps} & set(range(1, cfg.max_iter))))
    d2.SOLVER.CHECKPOINT_PERIOD = cfg.checkpoint_period
    d2.SOLVER.AMP.ENABLED = cfg.amp and d2.MODEL.DEVICE == "cuda"
    d2.TEST.EVAL_PERIOD = cfg.eval_period
    d2.SEED = cfg.seed
    d2.OUTPUT_DIR = str(out / "train")
    d2.freeze()
    return d2


def _trainer_class():
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer

    class Trainer(DefaultTrainer):
        validation: "ValidationHook | None" = None

        def build_hooks(self):  # validation before the writer hook, so its scalars reach metrics.json
            hooks = super().build_hooks()
            if self.validation is not None:
                hooks.insert(len(hooks) - 1, self.validation.make())
            return hooks

        @classmethod
        def build_train_loader(cls, d2):
            return build_detection_train_loader(d2, mapper=AlbumentationsMapper(d2.INPUT.MIN_SIZE_TEST, train=True))

        def build_writers(self):  # console + metrics.json; detectron2's default adds TensorBoard, not installed
            from detectron2.utils.events import CommonMetricPrinter, JSONWriter

            return [CommonMetricPrinter(self.max_iter), JSONWriter(str(Path(self.cfg.OUTPUT_DIR) / "metrics.json"))]

    return Trainer


class ValidationHook:
    """Every ``period`` iterations and at the end: validation loss and mAP@0.4 into the event storage."""

    def __init__(self, cfg: Config, data: DataFolder, val_ids: list[str], val_records: list[dict], period: int):
        from detectron2.engine import HookBase

        self.base = HookBase
        self.cfg, self.data, self.val_ids, self.val_records, self.period = cfg, data, val_ids, val_records, period

    def make(self):
        hook = self

        class _Hook(self.base):
            def after_step(self):
                it = self.trainer.iter + 1
                if it % hook.period == 0 or it == self.trainer.max_iter:
                    loss, m = hook.evaluate(self.trainer.model)
                    self.trainer.storage.put_scalars(val_loss=loss, val_map=m, smoothing_hint=False)

        return _Hook()

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        mapper = AlbumentationsMapper(self.cfg.imgsz, train=False)
        was_training = model.training
        losses = []
        with torch.no_grad():
            model.train()  # detectron2 returns losses only in training mode
            for start in range(0, len(self.val_records), self.cfg.batch):
                batch = [mapper(r) for r in self.val_records[start : start + self.cfg.batch]]
                losses.append(sum(v.item() for v in model(batch).values()))
        preds = predict_split(_infer_fn(model, self.cfg), self.data, "train", self.val_ids, batch_size=self.cfg.batch)
        model.train(was_training)
        gt = ground_truth(self.data.labels[self.data.labels["image_id"].isin(self.val_ids)])
        return float(np.mean(losses)), mean_average_precision(gt, preds, self.val_ids)["map"]


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[str, str]:
    """Register fold ``fold``'s train/val datasets with detectron2 (in-process; nothing is written)."""
    return register(data, folds, fold, prefix=f"vbd_{out.parent.parent.name}")


def _train_worker(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> None:
    from detectron2.utils import comm

    train_name, _ = prepare(cfg, data, folds, fold, out)
    d2 = build_cfg(cfg, out, train_name)
    Path(d2.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    trainer_class = _trainer_class()
    _, val_ids = split(folds, fold)
    if comm.is_main_process():
        trainer_class.validation = ValidationHook(cfg, data, val_ids, records(data, val_ids), cfg.eval_period)
    trainer = trainer_class(d2)
    trainer.resume_or_load(resume=True)  # continues from train/last_checkpoint after a kill
    trainer.train()


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    final = out / "weights.pth"
    if final.exists():
        return final
    save(cfg, out / "config.yaml")
    if cfg.num_gpus > 1:
        from detectron2.engine import launch

        launch(_train_worker, cfg.num_gpus, args=(cfg, data, folds, fold, out))
    else:
        _train_worker(cfg, data, folds, fold, out)
    plot_curves(out / "train" / "metrics.json", out / "curves.png")
    with atomic_path(final) as tmp:
        shutil.copyfile(out / "train" / "model_final.pth", tmp)
    return final


def plot_curves(metrics_json: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_json.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "total_loss" in r]
    val_rows = [r for r in rows if "val_map" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot([r["iteration"] for r in train_rows], [r["total_loss"] for r in train_rows], label="train")
    a.plot([r["iteration"] for r in val_rows], [r["val_loss"] for r in val_rows], marker="o", label="validation")
    a.set(xlabel="iteration", ylabel="loss", title="loss")
    a.legend()
    b.plot([r["iteration"] for r in val_rows], [r["val_map"] for r in val_rows], marker="o")
    b.set(xlabel="iteration", ylabel="mAP@0.4", title="validation mAP@0.4")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _infer_fn(model: torch.nn.Module, cfg: Config) -> Infer:
    dev = next(model.parameters()).device

    @torch.no_grad()
    def infer(images: list[np.ndarray]) -> list[Detections]:
        was_training = model.training
        model.eval()
        batch = []
        for im in images:
            im = A.Resize(cfg.imgsz, cfg.imgsz)(image=im)["image"]
            batch.append({"image": torch.as_tensor(np.repeat(im[None], 3, axis=0)).to(dev), "height": cfg.imgsz,
                          "width": cfg.imgsz})
        outs = []
        for o in model(batch):
            inst = o["instances"].to("cpu")
            outs.append((inst.pred_boxes.tensor.numpy() / cfg.imgsz, inst.scores.numpy(), inst.pred_classes.numpy()))
        model.train(was_training)
        return outs

    return infer


def load_infer(cfg: Config, out: Path) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    weights = out / "weights.pth"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: train this fold first (make train MODEL=detectron FOLD=k)")
    model = build_model(build_cfg(cfg, out))
    DetectionCheckpointer(model).load(str(weights))
    return _infer_fn(model, cfg)


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    return write_fold_predictions(load_infer(cfg, out), data, folds, fold, out, cfg.tta, cfg.batch)
