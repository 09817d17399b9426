"""GPU hours of the full profiles BEFORE any card has run them: estimates from the frameworks' own published
speed figures, through the same 5-fold formula as ``bench/gpu_check.py`` (which replaces them with measured ones).

    .venv/bin/python bench/cost_estimate.py [--card A100|T4|H100]

Every figure below is an ESTIMATE (expect +-50%): a published training speed of the same network family on
another card, scaled to our input size by pixels (and by published FLOPs where the network differs), then to
the card by an assumed factor. Prediction is assumed 3x the training speed (no backward pass, AMP). Replace
them with ``bash bench/gpu_check.sh`` on the card you rent: it prints the same table from measured images/s.

Sources (numbers as published):
- detectron2 MODEL_ZOO.md, Faster R-CNN R101-FPN 3x: 0.286 s/iter on 8 V100 at 16 images per iteration,
  FP32, ~1333x800 px: 7.0 images/s per V100 at ~1.07 MP (our 1024x1024: 1.05 MP).
  https://github.com/facebookresearch/detectron2/blob/main/MODEL_ZOO.md
- ultralytics YOLOv5 README (2020): YOLOv5x trains 300 COCO epochs (118,287 images) in 8 days on one V100 at
  640 px with AMP: 51 images/s. YOLOv8x / YOLOv5x FLOPs at 640: 257.8 / 205.7 B (ultralytics docs' model tables).
  https://github.com/ultralytics/yolov5 (README "Training"), https://docs.ultralytics.com/models/yolov8/
- timm results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv: tf_efficientnet_b5 92.2 images/s at 456 px,
  tf_efficientnet_b4 194.8 images/s at 380 px (RTX 3090, AMP).
  https://github.com/huggingface/pytorch-image-models/tree/main/results
- EfficientDet paper (Tan et al. 2020, Table 2): D4 55 B FLOPs at 1024 px; EfficientNet-B4 4.2 B at 380 px
  (EfficientNet paper): the D4 head and BiFPN cost 55 / (4.2 x (1024/380)^2) = 1.8x its backbone at 1024.
Card factors (assumptions, not measured): A100 = 2.0 x V100 and 1.3 x RTX 3090 for AMP training of these
convnets; H100 = 1.6 x A100; T4 = 0.22 x A100.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.config import load  # noqa: E402
from bench.gpu_check import FORMULA, Schedule, five_fold_hours  # noqa: E402
from models import adapter  # noqa: E402

A100_PER = {"V100": 2.0, "RTX3090": 1.3}
CARDS = {"A100": 1.0, "H100": 1.6, "T4": 0.22}
PREDICT_OVER_TRAIN = 3.0


def a100_train_ips() -> dict[str, tuple[float, str]]:
    """Training images/s per A100 at each full profile's size, and how it was derived."""
    d2 = 2 * 8 / 0.286 / 8 * A100_PER["V100"]
    yolo = 300 * 118_287 / (8 * 86_400) * (205.7 / 257.8) * (640 / 1024) ** 2 * A100_PER["V100"]
    cls = 92.16 * (456 / 768) ** 2 * A100_PER["RTX3090"]
    effdet = 194.83 * (380 / 1024) ** 2 / (55 / (4.2 * (1024 / 380) ** 2)) * A100_PER["RTX3090"]
    return {
        "yolo": (yolo, "YOLOv5x V100 51 img/s at 640, x FLOPs v5x/v8x, x (640/1024)^2, x 2.0"),
        "detectron": (d2, "detectron2 zoo R101-FPN 7.0 img/s per V100, x 2.0"),
        "effdet": (effdet, "timm B4 195 img/s at 380 (3090), x (380/1024)^2, / 1.8 (BiFPN+heads), x 1.3"),
        "classifier": (cls, "timm B5 92 img/s at 456 (3090), x (456/768)^2, x 1.3"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card", default="A100", choices=sorted(CARDS))
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    print(f"ESTIMATES for one {a.card} (not measured; bash bench/gpu_check.sh measures them):\n{FORMULA}\n")
    print(f"{'profile':<16} {'train img/s':>11} {'5-fold h':>9}  derivation (per A100, then x {CARDS[a.card]:g} for {a.card})")
    total = 0.0
    for name, (ips, how) in a100_train_ips().items():
        cfg = load(adapter(name).Config, root / "models" / name / "full.yaml")
        train = ips * CARDS[a.card]
        hours = five_fold_hours(Schedule.of(name, cfg), train, train * PREDICT_OVER_TRAIN).total_h
        total += hours
        print(f"{name + ' full':<16} {train:>11.1f} {hours:>9.1f}  {how}")
    print(f"{'4 x 5 folds':<16} {'':>11} {total:>9.1f}  the pipeline's oof on one card (make all-oof; cards in "
          f"parallel divide it)")


if __name__ == "__main__":
    main()
