"""Time each stage of ``ensemble.blend`` on Kaggle-sized input: K random submissions of N test images.

    .venv/bin/python bench/blend_bench.py [--images 3000] [--subs 5] [--boxes 30]

Prints seconds per stage (read + check, group fusion, final fusion, gate, write + check, scoring).
The submissions are random boxes over synthetic image sizes, so the mAP is meaningless; only the
times are. Figures are disturbed by anything else running on the machine.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.dataset import NO_FINDING, PREDICTION_COLUMNS
from cxr.io import write_table
from cxr.metric import ground_truth
from cxr.submission import write_submission
from ensemble.blend import WBF, GateConfig, Group, apply_gate, fuse_group, read_input, read_probabilities, score_table


def random_predictions(ids: list[str], sizes: pd.DataFrame, boxes: int, rng: np.random.Generator) -> pd.DataFrame:
    wh = sizes.set_index("image_id").loc[ids, ["width", "height"]].to_numpy(dtype=float)
    n = len(ids) * boxes
    image = np.repeat(np.arange(len(ids)), boxes)
    x0, y0 = rng.uniform(0, 0.7, (2, n))
    bw, bh = rng.uniform(0.05, 0.3, (2, n))
    w, h = wh[image, 0], wh[image, 1]
    preds = pd.DataFrame({
        "image_id": np.asarray(ids)[image], "class_id": rng.integers(0, NO_FINDING, n), "score": rng.uniform(0, 1, n),
        "x_min": x0 * w, "y_min": y0 * h, "x_max": (x0 + bw) * w, "y_max": (y0 + bh) * h,
    })
    normal = pd.DataFrame({"image_id": ids, "class_id": NO_FINDING, "score": rng.uniform(0, 1, len(ids)),
                           "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0})
    return pd.concat([preds, normal], ignore_index=True)[PREDICTION_COLUMNS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--subs", type=int, default=5)
    p.add_argument("--boxes", type=int, default=30, help="finding boxes per image per submission")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"{i:032x}" for i in range(a.images)]
    sizes = pd.DataFrame({"image_id": ids, "width": rng.integers(1800, 3000, a.images),
                          "height": rng.integers(1800, 3000, a.images)})
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_submission(random_predictions(ids, sizes, a.boxes, rng), ids, Path(tmp) / f"s{k}.csv")
                 for k in range(a.subs)]
        probs = pd.DataFrame({"image_id": ids, "target": rng.uniform(0, 1, a.images)})
        gate_path = write_table(probs, Path(tmp) / "p.csv")
        t = time.perf_counter()
        tables = [read_input(path, ids, sizes) for path in paths]
        times[f"read + check {a.subs} submissions"] = time.perf_counter() - t
        t = time.perf_counter()
        group = Group("folds", tables, [1.0] * len(tables), WBF(iou_thr=0.55))
        fused_group = fuse_group(group.tables, sizes, group.wbf, group.weights)
        times[f"group fusion ({a.subs} tables)"] = time.perf_counter() - t
        t = time.perf_counter()
        fused = fuse_group([fused_group, tables[0]], sizes, WBF())
        times["final fusion (2 tables)"] = time.perf_counter() - t
        t = time.perf_counter()
        gated = apply_gate(fused, read_probabilities(GateConfig(path=str(gate_path)), ids), GateConfig(), ids)
        times["read gate + soft gate"] = time.perf_counter() - t
        t = time.perf_counter()
        write_submission(gated, ids, Path(tmp) / "out.csv")
        times["write submission"] = time.perf_counter() - t
        gt = ground_truth(pd.DataFrame({"image_id": ids, "class_id": NO_FINDING, "rad_id": "r",
                                        "x_min": np.nan, "y_min": np.nan, "x_max": np.nan, "y_max": np.nan}))
        t = time.perf_counter()
        score_table([("input", "input", 1.0, tables[0]), ("gated", "gated", np.nan, gated)], gt, ids)
        times["score 2 tables"] = time.perf_counter() - t
    rows = sum(len(x) for x in tables)
    print(f"{a.images} images, {a.subs} submissions, {rows} rows in all, {len(fused)} fused rows")
    for stage, seconds in times.items():
        print(f"  {stage:36s} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
