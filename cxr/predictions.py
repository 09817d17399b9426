"""The one prediction format: every model writes it, the ensemble and the metric read it.

A table (CSV, or Parquet when the path ends in ``.parquet``) with columns
``image_id, class_id, score, x_min, y_min, x_max, y_max``: one row per box, ORIGINAL
pixels, ``class_id`` in 0..14 (14 = No finding, box ``0 0 1 1``), ``score`` in [0, 1].
An image with no row has no predicted box; the list of images a table covers travels
separately (fold file or meta file), because an empty image leaves no row behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES, PREDICTION_COLUMNS
from cxr.io import DataError, csv_row, read_table, require_columns, write_table


def validate(df: pd.DataFrame, path: str | os.PathLike = "<predictions>", sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Check a prediction table and return it with canonical dtypes and column order.

    ``sizes`` (``image_id, width, height``) additionally checks that boxes lie inside
    their image, which catches predictions left in resized pixels.
    """
    require_columns(df, PREDICTION_COLUMNS, path)
    df = df[PREDICTION_COLUMNS].copy()
    df["image_id"] = df["image_id"].astype(str)
    num = df[["class_id", "score", *BOX_COLUMNS]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    cls, score, b = num[:, 0], num[:, 1], num[:, 2:]
    checks = [
        (~np.isin(cls, np.arange(NUM_CLASSES)), "class_id", "not one of 0..14"),
        (~((score >= 0) & (score <= 1)), "score", "not in [0, 1]"),
        (~np.isfinite(b).all(axis=1), "box", "not four finite numbers"),
        (~((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])), "box", "needs x_min < x_max and y_min < y_max"),
        ((b[:, 0] < 0) | (b[:, 1] < 0), "box", "negative coordinate"),
        ((cls == NO_FINDING) & ~(b == np.array(NO_FINDING_BOX)).all(axis=1), "box", "No finding must be 0 0 1 1"),
    ]
    if sizes is not None:
        known = sizes.set_index("image_id")
        missing = ~df["image_id"].isin(known.index).to_numpy()
        checks.append((missing, "image_id", "has no known size"))
        w = df["image_id"].map(known["width"]).to_numpy(dtype=float)
        h = df["image_id"].map(known["height"]).to_numpy(dtype=float)
        checks.append((~missing & ((b[:, 2] > w + 1) | (b[:, 3] > h + 1)), "box", "outside the image"))
    for bad, what, message in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = df.iloc[i][["image_id", "class_id", "score", *BOX_COLUMNS]].tolist()
            raise DataError(path, f"{what} {message}: {value}", csv_row(i))
    df["class_id"] = cls.astype(int)
    df["score"] = score
    df[BOX_COLUMNS] = b
    return df.reset_index(drop=True)


def read_predictions(path: str | os.PathLike, sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    return validate(read_table(path, dtype={"image_id": str}), path, sizes)


def write_predictions(df: pd.DataFrame, path: str | os.PathLike, sizes: pd.DataFrame | None = None) -> Path:
    """Validate, then write atomically (a crashed model never leaves a half table)."""
    return write_table(validate(df, path, sizes), path)
