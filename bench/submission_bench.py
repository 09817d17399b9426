"""Time the submission checker and parser on a Kaggle-sized file: 3,000 test images, 100k boxes.

    .venv/bin/python bench/submission_bench.py [--boxes 100000] [--images 3000]

Prints seconds for `check_submission` without and with `--sizes` and for `read_submission`.
Goal: checking 100k boxes takes under a second. Not a test: timings depend on the
machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.predictions import validate
from cxr.submission import EMPTY_PREDICTION, check_submission, format_predictions, read_submission


def make_files(root: Path, n_boxes: int, n_images: int, seed: int = 0) -> tuple[Path, Path, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"{i:032x}" for i in range(n_images)]
    sizes = pd.DataFrame({"image_id": ids, "width": rng.integers(1800, 3000, n_images),
                          "height": rng.integers(2000, 3100, n_images)})
    img = rng.integers(0, n_images, n_boxes)
    w, h = sizes["width"].to_numpy()[img], sizes["height"].to_numpy()[img]
    x0, y0 = rng.uniform(0, 0.8, n_boxes) * w, rng.uniform(0, 0.8, n_boxes) * h
    preds = pd.DataFrame({
        "image_id": np.array(ids)[img], "class_id": rng.integers(0, 14, n_boxes), "score": rng.uniform(0, 1, n_boxes),
        "x_min": x0, "y_min": y0, "x_max": x0 + rng.uniform(0.05, 0.2, n_boxes) * w,
        "y_max": y0 + rng.uniform(0.05, 0.2, n_boxes) * h,
    })
    sub, sample = root / "sub.csv", root / "sample.csv"
    format_predictions(validate(preds), ids).to_csv(sub, index=False)
    pd.DataFrame({"image_id": ids, "PredictionString": EMPTY_PREDICTION}).to_csv(sample, index=False)
    return sub, sample, sizes


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, default=100_000)
    p.add_argument("--images", type=int, default=3_000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sub, sample, sizes = make_files(Path(tmp), a.boxes, a.images)
        t_plain, problems = timed(lambda: check_submission(sub, sample))
        assert problems == [], problems[:3]
        t_sizes, problems = timed(lambda: check_submission(sub, sample, sizes))
        assert problems == [], problems[:3]
        t_read, preds = timed(lambda: read_submission(sub, sizes))
    print(f"{a.boxes} boxes on {a.images} images")
    print(f"check_submission             {t_plain:.3f} s")
    print(f"check_submission --sizes     {t_sizes:.3f} s")
    print(f"read_submission (validated)  {t_read:.3f} s  ({len(preds)} boxes)")


if __name__ == "__main__":
    main()
