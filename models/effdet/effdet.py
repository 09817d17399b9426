"""EfficientDet (effdet) adapter: prepare / train / predict for one fold, with its own short training loop.

Contract: see models/README.md. effdet ships models but no trainer, so this file holds a
plain ``train_one_epoch`` / ``evaluate`` pair: AdamW or SGD, linear warmup + cosine decay,
AMP on GPU, an EMA of the weights (``torch.optim.swa_utils.AveragedModel``) that is what
gets validated and saved, gradient clipping, and a stop with a clear message on a
non-finite loss. Every epoch writes ``last.pt`` (model, EMA, optimizer, schedule, log) and
``metrics.csv`` (train loss, validation loss, validation mAP@0.4 with the competition
metric); a killed run resumes from ``last.pt``.

Multi-GPU: run under ``torchrun`` (``torchrun --nproc_per_node N -m models effdet train ...``);
the same code path initializes the process group from torchrun's environment (NCCL on GPU,
gloo on CPU) and wraps the model in DistributedDataParallel; without torchrun it is one process.

effdet conventions handled here: targets are ``yxyx`` boxes in input pixels with 1-based
classes, an image without boxes is one padding row of class -1 (which effdet's labeler
filters); predictions come back ``xyxy`` with 1-based classes.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cxr.config import save
from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, NO_FINDING
from cxr.images import read_image
from cxr.io import atomic_path, write_table
from cxr.metric import ground_truth, mean_average_precision
from models.common import Detections, Infer, device, load_efficientnet_lite0, predict_split, write_fold_predictions

OUTPUT = "detections"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Config:
    arch: str = "tf_efficientdet_lite0"  # any effdet config name (tf_efficientdet_d0..d7, _lite0..4)
    backbone_init: Literal["efficientnet_lite0"] | None = "efficientnet_lite0"  # needs a *lite0 backbone
    weights: str | None = None  # optional local checkpoint (our weights.pt or an effdet state dict)
    imgsz: int = 256
    epochs: int = 10
    batch: int = 8
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    ema_decay: float = 0.999
    clip_grad: float = 10.0
    amp: bool = True  # on GPU only
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    score_thr: float = 0.001  # low: the metric does not punish extra boxes
    max_det: int = 100
    tta: bool = False
    validate_every: int = 1


class Boxes(torch.utils.data.Dataset):
    """Squashed PNG + fused boxes (original pixels) -> image tensor and effdet target at ``size``."""

    def __init__(self, data: DataFolder, ids: list[str], fused: pd.DataFrame, size: int, augment: bool):
        self.data, self.ids, self.size = data, ids, size
        self.boxes = {k: g for k, g in fused[fused["class_id"] != NO_FINDING].groupby("image_id")}
        self.wh = data.train_sizes.set_index("image_id")[["width", "height"]]
        aug = [A.HorizontalFlip(p=0.5), A.Affine(scale=(0.9, 1.1), translate_percent=0.05, p=0.5),
               A.RandomBrightnessContrast(0.15, 0.15, p=0.5)] if augment else []
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
    """effdet model wrapped in its train (with anchor labeler) or predict bench."""
    from effdet import create_model

    bench = create_model(cfg.arch, bench_task=bench_task, num_classes=len(range(NO_FINDING)), pretrained=False,
                         pretrained_backbone=False, image_size=(cfg.imgsz, cfg.imgsz), bench_labeler=True,
                         max_det_per_image=cfg.max_det)
    if cfg.weights:
        state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
        bench.model.load_state_dict(state.get("model", state))
    elif cfg.backbone_init == "efficientnet_lite0":
        load_efficientnet_lite0(bench.model.backbone)
    return bench


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train_one_epoch(bench, loader, opt, sched, scaler, ema, dev: str, cfg: Config, epoch: int) -> float:
    bench.train()
    losses = []
    for x, target in loader:
        x = x.to(dev)
        target = {k: [t.to(dev) for t in v] for k, v in target.items()}
        with torch.autocast(device_type=dev, enabled=scaler.is_enabled()):
            loss = bench(x, target)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in epoch {epoch + 1}: lower lr or check the labels")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(bench.parameters(), cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update_parameters(_unwrap(bench).model)
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, cfg: Config, data: DataFolder, val_ids: list[str], loader, dev: str) -> tuple[float, float]:
    """(validation loss, validation mAP@0.4 with the competition metric) of ``model`` (the EMA)."""
    from effdet import DetBenchTrain

    bench = DetBenchTrain(model, create_labeler=True).to(dev).train()  # train mode: loss only, no post-processing
    model.eval()  # ...but frozen BN statistics and no dropout
    losses = [bench(x.to(dev), {k: [t.to(dev) for t in v] for k, v in target.items()})["loss"].item() for x, target in loader]
    preds = predict_split(_infer_fn(model, cfg, dev), data, "train", val_ids, batch_size=cfg.batch)
    gt = ground_truth(data.labels[data.labels["image_id"].isin(val_ids)])
    return float(np.mean(losses)), mean_average_precision(gt, preds, val_ids)["map"]


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    final = out / "weights.pt"
    if final.exists():
        return final
    rank, world = _distributed()
    dev = device(cfg.device)
    if dev == "cuda" and world > 1:
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(dev)
    if rank == 0:
        save(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    train_ids, val_ids = split(folds, fold)
    fused = data.fused()
    train_ds = Boxes(data, train_ids, fused, cfg.imgsz, augment=True)
    sampler = torch.utils.data.DistributedSampler(train_ds, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch, shuffle=sampler is None, sampler=sampler,
                                         num_workers=cfg.workers, collate_fn=collate, drop_last=len(train_ds) > cfg.batch)
    val_loader = torch.utils.data.DataLoader(Boxes(data, val_ids, fused, cfg.imgsz, augment=False), batch_size=cfg.batch,
                                             num_workers=cfg.workers, collate_fn=collate)
    bench = build(cfg).to(dev)
    ema = torch.optim.swa_utils.AveragedModel(
        bench.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    if world > 1:
        bench = torch.nn.parallel.DistributedDataParallel(bench, device_ids=[dev] if dev.startswith("cuda") else None)
    params = bench.parameters()
    opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True))
    steps, warmup = cfg.epochs * len(loader), max(1, int(cfg.warmup_epochs * len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and dev.startswith("cuda"))
    start, best, log = 0, -1.0, []
    last = out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location=dev, weights_only=False)
        _unwrap(bench).model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best, log = ckpt["epoch"] + 1, ckpt["best"], ckpt["log"]
        print(f"resuming from epoch {start} ({last})")
    for epoch in range(start, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loss = train_one_epoch(bench, loader, opt, sched, scaler, ema, dev, cfg, epoch)
        if rank != 0:
            continue
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": float("nan"), "val_map": float("nan"),
               "lr": opt.param_groups[0]["lr"]}
        if (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs:
            row["val_loss"], row["val_map"] = evaluate(ema.module, cfg, data, val_ids, val_loader, dev)
            if row["val_map"] > best:
                best = row["val_map"]
                with atomic_path(out / "best.pt") as tmp:
                    torch.save({"model": ema.module.state_dict()}, tmp)
        log.append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        with atomic_path(last) as tmp:
            torch.save({"model": _unwrap(bench).model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "best": best,
                        "log": log}, tmp)
        write_table(pd.DataFrame(log), out / "metrics.csv")
    if rank == 0:
        with atomic_path(final) as tmp:
            shutil.copyfile(out / "best.pt", tmp)
    if world > 1:
        dist.barrier()
    return final


def _unwrap(bench: torch.nn.Module) -> torch.nn.Module:
    return bench.module if isinstance(bench, torch.nn.parallel.DistributedDataParallel) else bench


def _infer_fn(model: torch.nn.Module, cfg: Config, dev: str) -> Infer:
    from effdet import DetBenchPredict

    bench = DetBenchPredict(model).to(dev).eval()
    mean, std = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1), torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    @torch.inference_mode()
    def infer(images: list[np.ndarray]) -> list[Detections]:
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(A.Resize(cfg.imgsz, cfg.imgsz)(image=im)["image"]))
                         for im in images]).to(dev)
        x = (x.float().div(255).unsqueeze(1).repeat(1, 3, 1, 1) - mean) / std
        det = bench(x).float().cpu().numpy()  # (B, max_det, 6): x0 y0 x1 y1 score class(1-based), input pixels
        outs = []
        for d in det:
            d = d[d[:, 4] >= cfg.score_thr]
            outs.append((d[:, :4] / cfg.imgsz, d[:, 4], d[:, 5] - 1))
        return outs

    return infer


def load_infer(cfg: Config, out: Path) -> Infer:
    """The trained fold model (EMA weights) as an ``infer`` function (see models/common.py)."""
    weights = out / "weights.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: train this fold first (make train MODEL=effdet FOLD=k)")
    dev = device(cfg.device)
    model = build(Config(**{**vars(cfg), "backbone_init": None, "weights": None})).model
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
    return _infer_fn(model.to(dev), cfg, dev)


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    return write_fold_predictions(load_infer(cfg, out), data, folds, fold, out, cfg.tta, cfg.batch)
