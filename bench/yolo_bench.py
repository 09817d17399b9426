"""Throughput of our YOLO path vs a bare ultralytics training / inference step (prints figures; not a test).

    .venv/bin/python bench/yolo_bench.py [--n-train 160] [--imgsz 256] [--epochs 2]

ours (train): the adapter's ``train`` (ultralytics' trainer on the prepared fold: data loading,
augmentation, loss, optimizer, per-epoch validation), images/s over the epochs' wall time.
bare (train): ``DetectionModel`` forward + loss + backward + SGD step on a fixed random batch.
ours (predict): the adapter's inference path (PNG read, model, boxes back to original pixels).
bare (predict): ``DetectionModel`` forward on a fixed batch. Ratio = ours / bare.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.synth import SynthConfig, generate
from models.common import device, predict_split
from models.yolo import yolo


def bare_train(cfg: yolo.Config, batch: int, steps: int, dev: str) -> float:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace
    from ultralytics.cfg import get_cfg

    model = DetectionModel(cfg.model, nc=14, verbose=False).to(dev).train()
    model.args = IterableSimpleNamespace(**vars(get_cfg()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = 3 * batch
    data = {
        "img": torch.rand(batch, 3, cfg.imgsz, cfg.imgsz, device=dev),
        "batch_idx": torch.arange(batch, device=dev).repeat_interleave(3).float(),
        "cls": torch.randint(0, 14, (n, 1), device=dev).float(),
        "bboxes": torch.rand(n, 4, device=dev) * 0.3 + torch.tensor([0.3, 0.3, 0.05, 0.05], device=dev),
    }
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            start = time.perf_counter()
        loss, _ = model.loss(data)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def bare_predict(cfg: yolo.Config, batch: int, steps: int, dev: str) -> float:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg.model, nc=14, verbose=False).to(dev).eval()
    x = torch.rand(batch, 3, cfg.imgsz, cfg.imgsz, device=dev)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--profile", default="models/yolo/demo.yaml")
    a = p.parse_args()
    from cxr.config import load

    cfg = load(yolo.Config, a.profile, {"imgsz": a.imgsz, "epochs": a.epochs})
    dev = device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = DataFolder(generate(SynthConfig(out=f"{tmp}/data", n_train=a.n_train, n_test=64, size=a.imgsz, seed=0)))
        folds = make_folds(data.labels, n_folds=4, seed=0)
        write_table(folds, f"{tmp}/folds.csv")
        out = Path(tmp) / "run" / "yolo" / "fold0"
        out.mkdir(parents=True)
        yolo.train(cfg, data, folds, 0, out)
        results = pd.read_csv(out / "train" / "results.csv")
        n_fit = int((folds["fold"] != 0).sum())
        ours_train = n_fit * a.epochs / float(results["time"].iloc[-1])
        bare_t = bare_train(cfg, cfg.batch, 10, dev)

        from ultralytics import YOLO

        model = YOLO(str(out / "weights.pt"))

        def infer(images):
            import numpy as np

            res = model.predict([np.repeat(i[:, :, None], 3, 2) for i in images], imgsz=cfg.imgsz, conf=cfg.conf, verbose=False)
            return [(r.boxes.xyxyn.cpu().numpy(), r.boxes.conf.cpu().numpy(), r.boxes.cls.cpu().numpy()) for r in res]

        ids = data.test_ids()
        start = time.perf_counter()
        predict_split(infer, data, "test", ids, batch_size=cfg.predict_batch)
        ours_pred = len(ids) / (time.perf_counter() - start)
        bare_p = bare_predict(cfg, cfg.predict_batch, 5, dev)
    print(f"device {dev}, {cfg.model} at {cfg.imgsz}px, batch {cfg.batch}")
    print(f"train   ours {ours_train:7.1f} img/s (trainer incl. validation)  bare {bare_t:7.1f} img/s  ratio {ours_train / bare_t:.2f}")
    print(f"predict ours {ours_pred:7.1f} img/s (PNG -> original px)        bare {bare_p:7.1f} img/s  ratio {ours_pred / bare_p:.2f}")


if __name__ == "__main__":
    main()
