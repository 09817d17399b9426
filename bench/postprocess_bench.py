"""Post-processing wall time at competition scale (prints figures; not a test).

3,000 test images x 3 models x 5 folds, ~100 boxes per image per model-fold, built around the real
PhysioNet test labels when given (``--labels``), else around random boxes. Times, on this machine:
WBF of the 5 folds per model, WBF of the 3 models, the classifier gate, and the mAP@0.4.

    .venv/bin/python bench/postprocess_bench.py [--labels ../shared/data/.../annotations_test.csv] [--images 3000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from cxr.labels import read_physionet_labels
from cxr.metric import ground_truth, mean_average_precision
from cxr.wbf import fuse_predictions
from ensemble.ensemble import GateParams, gate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--labels", help="PhysioNet annotations_test.csv (real test labels); random boxes without it")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--boxes", type=int, default=100)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    if a.labels:
        gt = ground_truth(read_physionet_labels(a.labels))
        ids = sorted(gt["image_id"].unique())[: a.images]
        gt = gt[gt["image_id"].isin(ids)]
    else:
        ids = [f"img{i:05d}" for i in range(a.images)]
        gt = pd.DataFrame({"image_id": ids, "class_id": rng.integers(0, 15, len(ids))})
        gt[["x_min", "y_min"]] = rng.uniform(0, 1000, (len(ids), 2))
        gt[["x_max", "y_max"]] = gt[["x_min", "y_min"]].to_numpy() + rng.uniform(50, 500, (len(ids), 2))
        gt.loc[gt["class_id"] == 14, ["x_min", "y_min", "x_max", "y_max"]] = [0, 0, 1, 1]
    sizes = pd.DataFrame({"image_id": ids, "width": 3000, "height": 3000})
    gt[["x_max", "y_max"]] = gt[["x_max", "y_max"]].clip(upper=3000)
    start = time.perf_counter()
    per_model_folds = [[make_table(gt, sizes, a.boxes, rng) for _ in range(a.folds)] for _ in range(a.models)]
    t_make = time.perf_counter() - start
    n_boxes = sum(len(t) for m in per_model_folds for t in m)
    start = time.perf_counter()
    per_model = [fuse_predictions(folds, sizes) for folds in per_model_folds]
    t_folds = time.perf_counter() - start
    start = time.perf_counter()
    fused = fuse_predictions(per_model, sizes, weights=[2, 1, 1][: a.models], iou_thr=0.5, conf_type="avg")
    t_models = time.perf_counter() - start
    p_abnormal = pd.Series(rng.uniform(0, 1, len(ids)), index=ids)
    start = time.perf_counter()
    gated = gate(fused, p_abnormal, GateParams("hard", 0.3, 0.9))
    t_gate = time.perf_counter() - start
    start = time.perf_counter()
    result = mean_average_precision(gt, gated, ids)
    t_metric = time.perf_counter() - start
    print(f"{a.images} images x {a.models} models x {a.folds} folds, {n_boxes:,} input boxes (built in {t_make:.1f} s)")
    print(f"WBF folds per model {t_folds:7.1f} s | WBF across models {t_models:6.1f} s | gate {t_gate:5.2f} s | "
          f"mAP@0.4 {t_metric:5.1f} s | total {t_folds + t_models + t_gate + t_metric:7.1f} s (mAP {result['map']:.3f})")


def make_table(gt: pd.DataFrame, sizes: pd.DataFrame, boxes: int, rng: np.random.Generator) -> pd.DataFrame:
    """~``boxes`` predictions per image: jittered copies of its ground truth (a quarter at most), the rest noise."""
    wh = sizes.set_index("image_id")[["width", "height"]]
    findings = gt[gt["class_id"] != 14]
    reps = max(1, boxes // 4 // max(1, int(findings.groupby("image_id").size().mean() if len(findings) else 1)))
    near = findings.loc[findings.index.repeat(reps)]
    b = near[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float)
    b = b + rng.normal(0, 0.05, b.shape) * np.tile(b[:, 2:] - b[:, :2], 2)
    true = pd.DataFrame(b, columns=["x_min", "y_min", "x_max", "y_max"])
    true.insert(0, "image_id", near["image_id"].to_numpy())
    true.insert(1, "class_id", near["class_id"].to_numpy())
    true.insert(2, "score", rng.uniform(0.2, 1, len(true)))
    ids = np.repeat(wh.index.to_numpy(), boxes - boxes // 4)
    w = np.repeat(wh["width"].to_numpy(), boxes - boxes // 4)
    h = np.repeat(wh["height"].to_numpy(), boxes - boxes // 4)
    xy = rng.uniform(0, 0.8, (len(ids), 2)) * np.column_stack([w, h])
    size = rng.uniform(0.03, 0.2, (len(ids), 2)) * np.column_stack([w, h])
    noise = pd.DataFrame(np.column_stack([xy, xy + size]), columns=["x_min", "y_min", "x_max", "y_max"])
    noise.insert(0, "image_id", ids)
    noise.insert(1, "class_id", rng.integers(0, 14, len(ids)))
    noise.insert(2, "score", rng.uniform(0, 0.3, len(ids)))
    table = pd.concat([true, noise], ignore_index=True)
    table[["x_min", "y_min"]] = table[["x_min", "y_min"]].clip(lower=0)
    table[["x_max", "y_max"]] = table[["x_max", "y_max"]].clip(upper=3000)
    return table[(table["x_max"] > table["x_min"]) & (table["y_max"] > table["y_min"])].reset_index(drop=True)


if __name__ == "__main__":
    main()
