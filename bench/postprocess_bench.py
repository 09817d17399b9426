"""Test-time post-processing at competition scale (prints figures; not a test).

3,000 test images x 3 models x 5 folds, ~100 boxes per image per model-fold, built around the real
PhysioNet test labels when found (``--labels``), else around random boxes. Times, on this machine,
the path ``make submission`` takes: WBF of the 5 folds per model (``python -m models MODEL merge``),
then :func:`ensemble.ensemble.apply` (WBF across the 3 models + classifier gate), then the checked
Kaggle submission; the mAP@0.4 of the result is timed apart. Target: fusion + gate + submission
of 3,000 images in at most 30 s.

    .venv/bin/python bench/postprocess_bench.py [--labels .../annotations_test.csv] [--images 3000]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.labels import read_physionet_labels
from cxr.metric import ground_truth, mean_average_precision
from cxr.submission import check_submission, write_submission
from cxr.wbf import fuse_predictions
from ensemble.ensemble import FusionParams, GateParams, Params, apply

REPO = Path(__file__).resolve().parents[1]
TEST_LABELS = REPO.parent / "shared" / "data" / "vindr-cxr-test-annotations/Tuprott991/vindr_physionet_384/annotations_test.csv"


def default_labels() -> str | None:
    """The real PhysioNet test labels when staged beside the repo (never copied into it)."""
    return str(TEST_LABELS) if TEST_LABELS.exists() else None


def make_truth(labels: str | None, n_images: int, rng: np.random.Generator) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(ground truth, image ids, sizes): the first ``n_images`` of the real test labels, else random boxes."""
    if labels:
        gt = ground_truth(read_physionet_labels(labels))
        ids = sorted(gt["image_id"].unique())[:n_images]
        gt = gt[gt["image_id"].isin(ids)]
    else:
        ids = [f"img{i:05d}" for i in range(n_images)]
        gt = pd.DataFrame({"image_id": ids, "class_id": rng.integers(0, 15, len(ids))})
        gt[["x_min", "y_min"]] = rng.uniform(0, 1000, (len(ids), 2))
        gt[["x_max", "y_max"]] = gt[["x_min", "y_min"]].to_numpy() + rng.uniform(50, 500, (len(ids), 2))
        gt.loc[gt["class_id"] == 14, ["x_min", "y_min", "x_max", "y_max"]] = [0, 0, 1, 1]
    sizes = pd.DataFrame({"image_id": ids, "width": 3000, "height": 3000})
    gt = gt.copy()
    gt[["x_max", "y_max"]] = gt[["x_max", "y_max"]].clip(upper=3000)
    return gt, ids, sizes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--labels", default=default_labels(), help="PhysioNet annotations_test.csv (real test labels); random boxes without it")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--boxes", type=int, default=100)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    gt, ids, sizes = make_truth(a.labels, a.images, rng)
    start = time.perf_counter()
    per_model_folds = [[make_table(gt, sizes, a.boxes, rng) for _ in range(a.folds)] for _ in range(a.models)]
    t_make = time.perf_counter() - start
    n_boxes = sum(len(t) for m in per_model_folds for t in m)
    start, cpu = time.perf_counter(), time.process_time()
    per_model = [fuse_predictions(folds, sizes) for folds in per_model_folds]
    t_folds = time.perf_counter() - start
    p_abnormal = pd.Series(rng.uniform(0, 1, len(ids)), index=ids)
    params = Params(FusionParams([f"m{i}" for i in range(a.models)], [2.0] + [1.0] * (a.models - 1), 0.5, 0.0, "avg"),
                    GateParams("hard", 0.3, 0.9))
    start = time.perf_counter()
    test = apply(params, per_model, sizes, p_abnormal)
    t_apply = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample_submission.csv"
        pd.DataFrame({"image_id": ids, "PredictionString": "14 1 0 0 1 1"}).to_csv(sample, index=False)
        start = time.perf_counter()
        out = write_submission(test, ids, Path(tmp) / "submission.csv")
        problems = check_submission(out, sample, sizes)
        t_sub = time.perf_counter() - start
    start, metric_cpu = time.perf_counter(), time.process_time()
    result = mean_average_precision(gt, test, ids)
    t_metric = time.perf_counter() - start
    t_metric_cpu = time.process_time() - metric_cpu
    total = t_folds + t_apply + t_sub
    cpu = time.process_time() - cpu - t_metric_cpu
    print(f"{a.images} images x {a.models} models x {a.folds} folds, {n_boxes:,} input boxes "
          f"({'real PhysioNet test labels' if a.labels else 'random truth'}; built in {t_make:.1f} s)")
    print(f"WBF folds per model {t_folds:6.1f} s | ensemble.apply (WBF across models + hard gate) {t_apply:5.1f} s | "
          f"submission write + check {t_sub:5.1f} s{' (' + str(len(problems)) + ' problems)' if problems else ''}")
    print(f"fusion + gate + submission: {total:.1f} s wall, {cpu:.1f} s CPU (one process: the wall time on an idle core; "
          f"target 30 s); load average {os.getloadavg()[0]:.1f} | {len(test):,} rows | mAP@0.4 {result['map']:.3f} in {t_metric:.1f} s")


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
    table["x_max"] = table["x_max"].clip(upper=table["image_id"].map(wh["width"]))
    table["y_max"] = table["y_max"].clip(upper=table["image_id"].map(wh["height"]))
    return table[(table["x_max"] > table["x_min"]) & (table["y_max"] > table["y_min"])].reset_index(drop=True)


if __name__ == "__main__":
    main()
