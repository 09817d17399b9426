"""``ensemble tune`` at full scale: the 15,000 real train images, 3 models' OOF, 5 folds, nested OOF
(prints figures; not a test). Target: at most 10 minutes on 2 cores.

Ground truth, image sizes and folds are the real Kaggle train labels (the five staged fold files,
fused like ``cxr.metric`` does), so the image count and box statistics are the real ones; each
model's OOF is ~100 boxes per image (most true boxes found, the rest false positives with the real
class mix, :func:`detector_oof`), each with its No-finding row, and the classifier's p_abnormal is
a noisy copy of the truth. Runs :func:`ensemble.ensemble.tune` exactly as ``make ensemble`` does.

    .venv/bin/python bench/tune_bench.py [--images 15000] [--jobs 2] [--boxes 100]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.labels import read_sizes, read_train_labels
from cxr.metric import ground_truth
from ensemble.ensemble import tune

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vindr-cxr-train-annotations" / "nhtlongcs"


def real_train(n_images: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(fused ground truth, sizes, folds) of the first ``n_images`` real train images."""
    rows = pd.concat([pd.read_csv(p, dtype={"image_id": str}) for p in sorted((SHARED / "data" / "folds").glob("*/*_val.csv"))])
    ids = sorted(rows["image_id"].unique())[:n_images]
    rows = rows[rows["image_id"].isin(set(ids))]
    sizes = read_sizes(SHARED / "datasets" / "train_info.csv")
    sizes = sizes[sizes["image_id"].isin(set(ids))].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        rows[["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]].to_csv(path, index=False)
        gt = ground_truth(read_train_labels(path, sizes))
    folds = rows.groupby("image_id")["fold"].first().reset_index()
    return gt, sizes, folds


def detector_oof(gt: pd.DataFrame, sizes: pd.DataFrame, boxes: int, rng: np.random.Generator) -> pd.DataFrame:
    """~``boxes`` rows per image like a detector at a low score threshold: 70% of the true boxes found
    (jittered by 10% of their size, score 0.3-1), the rest false positives drawn with the real class
    frequencies (score 0-0.4), sized like the true boxes of their class."""
    wh = sizes.set_index("image_id")[["width", "height"]]
    findings = gt[gt["class_id"] != 14]
    found = findings[rng.uniform(size=len(findings)) < 0.7]
    b = found[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float)
    b = b + rng.normal(0, 0.1, b.shape) * np.tile(b[:, 2:] - b[:, :2], 2)
    true = pd.DataFrame({"image_id": found["image_id"].to_numpy(), "class_id": found["class_id"].to_numpy(),
                         "score": rng.uniform(0.3, 1, len(found))})
    true[["x_min", "y_min", "x_max", "y_max"]] = b
    ids = np.repeat(wh.index.to_numpy(), boxes)
    w, h = (np.repeat(wh[c].to_numpy(dtype=float), boxes) for c in ("width", "height"))
    pick = rng.integers(0, len(findings), len(ids))  # a true box of any image: real class mix and sizes
    size = (findings[["x_max", "y_max"]].to_numpy(float) - findings[["x_min", "y_min"]].to_numpy(float))[pick]
    rel = size / findings["image_id"].map(wh["width"]).to_numpy(float)[pick, None]
    xy = rng.uniform(0, 1, (len(ids), 2)) * np.column_stack([w, h]) * (1 - rel)
    noise = pd.DataFrame({"image_id": ids, "class_id": findings["class_id"].to_numpy()[pick], "score": rng.uniform(0, 0.4, len(ids))})
    noise[["x_min", "y_min", "x_max", "y_max"]] = np.column_stack([xy, xy + rel * np.column_stack([w, h])])
    t = pd.concat([true, noise], ignore_index=True)
    t[["x_min", "y_min"]] = t[["x_min", "y_min"]].clip(lower=0)
    t["x_max"] = t["x_max"].clip(upper=t["image_id"].map(wh["width"]))
    t["y_max"] = t["y_max"].clip(upper=t["image_id"].map(wh["height"]))
    return t[(t["x_max"] > t["x_min"] + 1) & (t["y_max"] > t["y_min"] + 1)].reset_index(drop=True)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=15000)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--boxes", type=int, default=100, help="boxes per image per model")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-nested", action="store_true", help="tune without the per-fold searches")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    gt, sizes, folds = real_train(a.images)
    ids = folds["image_id"].tolist()
    normal = gt.groupby("image_id")["class_id"].min() == 14
    tables = []
    for _ in range(a.models):
        t = detector_oof(gt, sizes, a.boxes, rng)
        nf = pd.DataFrame({"image_id": ids, "class_id": 14, "score": np.clip(normal.reindex(ids).to_numpy() * 0.5
                                                                             + rng.uniform(0, 0.5, len(ids)), 0, 1)})
        nf[["x_min", "y_min", "x_max", "y_max"]] = [0.0, 0.0, 1.0, 1.0]
        tables.append(pd.concat([t, nf], ignore_index=True))
    p_abnormal = pd.Series(np.clip(np.where(normal.reindex(ids), 0.2, 0.8) + rng.normal(0, 0.2, len(ids)), 0, 1), index=ids)
    n_boxes = sum(map(len, tables))
    print(f"{len(ids)} real train images ({len(gt)} fused truth boxes, {folds['fold'].nunique()} folds) x {a.models} models, "
          f"{n_boxes:,} OOF rows (built in {time.perf_counter() - start:.0f} s); {a.jobs} processes")
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    params, search = tune(tables, [f"m{i}" for i in range(a.models)], gt, ids, sizes, p_abnormal,
                          folds=None if a.no_nested else folds, jobs=a.jobs)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start  # this process + the finished worker processes
    print(f"ensemble tune: {wall:.0f} s ({wall / 60:.1f} min, target 10 min) for {len(search)} candidates"
          f"{'' if a.no_nested else ' + nested searches'}; chosen {params.fusion} {params.gate}")
    print(f"CPU time of all processes {cpu:.0f} s: on {a.jobs} idle cores the wall time would be about "
          f"{cpu / a.jobs:.0f} s ({cpu / a.jobs / 60:.1f} min); this machine's load average now {os.getloadavg()[0]:.1f}")
    print(f"OOF mAP in-sample {params.oof_map} | nested {params.nested_map}")


if __name__ == "__main__":
    main()
