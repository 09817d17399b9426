"""Kaggle submission: write from the prediction format, parse back, and check.

``image_id,PredictionString`` with ``class score x_min y_min x_max y_max`` groups in
original pixels, every test id exactly once; an image with no prediction gets
``14 1 0 0 1 1`` (the No-finding row), as in Kaggle's sample_submission.

An empty PredictionString means the same in every command (``evaluate``,
``check-submission``, :func:`read_submission`, ``blend``, ``--extra`` models): the image has no
box, not even No finding. Kaggle's format is groups of six per box and zero groups is zero
boxes; its page asks for ``14 1 0 0 1 1`` when nothing is found, which is a box of class 14,
so an empty string scores as no prediction (a normal image's No finding is missed). Our
writers never write one; files from elsewhere (notebooks, other teams) may.

:func:`write_submission` is the one writer (``ensemble submit``, ``blend``,
``predict-images``, ``cxr submission``): coordinates are rounded to :data:`DECIMALS`,
a box that the rounding would leave empty is widened to the smallest valid box, and
the file is checked before it is renamed onto its path, so no invalid file ever lands.
"""
from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES, SUBMISSION_COLUMNS
from cxr.io import DataError, atomic_path, csv_row, read_table, show, write_table
from cxr.predictions import NORMALIZED, normalized_boxes, validate

EMPTY_PREDICTION = f"{NO_FINDING} 1 0 0 1 1"
CLASS_TOKENS = {str(c): c for c in range(NUM_CLASSES)}  # how a class appears in a PredictionString


DECIMALS = 1  # coordinates are written to 0.1 px: far below a pixel, and files stay small
STEP = 10.0 ** -DECIMALS  # the smallest box side the format can hold


def widen_thin_boxes(preds: pd.DataFrame, sizes: pd.DataFrame | None = None) -> tuple[pd.DataFrame, int]:
    """Round finding boxes to :data:`DECIMALS` and widen those left empty (``x_min == x_max`` or
    ``y_min == y_max``) to :data:`STEP`; returns the table and how many boxes were widened.

    A model may emit a box thinner than 0.1 px (EfficientDet gave x 0.0-0.023 on the demo);
    written as is it becomes ``0.0 0.0``, which the format refuses. Widened rather than dropped:
    the box keeps its class and score, so an image whose only box it was does not turn into
    the confident ``14 1 0 0 1 1`` the model never said, and a 0.1 px box matches no ground
    truth at IoU 0.4 exactly as the original did not: the image scores as the model predicted.
    The box grows right/down, or left/up where that would leave the image (``sizes``).
    """
    out = preds.copy()
    finding = out["class_id"].to_numpy() != NO_FINDING
    raw = out[BOX_COLUMNS].to_numpy(dtype=float)
    b = np.round(raw, DECIMALS)
    widened = np.zeros(len(out), dtype=bool)
    for lo, hi, dim in ((0, 2, "width"), (1, 3, "height")):
        thin = finding & (b[:, hi] <= b[:, lo]) & (raw[:, hi] >= raw[:, lo])  # an inverted box is a bug: left to the check
        if not thin.any():
            continue
        limit = np.full(len(out), np.inf)
        if sizes is not None:
            limit = out["image_id"].map(sizes.set_index("image_id")[dim]).to_numpy(dtype=float)
            limit = np.where(np.isnan(limit), np.inf, limit)
        grow_back = thin & (b[:, lo] + STEP > limit)  # at the image's far edge: grow towards 0
        b[thin & ~grow_back, hi] = np.round(b[thin & ~grow_back, lo] + STEP, DECIMALS)
        b[grow_back, lo] = np.round(b[grow_back, hi] - STEP, DECIMALS)
        widened |= thin
    out[BOX_COLUMNS] = np.where(finding[:, None], b, raw)
    return out, int(widened.sum())


def format_predictions(preds: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    """Prediction table -> submission table with one row per id in ``image_ids`` (in that order).

    Coordinates are written with :data:`DECIMALS` decimals; boxes should have been through
    :func:`widen_thin_boxes` (as :func:`write_submission` does), or rounding may empty them.
    """
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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def write_submission(
    preds: pd.DataFrame,
    image_ids: Sequence[str],
    path: str | os.PathLike,
    sample: str | os.PathLike | None = None,
    sizes: pd.DataFrame | None = None,
    warn: Callable[[str], None] = _warn,
) -> Path:
    """Write a checked Kaggle submission of ``preds`` (the prediction format) at ``path``.

    Thin boxes are widened (:func:`widen_thin_boxes`; the count goes to ``warn``), then the
    file is written beside ``path`` and checked (:func:`check_submission`) against ``sample``
    (Kaggle's sample_submission; default: exactly ``image_ids``) and ``sizes``; only a clean
    file is renamed onto ``path``. Otherwise the problems are printed, a :class:`DataError`
    names the first, and ``path`` is left as it was (an older valid file stays, nothing new appears).
    """
    path = Path(path)
    preds, n = widen_thin_boxes(preds, sizes)
    if n:
        warn(f"{path}: {n} box(es) thinner than {STEP:g} px after rounding to {STEP:g} px widened to {STEP:g} px "
             "(they keep class and score; no ground truth matches them at IoU 0.4 either way)")
    with atomic_path(path) as tmp:
        write_table(format_predictions(preds, list(image_ids)), tmp)
        expected = sample if sample is not None else list(image_ids)
        problems = [p.replace(str(tmp), str(path)) for p in check_submission(tmp, expected, sizes)]
        if problems:  # the whole list on stdout, the error itself stays one line
            print(*problems, sep="\n")
            raise DataError(path, f"not written: {len(problems)} problem(s), the first: {problems[0]}")
    return path


def parse_prediction_string(text: str) -> list[tuple[int, float, float, float, float, float]]:
    """Split one PredictionString into (class, score, x0, y0, x1, y1) groups; ValueError when malformed."""
    parsed = parse_strings(pd.Series([text]))
    if parsed.problems:
        raise ValueError(parsed.problems[0])
    return [(int(c), *map(float, v)) for c, v in zip(parsed.cls, parsed.values)]


@dataclass
class Parsed:
    """Every box of a submission's PredictionStrings, as arrays (one entry per 6-value group)."""

    row: np.ndarray  # index of the submission row of each box
    cls: np.ndarray  # int class id
    values: np.ndarray  # (n, 5) float: score, x_min, y_min, x_max, y_max (inf/nan kept)
    problems: list[str]  # one per malformed row, "<what>" without the file/row prefix
    bad_rows: np.ndarray  # row index of each entry in problems


def parse_strings(strings: pd.Series) -> Parsed:
    """Parse PredictionStrings with array operations (100k boxes well under a second).

    A row with a count of values that is not a multiple of 6, a class outside 0..14 or a
    value that is not a number is malformed: it is listed in ``problems`` and contributes no
    box. An empty (or blank) string is zero groups: an image with no box. Non-finite numbers
    (``inf``, ``nan``) parse; checks catch them.
    """
    tokens = [str(t).split() for t in strings.fillna("")]
    counts = np.fromiter(map(len, tokens), dtype=int, count=len(tokens))
    bad_count = counts % 6 != 0
    whole = counts % 6 == 0  # rows whose tokens split into groups; the others add no box
    rows = tokens if whole.all() else [t for t, ok in zip(tokens, whole) if ok]
    flat = np.array(list(itertools.chain.from_iterable(rows)), dtype=object).reshape(-1, 6)
    group_row = np.repeat(np.arange(len(counts)), np.where(whole, counts // 6, 0))
    cls = pd.Series(flat[:, 0], dtype=object).map(CLASS_TOKENS).to_numpy(dtype=float)
    cls_ok = ~np.isnan(cls)
    cls = np.where(cls_ok, cls, -1).astype(int)
    try:  # float() per token in C: the fast path for a well-formed file
        values = flat[:, 1:].astype(float)
        num_ok = np.ones(len(flat), dtype=bool)
    except ValueError:  # some token is not a number: find which
        values = pd.to_numeric(pd.Series(flat[:, 1:].ravel()), errors="coerce").to_numpy(dtype=float).reshape(-1, 5)
        nan = np.isnan(values)
        nan[nan] = [str(t).lower() != "nan" for t in flat[:, 1:][nan]]  # a literal "nan" parses; checks catch it
        num_ok = ~nan.any(axis=1)

    first_group = np.r_[0, np.cumsum(np.bincount(group_row, minlength=len(counts)))][:-1]
    problems, bad_rows = [], []
    for i in np.flatnonzero(bad_count):
        problems.append(f"{counts[i]} values, not a multiple of 6 (class score x_min y_min x_max y_max per box)")
        bad_rows.append(i)
    for k in np.flatnonzero(~cls_ok):
        group = k - first_group[group_row[k]] + 1
        problems.append(f"class {str(flat[k, 0])!r} (group {group}) is not one of 0..{NUM_CLASSES - 1}")
        bad_rows.append(group_row[k])
    for k in np.flatnonzero(cls_ok & ~num_ok):
        group = k - first_group[group_row[k]] + 1
        problems.append(f"non-number in group {group}: {[str(t) for t in flat[k]]}")
        bad_rows.append(group_row[k])
    bad_rows = np.array(bad_rows, dtype=int)
    keep = ~np.isin(group_row, bad_rows)
    order = np.argsort(bad_rows, kind="stable")
    return Parsed(group_row[keep], cls[keep], values[keep], [problems[j] for j in order], bad_rows[order])


def _read(path: str | os.PathLike) -> pd.DataFrame:
    df = read_table(path, dtype={"image_id": str, "PredictionString": str}, keep_default_na=False)
    if list(df.columns) != SUBMISSION_COLUMNS:
        raise DataError(path, f"columns must be {SUBMISSION_COLUMNS}, got {list(df.columns)}")
    return df


def read_submission(
    path: str | os.PathLike, sizes: pd.DataFrame | None = None, warn: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Parse a submission into the prediction format (validated); a malformed row or a repeated id is a DataError.

    ``warn``: see :func:`cxr.predictions.validate` (boxes Kaggle scores as written are reported, not refused).
    An empty PredictionString adds no row (no box). Errors name the submission's own CSV line.
    """
    df = _read(path)
    dup = df["image_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(path, f"image_id {show(df['image_id'].iloc[i])} appears more than once", csv_row(i))
    preds, lines = submission_boxes(df, path)
    return validate(preds, path, sizes, warn, lines=lines)


def submission_boxes(df: pd.DataFrame, path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """The boxes of a submission table (``image_id,PredictionString``), unchecked beyond parsing, and the
    CSV line of each (one line holds many boxes); a malformed PredictionString is a DataError at its line.
    The one parser of submissions: :func:`read_submission` (evaluate, submit) and ``ensemble.blend``."""
    parsed = parse_strings(df["PredictionString"])  # an empty string: no box on this image
    if parsed.problems:
        i = int(parsed.bad_rows[0])
        raise DataError(path, f"PredictionString of {df['image_id'].iloc[i]}: {parsed.problems[0]}", csv_row(i))
    preds = pd.DataFrame(parsed.values, columns=["score", *BOX_COLUMNS])
    preds.insert(0, "image_id", df["image_id"].to_numpy()[parsed.row])
    preds.insert(1, "class_id", parsed.cls)
    return preds, parsed.row + csv_row(0)


def read_sample_ids(sample: str | os.PathLike | Sequence[str]) -> pd.Series:
    """The test ids of a sample submission (a path, or the ids themselves); an unreadable file or
    one without ``image_id`` is a :class:`DataError` (the reference is broken, not the submission)."""
    if not isinstance(sample, (str, os.PathLike)):
        return pd.Series(list(sample), dtype=object)
    df = read_table(sample, dtype={"image_id": str}, keep_default_na=False)
    if "image_id" not in df.columns:
        raise DataError(sample, f"not a sample submission: no image_id column; found {list(df.columns)}")
    return df["image_id"]


def check_submission(
    path: str | os.PathLike, sample: str | os.PathLike | Sequence[str], sizes: pd.DataFrame | None = None
) -> list[str]:
    """Every problem of a submission file against Kaggle's sample_submission (a path, or its ids); empty when valid.

    Besides malformed rows and wrong ids it flags what Kaggle would still score but is almost
    surely a bug: non-finite numbers, scores outside [0, 1], negative coordinates, boxes
    outside the image (with ``sizes``), No-finding rows with a box other than ``0 0 1 1``,
    and boxes that all lie in [0, 1] (normalized, not original pixels). An empty PredictionString
    is an image with no box: valid. A ``sample`` that cannot be read raises :class:`DataError`;
    problems of the submission itself, unreadable included, are returned.
    """
    expected = read_sample_ids(sample)
    try:
        df = _read(path)
    except DataError as e:
        return [str(e)]
    problems = []
    counts = df["image_id"].value_counts()
    problems += [f"{path}: image_id {i!r} appears {n} times" for i, n in counts[counts > 1].items()]
    problems += [f"{path}: image_id {i!r} is not a test id" for i in sorted(set(df["image_id"]) - set(expected))]
    problems += [f"{path}: test id {i!r} is missing" for i in sorted(set(expected) - set(df["image_id"]))]
    ids = df["image_id"].to_numpy()

    def where(i: int) -> str:
        return f"{path}, row {csv_row(i)} ({ids[i]})"

    parsed = parse_strings(df["PredictionString"])
    problems += [f"{where(i)}: {p}" for i, p in zip(parsed.bad_rows, parsed.problems)]
    c, v = parsed.cls, parsed.values
    s, b = v[:, 0], v[:, 1:]
    finding = c != NO_FINDING
    box_checks = [
        (~np.isfinite(v).all(axis=1), "has a non-finite number"),
        (~((s >= 0) & (s <= 1)) & np.isfinite(s), "score {s} not in [0, 1]"),
        (~finding & ~(b == np.array(NO_FINDING_BOX)).all(axis=1),
         "No finding must be '14 p 0 0 1 1', got box {box} (Kaggle scores it as this box)"),
        (finding & np.isfinite(b).all(axis=1) & ~((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])),
         "class {c} box {box} needs 0 <= x_min < x_max and 0 <= y_min < y_max"),
        (finding & ((b[:, 0] < 0) | (b[:, 1] < 0)),
         "class {c} box {box} has a negative coordinate (Kaggle scores it as written)"),
    ]
    if sizes is not None:
        known = sizes.set_index("image_id")
        box_ids = pd.Series(ids[parsed.row])
        w = box_ids.map(known["width"]).to_numpy(dtype=float)
        h = box_ids.map(known["height"]).to_numpy(dtype=float)
        outside = finding & ((b[:, 2] > w + 1) | (b[:, 3] > h + 1))  # unknown ids: NaN compares False
        box_checks.append((outside, "class {c} box {box} outside the {w:g}x{h:g} original image"))
    flagged = []
    for bad, template in box_checks:
        for k in np.flatnonzero(bad)[:200]:
            box = tuple(float(x) for x in b[k])
            extra = {"w": w[k], "h": h[k]} if sizes is not None else {}
            message = template.format(s=s[k], c=c[k], box=box, **extra)
            flagged.append((parsed.row[k], k, f"{where(parsed.row[k])}: {message}"))
    problems += [m for _, _, m in sorted(flagged)]
    if len(problems) > 200:
        problems = problems[:200] + [f"... (stopped after 200 of {len(problems)} problems)"]
    n = normalized_boxes(c, b)
    if n:
        problems.append(f"{path}: every finding box ({n}) lies in [0, 1]: {NORMALIZED}")
    return problems
