"""GPU check: a few hundred full-profile training iterations per model with AMP; prints images/s and peak memory.

    .venv/bin/python bench/gpu_check.py [--models yolo] [--imgsz 640] [--n-train 1600]

Runs the real adapters (``train`` then ``predict``) on a synthetic data set generated at
``--imgsz`` px, one epoch budget per model sized to a few hundred iterations. Needs CUDA.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import models
from cxr.config import load
from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.synth import SynthConfig, generate

OVERRIDES = {  # full profile, shortened to a few hundred iterations: throughput, not convergence
    "yolo": lambda a: {"imgsz": a.imgsz, "epochs": 3, "tta": False},  # 3 x 320 iterations of 4
    "detectron": lambda a: {"imgsz": a.imgsz, "max_iter": 300, "eval_period": 300, "checkpoint_period": 1000, "tta": False},
    "effdet": lambda a: {"imgsz": a.imgsz, "epochs": 1, "tta": False},  # 640 iterations of 2
    "classifier": lambda a: {"imgsz": a.imgsz, "epochs": 2, "tta": False},  # 2 x 320 iterations of 4
}
# Without `make weights` the full profiles start from scratch; FrozenBN R101 cannot (it diverges).
FROM_SCRATCH = {
    "detectron": {"weights": None, "norm": "GN", "head_norm": "GN", "freeze_at": 0,
                  "pixel_mean": [128, 128, 128], "pixel_std": [64, 64, 64]},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(models.names()))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--n-train", type=int, default=1600)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs CUDA")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data = DataFolder(generate(SynthConfig(out=f"{tmp}/data", n_train=a.n_train, n_test=200, size=a.imgsz, seed=0)))
        folds = make_folds(data.labels, n_folds=5, seed=0)
        write_table(folds, f"{tmp}/folds.csv")
        n_fit = int((folds["fold"] != 0).sum())
        for name in a.models.split(","):
            adapter = models.adapter(name)
            profile = Path("models") / name / "full.yaml"
            overrides = OVERRIDES.get(name, lambda a: {"imgsz": a.imgsz})(a)
            cfg = load(adapter.Config, profile, overrides)
            if cfg.weights and not Path(cfg.weights).is_file():
                print(f"{name}: {cfg.weights} not found (make weights): timing from scratch", flush=True)
                cfg = load(adapter.Config, profile, {**overrides, "weights": None, **FROM_SCRATCH.get(name, {})})
            out = Path(tmp) / "run" / name / "fold0"
            out.mkdir(parents=True)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            adapter.train(cfg, data, folds, 0, out)
            train_s = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30
            start = time.perf_counter()
            adapter.predict(cfg, data, folds, 0, out)
            pred_s = time.perf_counter() - start
            n_pred = int((folds["fold"] == 0).sum()) + len(data.test_ids())
            seen = cfg.max_iter * cfg.batch if name == "detectron" else n_fit * cfg.epochs
            print(f"{name}: train {seen / train_s:.1f} img/s ({seen} images at {a.imgsz}px incl. validation), "
                  f"peak {peak:.1f} GiB; predict {n_pred / pred_s:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
