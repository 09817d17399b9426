"""Read and validate label and size files: Kaggle train.csv, PhysioNet test labels, meta CSVs.

Every reader returns plain DataFrames with the columns of :mod:`cxr.dataset` and raises
:class:`cxr.io.DataError` naming the file, the CSV line and the value at fault.

Label frame (what :func:`read_train_labels` returns): one row per reader box with
``image_id, class_id, rad_id, x_min, y_min, x_max, y_max`` (original pixels). No-finding
rows have ``class_id == 14`` and NaN coordinates, as in Kaggle's file.

Two things that would move a score without a word are caught here: a row repeated exactly
(an error: a reader's box counted twice, or a file concatenated with itself) and a class
name that differs from a known one only by case or spacing (read as the known name, with a
warning naming the count; PhysioNet names are otherwise matched exactly, and anything else
is a label outside the 14 findings, dropped by design).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from cxr.dataset import (
    BOX_COLUMNS,
    CLASS_ID,
    CLASS_NAMES,
    META_COLUMNS,
    NO_FINDING,
    PHYSIONET_COLUMNS,
    TRAIN_COLUMNS,
)
from cxr.io import DataError, check_ids, csv_row, read_table, require_columns, show, show_values
from cxr.io import warn as _warn

Warn = Callable[[str], None]

LABEL_COLUMNS = ["image_id", "class_id", "rad_id", *BOX_COLUMNS]


def read_sizes(path: str | os.PathLike, per_box: bool = False) -> pd.DataFrame:
    """Original image sizes as ``image_id, width, height`` (ints), one row per image.

    Accepts Kaggle meta files (``dim0`` = height, ``dim1`` = width) or any table with
    ``width`` and ``height`` columns (e.g. Kaggle's test.csv). ``per_box``: the table has a
    row per box (a train.csv with sizes), so an id may repeat but must keep one size.
    """
    df = read_table(path, dtype={"image_id": str})
    if {"width", "height"} <= set(df.columns):
        sizes = df[["image_id", "width", "height"]].copy()
    else:
        require_columns(df, META_COLUMNS, path)
        sizes = pd.DataFrame({"image_id": df["image_id"], "width": df["dim1"], "height": df["dim0"]})
    _check_ids(sizes, path)
    for col in ("width", "height"):
        values = pd.to_numeric(sizes[col], errors="coerce")
        bad = ~(values > 0) | (values != values.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(path, f"{col}={show(sizes[col].iloc[i])} is not a positive integer", csv_row(i))
        sizes[col] = values.astype(int)
    dup = sizes.duplicated(["image_id", "width", "height"]) if per_box else pd.Series(False, index=sizes.index)
    again = sizes["image_id"].duplicated() & ~dup
    if again.any():
        i = int(np.flatnonzero(again.to_numpy())[0])
        what = "listed again with another size" if per_box else "listed twice"
        raise DataError(path, f"image_id {show(sizes['image_id'].iloc[i])} {what}", csv_row(i))
    return sizes[~dup].reset_index(drop=True)


def read_train_labels(
    path: str | os.PathLike, sizes: pd.DataFrame | None = None, warn: Warn = _warn
) -> pd.DataFrame:
    """Read Kaggle's ``train.csv`` (several readers per image) into the label frame.

    Checks: required columns, non-empty ids and reader ids, no row repeated, ``class_id`` in
    0..14 agreeing with ``class_name`` (a name off only by case or spacing goes to ``warn``),
    finite boxes with ``x_min < x_max`` and ``y_min < y_max`` for findings, empty (or
    ``0 0 1 1``) boxes for No finding, and, when ``sizes`` is given (or the file has
    ``width``/``height`` columns), boxes inside the image.
    """
    df = read_table(path, dtype={"image_id": str, "rad_id": str, "class_name": str})
    require_columns(df, TRAIN_COLUMNS, path)
    _not_empty(df, path)
    _check_ids(df, path)
    _no_repeated_rows(df, TRAIN_COLUMNS, path)
    rad = df["rad_id"].fillna("").astype(str).str.strip()
    if (rad == "").any():
        i = int(np.flatnonzero((rad == "").to_numpy())[0])
        raise DataError(path, "empty rad_id", csv_row(i))
    class_id = pd.to_numeric(df["class_id"], errors="coerce")
    bad = ~class_id.isin(range(len(CLASS_NAMES)))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"class_id={show(df['class_id'].iloc[i])} is not one of 0..{NO_FINDING}", csv_row(i))
    class_id = class_id.astype(int)
    expected = class_id.map(lambda c: CLASS_NAMES[c])
    given = df["class_name"].fillna("").astype(str)
    loose = _loose(given) == _loose(expected)
    bad = ~loose
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path,
            f"class_name={show(df['class_name'].iloc[i])} does not match class_id={class_id.iloc[i]} "
            f"({show(expected.iloc[i])})",
            csv_row(i),
        )
    _warn_spelling(given[given.str.strip() != expected], class_id, path, warn)
    out = pd.DataFrame({"image_id": df["image_id"], "class_id": class_id, "rad_id": rad})
    out[BOX_COLUMNS] = _boxes(df, path)
    finding = (class_id != NO_FINDING).to_numpy()
    _check_finding_boxes(out, finding, path)
    _check_no_finding_boxes(out, ~finding, path)
    out.loc[~finding, BOX_COLUMNS] = np.nan
    if sizes is None and {"width", "height"} <= set(df.columns):
        sizes = pd.DataFrame({"image_id": df["image_id"], "width": df["width"], "height": df["height"]})
        sizes = sizes.drop_duplicates("image_id")
    if sizes is not None:
        check_inside(out, sizes, path)
    return out


def read_physionet_labels(path: str | os.PathLike, warn: Warn = _warn) -> pd.DataFrame:
    """Read PhysioNet VinDr-CXR ``annotations_test.csv`` (5-reader consensus) into the label frame.

    Labels outside the 14 competition classes (e.g. "Rib fracture") are ignored; an image
    left with no finding gets one No-finding row, so every image in the file is kept.
    The single reader is called ``consensus``. A row repeated exactly is an error; a class
    name off a known one only by case or spacing (``cardiomegaly``) is read as that class,
    with a warning, instead of being dropped as a label outside the 14.
    """
    df = read_table(path, dtype={"image_id": str, "class_name": str})
    require_columns(df, PHYSIONET_COLUMNS, path)
    _not_empty(df, path)
    _check_ids(df, path)
    _no_repeated_rows(df, PHYSIONET_COLUMNS, path)
    given = df["class_name"].fillna("").astype(str)
    class_id = _loose(given).map(_LOOSE_ID)  # NaN: a label outside the 14 findings and No finding
    _warn_spelling(given[class_id.notna() & ~given.str.strip().isin(CLASS_ID)], class_id, path, warn)
    keep = class_id.notna() & (class_id != NO_FINDING)
    boxes = _boxes(df, path)
    out = pd.DataFrame({"image_id": df["image_id"], "class_id": class_id, "rad_id": "consensus"})
    out[BOX_COLUMNS] = boxes
    _check_finding_boxes(out, keep.to_numpy(), path)
    findings = out[keep].copy()
    findings["class_id"] = findings["class_id"].astype(int)
    normal_ids = sorted(set(df["image_id"]) - set(findings["image_id"]))
    normal = pd.DataFrame({"image_id": normal_ids, "class_id": NO_FINDING, "rad_id": "consensus"})
    normal[BOX_COLUMNS] = np.nan
    return pd.concat([findings, normal], ignore_index=True)[LABEL_COLUMNS]


def read_labels(path: str | os.PathLike, sizes: pd.DataFrame | None = None, warn: Warn = _warn) -> pd.DataFrame:
    """Read either label format, told apart by its columns.

    A file with any Kaggle-only column (``rad_id`` or ``class_id``) is Kaggle train labels and
    must have all of them; otherwise it must have the PhysioNet columns. A Kaggle file that
    lost a column is an error naming it, never silently read as single-reader labels.
    """
    header = read_table(path, nrows=0)
    columns = set(header.columns)
    if columns & (set(TRAIN_COLUMNS) - set(PHYSIONET_COLUMNS)):
        require_columns(header, TRAIN_COLUMNS, path)
        return read_train_labels(path, sizes, warn)
    if not set(PHYSIONET_COLUMNS) <= columns:
        raise DataError(path, f"not a label file: expected Kaggle train columns {TRAIN_COLUMNS} or PhysioNet "
                              f"columns {PHYSIONET_COLUMNS}; found {list(header.columns)}")
    return read_physionet_labels(path, warn)


def _not_empty(df: pd.DataFrame, path: str | os.PathLike) -> None:
    if df.empty:  # a header alone: every later step would have nothing to split, train on or score
        raise DataError(path, "has a header but no rows: a label file needs at least one labelled image")


def _loose(names: pd.Series) -> pd.Series:
    """Class names without case or spacing: ``' Nodule / mass'`` -> ``'nodule/mass'``."""
    return names.str.replace(r"\s+", "", regex=True).str.lower()


_LOOSE_ID = dict(zip(_loose(pd.Series(CLASS_NAMES)), range(len(CLASS_NAMES))))


def _warn_spelling(given: pd.Series, class_id: pd.Series, path: str | os.PathLike, warn: Warn) -> None:
    """One warning for the class names read as the known name they match only loosely (``given``: those
    names, indexed by row; ``class_id``: the class each row was read as)."""
    if len(given):
        i = int(given.index[0])
        warn(f"{path}, row {csv_row(i)}: {len(given)} class_name(s) differ from the known names only by case or "
             f"spacing, read as the known class, e.g. {show(given.iloc[0])} -> {show(CLASS_NAMES[int(class_id.loc[i])])}")


def _no_repeated_rows(df: pd.DataFrame, columns: list[str], path: str | os.PathLike) -> None:
    """A label row twice is an error, not a silent de-duplication: the real Kaggle and PhysioNet files
    have none, so a repeat means a file concatenated with itself or a bad join, and the file is not the
    one the user thinks it is (the whole train.csv twice moved a test score from 0.770 to 0.441)."""
    dup = df.duplicated(columns)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        same = (df[columns].iloc[:i] == df[columns].iloc[i]) | (df[columns].iloc[:i].isna() & df[columns].iloc[i].isna())
        first = int(np.flatnonzero(same.all(axis=1).to_numpy())[0])
        raise DataError(path, f"{int(dup.sum())} row(s) repeat an earlier row exactly; this one (image_id "
                              f"{show(df['image_id'].iloc[i])}) repeats row {csv_row(first)}", csv_row(i))


def check_inside(labels: pd.DataFrame, sizes: pd.DataFrame, path: str | os.PathLike) -> None:
    """Every finding box lies inside its image (a 1-pixel tolerance for rounding)."""
    known = sizes.set_index("image_id")
    finding = labels["class_id"] != NO_FINDING
    missing = ~labels["image_id"].isin(known.index)
    if missing.any():
        i = int(np.flatnonzero(missing.to_numpy())[0])
        raise DataError(path, f"image_id {show(labels['image_id'].iloc[i])} has no size in the meta file", csv_row(i))
    w = labels["image_id"].map(known["width"]).to_numpy()
    h = labels["image_id"].map(known["height"]).to_numpy()
    outside = finding.to_numpy() & (
        (labels["x_max"].to_numpy() > w + 1) | (labels["y_max"].to_numpy() > h + 1)
    )
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        r = labels.iloc[i]
        raise DataError(
            path,
            f"box ({r.x_min}, {r.y_min}, {r.x_max}, {r.y_max}) lies outside the {w[i]}x{h[i]} image "
            f"{r.image_id!r}",
            csv_row(i),
        )


def _check_ids(df: pd.DataFrame, path: str | os.PathLike) -> None:
    check_ids(df["image_id"], path)


def _boxes(df: pd.DataFrame, path: str | os.PathLike) -> np.ndarray:
    out = np.empty((len(df), 4), dtype=float)
    for j, col in enumerate(BOX_COLUMNS):
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(path, f"{col}={show(raw.iloc[i])} is not a number", csv_row(i))
        out[:, j] = values.to_numpy(dtype=float)
    return out


def _check_finding_boxes(labels: pd.DataFrame, finding: np.ndarray, path: str | os.PathLike) -> None:
    b = labels[BOX_COLUMNS].to_numpy(dtype=float)
    problems = [
        (~np.isfinite(b).all(axis=1), "a finding needs four finite coordinates"),
        ((b[:, 0] < 0) | (b[:, 1] < 0), "negative coordinate"),
        (~(b[:, 0] < b[:, 2]), "x_min must be < x_max"),
        (~(b[:, 1] < b[:, 3]), "y_min must be < y_max"),
    ]
    for bad, message in problems:
        bad = bad & finding
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"{message}: box {show_values(b[i])} ({labels['image_id'].iloc[i]})", csv_row(i))


def _check_no_finding_boxes(labels: pd.DataFrame, no_finding: np.ndarray, path: str | os.PathLike) -> None:
    b = labels[BOX_COLUMNS].to_numpy(dtype=float)
    ok = np.isnan(b).all(axis=1) | (b == np.array([0, 0, 1, 1])).all(axis=1)
    bad = no_finding & ~ok
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(path, f"No finding must have an empty or 0 0 1 1 box, got {show_values(b[i])}", csv_row(i))
