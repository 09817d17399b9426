"""From a download to the DATA folder the pipeline reads (``cxr data`` / ``make data``).

Two sources are understood, told apart by what ``SRC/train`` holds:

* Kaggle's competition download: ``SRC/train/<id>.dicom``, ``SRC/test/<id>.dicom``,
  ``SRC/train.csv``, ``SRC/sample_submission.csv``. The DICOMs are converted to squashed
  PNGs (:func:`cxr.images.prepare_png_set`) and the original sizes come from the DICOMs.
* A public resized-PNG set: ``SRC/train/<id>.png``, ``SRC/test/<id>.png``,
  ``SRC/train_meta.csv``, ``SRC/test_meta.csv`` (``image_id, dim0, dim1``: ORIGINAL sizes,
  since the PNGs are already resized; or ``width, height`` columns in ``train.csv`` and
  ``SRC/test.csv``), with ``train.csv`` / ``sample_submission.csv`` in ``SRC`` or passed
  with ``--labels`` / ``--sample`` (from the competition download).
  The PNGs are converted to ``SIZE`` like DICOMs; the original sizes come from the meta files.

The result is the layout of :mod:`cxr.data`, checked by :func:`cxr.data.check_folder`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from cxr.data import check_folder
from cxr.dataset import DICOM_SUFFIXES, SUBMISSION_COLUMNS
from cxr.images import FAILED_NAME, PrepareResult, find_images, prepare_png_set, writing
from cxr.io import DataError, atomic_path, read_table, require_columns, write_table
from cxr.labels import read_sizes, read_train_labels
from cxr.submission import EMPTY_PREDICTION

SPLITS = ("train", "test")


def source_kind(src: Path) -> str:
    """``"dicom"`` (Kaggle competition download) or ``"png"`` (a resized-PNG set) from SRC/train's files."""
    for split in SPLITS:
        if not (src / split).is_dir():
            raise DataError(src / split, "not found: SRC must hold train/ and test/ image folders")
    images = find_images(src / "train")
    if not images:
        raise DataError(src / "train", "no DICOM/PNG/JPEG files found")
    dicoms = sum(p.suffix.lower() in DICOM_SUFFIXES for p in images.values())
    return "dicom" if dicoms > len(images) / 2 else "png"


def build(
    src: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 1024,
    labels: str | os.PathLike | None = None,
    sample: str | os.PathLike | None = None,
    workers: int = 0,
    progress: bool = True,
    exact: bool = False,
) -> tuple[dict, dict[str, PrepareResult]]:
    """Convert and copy ``src`` into the DATA layout at ``out``; return (check summary, per-split results).

    Every input file is checked to exist before converting. Re-running resumes (finished images
    are kept). When an image fails to convert, every other image is still converted and the meta
    files written, then a :class:`DataError` names the failure lists (``OUT/<split>/failed.csv``).
    ``exact``: JPEG 2000 at full resolution (see :func:`cxr.images.prepare_png_set`). A second run
    on the same ``out`` while this one runs stops at once (:class:`cxr.images.Busy`).
    """
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise DataError(out, "OUT must differ from SRC")
    if workers < 0:
        raise DataError("--workers", f"must be 0 (one per core) or more, got {workers}")
    kind = source_kind(src)
    labels = Path(labels) if labels else src / "train.csv"
    sample = Path(sample) if sample else src / "sample_submission.csv"
    # every input file is checked before the (hours-long) conversion starts
    needed = [labels, *(size_file(src, s, labels) for s in SPLITS if kind == "png")]
    needed += [sample] if kind == "dicom" else []  # a PNG set without one gets it built from the test ids
    for path in needed:
        if not path.is_file():
            flag = {labels: " (pass --labels)", sample: " (pass --sample)"}.get(path, "")
            raise DataError(path, f"file not found{flag}")
    with writing(out):
        return _build(src, out, kind, labels, sample, size, workers, progress, exact)


def _build(src: Path, out: Path, kind: str, labels: Path, sample: Path, size: int, workers: int, progress: bool,
           exact: bool) -> tuple[dict, dict[str, PrepareResult]]:
    read_train_labels(labels)  # columns, classes, boxes: checked now; against the sizes after conversion
    # a PNG set's original sizes come from its tables (checked now); a DICOM's from the file itself
    given = {s: read_sizes(size_file(src, s, labels), per_box=size_file(src, s, labels) == labels)
             for s in SPLITS} if kind == "png" else {}
    results = {s: prepare_png_set(src / s, out / s, size, workers, progress, exact) for s in SPLITS}
    for s in SPLITS:
        sizes = given[s] if kind == "png" else _dicom_sizes(results[s])
        write_table(pd.DataFrame({"image_id": sizes["image_id"], "dim0": sizes["height"], "dim1": sizes["width"]}),
                    out / f"{s}_meta.csv")
    failed = {s: r for s, r in results.items() if len(r.failed)}
    if failed:
        lists = ", ".join(f"{len(r.failed)} in {out / s / FAILED_NAME}" for s, r in failed.items())
        raise DataError(out, f"images failed to convert ({lists}); fix or remove them and re-run (finished images are kept)")
    read_train_labels(labels, read_sizes(out / "train_meta.csv"))  # every box inside its image
    _copy(labels, out / "train.csv")
    if sample.is_file():
        require_columns(read_table(sample, nrows=0), SUBMISSION_COLUMNS, sample)
        _copy(sample, out / "sample_submission.csv")
    elif kind == "png":  # the PNG sets ship no sample; Kaggle's is every test id with the No-finding row
        ids = read_sizes(out / "test_meta.csv")["image_id"]
        write_table(pd.DataFrame({"image_id": ids, "PredictionString": EMPTY_PREDICTION}), out / "sample_submission.csv")
    else:
        raise DataError(sample, "file not found (pass --sample)")

    return check_folder(out), results


def size_file(src: Path, split: str, labels: Path) -> Path:
    """Where a PNG set keeps the original sizes of ``split``.

    ``SRC/<split>_meta.csv`` (``image_id, dim0, dim1``) as in the resized-PNG sets; failing that,
    tables with ``width, height`` columns: the labels file for train, ``SRC/test.csv`` for test.
    """
    meta = src / f"{split}_meta.csv"
    if meta.is_file():
        return meta
    other = labels if split == "train" else src / "test.csv"
    if other.is_file() and {"width", "height"} <= set(read_table(other, nrows=0).columns):
        return other
    return meta  # missing: the caller names it


def _dicom_sizes(result: PrepareResult) -> pd.DataFrame:
    meta = result.meta
    return pd.DataFrame({"image_id": meta["image_id"], "width": meta["dim1"], "height": meta["dim0"]})


def _copy(src: Path, dst: Path) -> None:
    """Byte copy (the pipeline reads Kaggle's files as they are), atomic, normal mode."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
