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
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES, PREDICTION_COLUMNS
from cxr.io import DataError, check_ids, csv_row, read_table, require_columns, show, show_values, write_table


# Problems Kaggle's scorer accepts (it scores the box as written): with ``warn`` they are reported, not refused.
SCORABLE = ("negative coordinate", "outside the image", "No finding must be 0 0 1 1")


def validate(
    df: pd.DataFrame,
    path: str | os.PathLike = "<predictions>",
    sizes: pd.DataFrame | None = None,
    warn: Callable[[str], None] | None = None,
    lines: np.ndarray | None = None,
) -> pd.DataFrame:
    """Check a prediction table and return it with canonical dtypes and column order.

    ``sizes`` (``image_id, width, height``) additionally checks that boxes lie inside
    their image, which catches predictions left in resized pixels. With ``warn``, the
    problems Kaggle's scorer still scores (:data:`SCORABLE`) go to ``warn`` (count and
    first row) instead of raising; everything else is always a :class:`DataError`.
    ``lines``: the file's line of each row, for a table parsed from a submission (many boxes
    on one line); default: the row's own CSV line (:func:`cxr.io.csv_row`).
    """
    require_columns(df, PREDICTION_COLUMNS, path)
    df = df[PREDICTION_COLUMNS].copy()
    check_ids(df["image_id"], path)
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
        outside = ~missing & (cls != NO_FINDING) & ((b[:, 2] > w + 1) | (b[:, 3] > h + 1))
        checks.append((outside, "box", "outside the image"))
    for bad, what, message in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = csv_row(i) if lines is None else int(lines[i])
            value = show_values(df.iloc[i][["image_id", "class_id", "score", *BOX_COLUMNS]])
            if warn is not None and message in SCORABLE:
                warn(f"{path}, row {row}: {int(bad.sum())} box(es) with {what} {message} "
                     f"(scored as written, like Kaggle), e.g. {value}")
                continue
            raise DataError(path, f"{what} {message}: {value}", row)
    df["class_id"] = cls.astype(int)
    df["score"] = score
    df[BOX_COLUMNS] = b
    return df.reset_index(drop=True)


NORMALIZED = "normalized coordinates, not original pixels"


def normalized_boxes(class_id: np.ndarray, boxes: np.ndarray) -> int:
    """How many finding boxes there are when every one lies in [0, 1] (a table left in normalized
    coordinates, which Kaggle scores as pixels: nearly nothing matches); 0 otherwise."""
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    b = b[(np.asarray(class_id) != NO_FINDING) & np.isfinite(b).all(axis=1)]
    return len(b) if len(b) and b[:, 2:].max() <= 1 else 0


def read_predictions(path: str | os.PathLike, sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    return validate(read_table(path, dtype={"image_id": str}), path, sizes)


def write_predictions(df: pd.DataFrame, path: str | os.PathLike, sizes: pd.DataFrame | None = None) -> Path:
    """Validate, then write atomically (a crashed model never leaves a half table)."""
    return write_table(validate(df, path, sizes), path)


PROBABILITY_COLUMNS = ["image_id", "p_abnormal"]


def read_probabilities(path: str | os.PathLike, image_ids: Sequence[str]) -> pd.Series:
    """The classifier's table ``image_id, p_abnormal`` as a Series indexed by image_id, in ``image_ids`` order.

    Checks: safe ids, one row per image, ``p_abnormal`` a finite number in [0, 1], and a
    row for every id in ``image_ids`` (extra ids are allowed and dropped).
    """
    df = read_table(path, dtype={"image_id": str})
    require_columns(df, PROBABILITY_COLUMNS, path)
    check_ids(df["image_id"], path)
    dup = df["image_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(path, f"image_id {show(df['image_id'].iloc[i])} listed twice", csv_row(i))
    p = pd.to_numeric(df["p_abnormal"], errors="coerce").to_numpy(dtype=float)
    bad = ~((p >= 0) & (p <= 1))  # NaN, inf and text (coerced to NaN) fail too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(path, f"p_abnormal={show(df['p_abnormal'].iloc[i])} is not a probability in [0, 1]", csv_row(i))
    series = pd.Series(p, index=df["image_id"].to_numpy(), name="p_abnormal")
    series.index.name = "image_id"
    missing = [i for i in image_ids if i not in series.index]
    if missing:
        raise DataError(path, f"no p_abnormal for {len(missing)} image(s), e.g. {missing[:3]}")
    return series.loc[list(image_ids)]
