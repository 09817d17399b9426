"""Training and inference images/s of our adapter path vs a bare framework step (prints figures; not a test).

    .venv/bin/python bench/throughput.py --model yolo|detectron|effdet [--n-train 160] [--imgsz 128]

ours (train): the adapter's ``train`` with its demo profile on synthetic data (data loading,
augmentation, the framework's trainer or our loop, validation), images/s over the wall time.
bare (train): the same network's forward + loss + backward + optimizer step on one fixed batch.
ours (predict): ``predict_split`` (PNG read, model, boxes back to original pixels).
bare (predict): the network's forward on one fixed batch. Ratio = ours / bare.
"""
from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import torch

from cxr.config import load
from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.synth import SynthConfig, generate
from models.common import device, predict_split


def _timed(step, n: int) -> float:
    step()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def bare_yolo(cfg, dev: str, steps: int) -> tuple[float, float]:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    model = DetectionModel(cfg.model, nc=14, verbose=False).to(dev)
    model.args = IterableSimpleNamespace(**vars(get_cfg()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    b, n = cfg.batch, 3 * cfg.batch
    batch = {"img": torch.rand(b, 3, cfg.imgsz, cfg.imgsz, device=dev),
             "batch_idx": torch.arange(b, device=dev).repeat_interleave(3).float(),
             "cls": torch.randint(0, 14, (n, 1), device=dev).float(),
             "bboxes": torch.rand(n, 4, device=dev) * 0.3 + torch.tensor([0.3, 0.3, 0.05, 0.05], device=dev)}

    def train_step():
        model.train()
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.inference_mode():
            model(batch["img"])

    return steps * b / _timed(train_step, steps), steps * b / _timed(infer_step, steps)


def bare_effdet(cfg, dev: str, steps: int) -> tuple[float, float]:
    from models.effdet.effdet import build, effdet

    DetBenchPredict = effdet().DetBenchPredict

    bench = build(cfg).to(dev)
    opt = torch.optim.AdamW(bench.parameters(), lr=cfg.lr)
    b, s = cfg.batch, cfg.imgsz
    x = torch.rand(b, 3, s, s, device=dev)
    target = {"bbox": [torch.tensor([[0.2 * s, 0.2 * s, 0.5 * s, 0.6 * s]], device=dev)] * b,
              "cls": [torch.tensor([1.0], device=dev)] * b}
    predictor = DetBenchPredict(bench.model).to(dev)

    def train_step():
        bench.train()
        loss = bench(x, target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer_step():
        predictor.eval()
        with torch.inference_mode():
            predictor(x)

    return steps * b / _timed(train_step, steps), steps * b / _timed(infer_step, steps)


def bare_detectron(cfg, dev: str, steps: int, out: Path) -> tuple[float, float]:
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from models.detectron.detectron import build_cfg

    model = build_model(build_cfg(cfg, out))
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    s = cfg.imgsz

    def record():
        inst = Instances((s, s))
        inst.gt_boxes = Boxes(torch.tensor([[0.2 * s, 0.2 * s, 0.5 * s, 0.6 * s]]))
        inst.gt_classes = torch.tensor([3])
        return {"image": torch.randint(0, 255, (3, s, s), dtype=torch.uint8), "instances": inst, "height": s, "width": s}

    batch = [record() for _ in range(cfg.batch)]

    def train_step():
        model.train()
        with EventStorage(0):
            loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.inference_mode():
            model(batch)

    return steps * cfg.batch / _timed(train_step, steps), steps * cfg.batch / _timed(infer_step, steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["yolo", "detectron", "effdet"], required=True)
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    adapter = importlib.import_module(f"models.{a.model}.{a.model}")
    cfg = load(adapter.Config, Path("models") / a.model / "demo.yaml", {"imgsz": a.imgsz})
    dev = device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = DataFolder(generate(SynthConfig(out=f"{tmp}/data", n_train=a.n_train, n_test=64, size=a.imgsz, seed=0)))
        folds = make_folds(data.labels, n_folds=4, seed=0)
        write_table(folds, f"{tmp}/folds.csv")
        out = Path(tmp) / "run" / a.model / "fold0"
        out.mkdir(parents=True)
        start = time.perf_counter()
        adapter.train(cfg, data, folds, 0, out)
        train_s = time.perf_counter() - start
        n_fit = int((folds["fold"] != 0).sum())
        seen = n_fit * cfg.epochs
        ours_train = seen / train_s
        infer = adapter.load_infer(cfg, out)
        ids = data.test_ids()
        start = time.perf_counter()
        predict_split(infer, data, "test", ids, batch_size=8)
        ours_pred = len(ids) / (time.perf_counter() - start)
        if a.model == "yolo":
            bare_t, bare_p = bare_yolo(cfg, dev, a.steps)
        elif a.model == "effdet":
            bare_t, bare_p = bare_effdet(cfg, dev, a.steps)
        else:
            bare_t, bare_p = bare_detectron(cfg, dev, a.steps, out)
    print(f"{a.model} on {dev} at {a.imgsz}px (demo profile, {seen} training images incl. validation)")
    print(f"train   ours {ours_train:7.1f} img/s  bare {bare_t:7.1f} img/s  ratio {ours_train / bare_t:.2f}")
    print(f"predict ours {ours_pred:7.1f} img/s  bare {bare_p:7.1f} img/s  ratio {ours_pred / bare_p:.2f}")


if __name__ == "__main__":
    main()
