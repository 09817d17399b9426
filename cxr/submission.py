"""Kaggle submission: write from the prediction format, parse back, and check.

``image_id,PredictionString`` with ``class score x_min y_min x_max y_max`` groups in
original pixels, every test id exactly once; an image with no prediction gets
``14 1 0 0 1 1`` (the No-finding row), as in Kaggle's sample_submission.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES, PREDICTION_COLUMNS, SUBMISSION_COLUMNS
from cxr.io import DataError, csv_row, read_table, write_table
from cxr.predictions import validate

EMPTY_PREDICTION = f"{NO_FINDING} 1 0 0 1 1"


def format_predictions(preds: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    """Prediction table -> submission table with one row per id in ``image_ids`` (in that order)."""
    preds = preds.sort_values(["image_id", "score"], ascending=[True, False], kind="stable")
    strings = {}
    for image_id, g in preds.groupby("image_id", sort=False):
        parts = [
            f"{c} {s:.6f} {x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f}" if c != NO_FINDING else f"{c} {s:.6f} 0 0 1 1"
            for c, s, x0, y0, x1, y1 in zip(g["class_id"], g["score"], *(g[c] for c in BOX_COLUMNS))
        ]
        strings[image_id] = " ".join(parts)
    extra = set(strings) - set(image_ids)
    if extra:
        raise ValueError(f"predictions for {len(extra)} image(s) outside the submission ids, e.g. {sorted(extra)[:3]}")
    return pd.DataFrame({"image_id": image_ids, "PredictionString": [strings.get(i, EMPTY_PREDICTION) for i in image_ids]})


def write_submission(preds: pd.DataFrame, image_ids: list[str], path: str | os.PathLike) -> Path:
    return write_table(format_predictions(preds, image_ids), path)


def parse_prediction_string(text: str) -> list[tuple[int, float, float, float, float, float]]:
    """Split one PredictionString into (class, score, x0, y0, x1, y1) groups; ValueError when malformed."""
    tokens = str(text).split()
    if not tokens or len(tokens) % 6:
        raise ValueError(f"{len(tokens)} values, not a positive multiple of 6")
    groups = []
    for k in range(0, len(tokens), 6):
        c, *rest = tokens[k : k + 6]
        if not c.isdigit() or int(c) >= NUM_CLASSES:
            raise ValueError(f"class {c!r} (group {k // 6 + 1}) is not one of 0..{NUM_CLASSES - 1}")
        try:
            values = [float(v) for v in rest]
        except ValueError:
            raise ValueError(f"non-number in group {k // 6 + 1}: {tokens[k:k + 6]}") from None
        groups.append((int(c), *values))
    return groups


def read_submission(path: str | os.PathLike, sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Parse a submission into the prediction format (validated); a malformed row is a DataError."""
    df = read_table(path, dtype={"image_id": str, "PredictionString": str}, keep_default_na=False)
    rows = []
    for i, (image_id, text) in enumerate(zip(df["image_id"], df["PredictionString"])):
        try:
            rows += [(image_id, *g) for g in parse_prediction_string(text)]
        except ValueError as e:
            raise DataError(path, f"PredictionString of {image_id}: {e}", csv_row(i)) from None
    return validate(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), path, sizes)


def check_submission(path: str | os.PathLike, sample: str | os.PathLike, sizes: pd.DataFrame | None = None) -> list[str]:
    """Every problem of a submission file against Kaggle's sample_submission; empty when valid."""
    try:
        df = read_table(path, dtype={"image_id": str, "PredictionString": str}, keep_default_na=False)
        expected = read_table(sample, dtype={"image_id": str})["image_id"]
    except DataError as e:
        return [str(e)]
    if list(df.columns) != SUBMISSION_COLUMNS:
        return [f"{path}: columns must be {SUBMISSION_COLUMNS}, got {list(df.columns)}"]
    problems = []
    counts = df["image_id"].value_counts()
    problems += [f"{path}: image_id {i!r} appears {n} times" for i, n in counts[counts > 1].items()]
    problems += [f"{path}: image_id {i!r} is not a test id" for i in sorted(set(df["image_id"]) - set(expected))]
    problems += [f"{path}: test id {i!r} is missing" for i in sorted(set(expected) - set(df["image_id"]))]
    known = sizes.set_index("image_id") if sizes is not None else None
    largest = -1.0  # largest finding coordinate: <= 1 everywhere means boxes were left normalized
    for i, (image_id, text) in enumerate(zip(df["image_id"], df["PredictionString"])):
        where = f"{path}, row {csv_row(i)} ({image_id})"
        try:
            groups = parse_prediction_string(text)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        for c, s, x0, y0, x1, y1 in groups:
            box = (x0, y0, x1, y1)
            largest = max(largest, x1, y1) if c != NO_FINDING else largest
            if not (0 <= s <= 1):
                problems.append(f"{where}: score {s} not in [0, 1]")
            if c == NO_FINDING and box != NO_FINDING_BOX:
                problems.append(f"{where}: No finding must be '14 p 0 0 1 1', got box {box}")
            elif c != NO_FINDING and not (0 <= x0 < x1 and 0 <= y0 < y1):
                problems.append(f"{where}: class {c} box {box} needs 0 <= x_min < x_max and 0 <= y_min < y_max")
            elif c != NO_FINDING and known is not None and image_id in known.index:
                w, h = known.loc[image_id, ["width", "height"]]
                if x1 > w + 1 or y1 > h + 1:
                    problems.append(f"{where}: class {c} box {box} outside the {w}x{h} original image")
        if len(problems) > 200:
            problems.append("... (stopped after 200 problems)")
            break
    if 0 <= largest <= 1:
        problems.append(f"{path}: every finding box lies in [0, 1]: normalized coordinates, not original pixels")
    return problems

