"""cxr.wbf.fuse_predictions against ensemble-boxes called image by image, side by side (prints figures; not a test).

Same tables, same parameters, every conf_type: wall time of each, the speed ratio, and whether
the outputs agree (count, labels, and boxes/scores within 1e-6 of the image size / 1e-6).
Tables: 3 models (or 5 folds) with ~100 boxes per image, jittered copies of the real PhysioNet
test labels when found (``--labels``), else of random boxes (``bench/postprocess_bench.py``).

    .venv/bin/python bench/wbf_bench.py [--images 500] [--tables 3] [--labels .../annotations_test.csv]
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from cxr.wbf import CONF_TYPES, WBF, fuse_predictions, reference_fuse_predictions
from postprocess_bench import default_labels, make_table, make_truth


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--labels", default=default_labels(), help="PhysioNet annotations_test.csv; random boxes without it")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--tables", type=int, default=3, help="models (or folds) to fuse")
    p.add_argument("--boxes", type=int, default=100, help="boxes per image per table")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    gt, ids, sizes = make_truth(a.labels, a.images, rng)
    tables = [make_table(gt, sizes, a.boxes, rng) for _ in range(a.tables)]
    weights = [2.0] + [1.0] * (a.tables - 1)
    print(f"{len(ids)} images x {a.tables} tables, {sum(map(len, tables)):,} boxes "
          f"({'real PhysioNet test labels' if a.labels else 'random truth'}); iou 0.5, skip 0.01, weights {weights}")
    fuse_predictions([t.head(1000) for t in tables], sizes)  # first calls pay numpy's and pandas' warm-up
    ratios = []
    for conf in CONF_TYPES:
        start = time.perf_counter()
        ours = fuse_predictions(tables, sizes, weights, 0.5, 0.01, conf)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = reference_fuse_predictions(tables, sizes, weights, WBF(0.5, 0.01, conf))
        t_ref = time.perf_counter() - start
        key = ["image_id", "class_id", "score", "x_min", "y_min"]
        ours, ref = (d.sort_values(key).reset_index(drop=True) for d in (ours, ref))
        same = (len(ours) == len(ref) and (ours["class_id"].to_numpy() == ref["class_id"].to_numpy()).all()
                and np.allclose(ours["score"], ref["score"], atol=1e-6, rtol=0)
                and np.allclose(ours.iloc[:, 3:].to_numpy(float), ref.iloc[:, 3:].to_numpy(float), atol=1e-6 * 3000, rtol=0))
        ratios.append(t_ref / t_ours)
        print(f"  {conf:24s} cxr.wbf {t_ours:6.2f} s ({1e3 * t_ours / len(ids):5.2f} ms/image) | ensemble-boxes "
              f"{t_ref:6.2f} s ({1e3 * t_ref / len(ids):5.1f} ms/image) | x{t_ref / t_ours:5.1f} | "
              f"{len(ours):,} boxes, {'same' if same else 'DIFFERENT'}")
    print(f"speed ratio vs ensemble-boxes: min x{min(ratios):.1f}, median x{np.median(ratios):.1f} (target x20)")


if __name__ == "__main__":
    main()
