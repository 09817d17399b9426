"""A data folder in Kaggle's resized-PNG layout, and the fold split every model trains on.

Layout (what ``cxr synth`` writes and what the public 256/512/1024-px PNG sets use)::

    DATA/train.csv  DATA/train_meta.csv  DATA/test_meta.csv  DATA/sample_submission.csv
    DATA/train/<image_id>.png  DATA/test/<image_id>.png     (squashed to a square)
    DATA/test_labels.csv                                    (optional; synthetic / PhysioNet labels)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.dataset import FOLD_COLUMNS, NO_FINDING, SUBMISSION_COLUMNS
from cxr.fusion import DEFAULT, FusionConfig, fuse_readers, selection_summary
from cxr.images import png_size
from cxr.io import DataError, check_ids, csv_row, read_table, require_columns, show
from cxr.labels import read_sizes, read_train_labels


@dataclass(frozen=True)
class DataFolder:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @cached_property
    def train_sizes(self) -> pd.DataFrame:
        return read_sizes(self.root / "train_meta.csv")

    @cached_property
    def test_sizes(self) -> pd.DataFrame:
        return read_sizes(self.root / "test_meta.csv")

    def sizes(self, split: str) -> pd.DataFrame:
        return self.train_sizes if split == "train" else self.test_sizes

    @cached_property
    def labels(self) -> pd.DataFrame:
        """Reader-level train labels, validated against the original sizes."""
        return read_train_labels(self.root / "train.csv", self.train_sizes)

    def fused(self, cfg: FusionConfig = DEFAULT) -> pd.DataFrame:
        """The labels fused by ``cfg``; a reader selection says what it kept (once per setting)."""
        fused = fuse_readers(self.labels, cfg)
        if cfg.selects() and cfg not in self._told:
            self._told.add(cfg)
            print(selection_summary(self.labels, cfg, fused), flush=True)
        return fused

    @cached_property
    def _told(self) -> set:
        return set()

    def image(self, split: str, image_id: str) -> Path:
        path = self.root / split / f"{image_id}.png"
        if not path.is_file():
            raise DataError(path, f"image of {split} id {image_id!r} not found")
        return path

    def test_ids(self) -> list[str]:
        """The test ids in sample_submission.csv's order (safe, each once)."""
        path = self.root / "sample_submission.csv"
        ids = read_table(path, dtype={"image_id": str})
        require_columns(ids, ["image_id"], path)
        check_ids(ids["image_id"], path)
        dup = ids["image_id"].duplicated()
        if dup.any():
            i = int(np.flatnonzero(dup.to_numpy())[0])
            raise DataError(path, f"image_id {show(ids['image_id'].iloc[i])} listed twice", csv_row(i))
        return ids["image_id"].tolist()


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """``image_id, fold`` with safe ids (adapters build file names from them), integer folds, no id twice."""
    folds = read_table(path, dtype={"image_id": str})
    if list(folds.columns) != FOLD_COLUMNS:
        raise DataError(path, f"expected columns {FOLD_COLUMNS}, got {list(folds.columns)}")
    check_ids(folds["image_id"], path)
    fold = pd.to_numeric(folds["fold"], errors="coerce")
    bad = ~((fold >= 0) & (fold == fold.round()))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"fold={show(folds['fold'].iloc[i])} is not an integer >= 0", csv_row(i))
    dup = folds["image_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(path, f"image_id {show(folds['image_id'].iloc[i])} listed twice", csv_row(i))
    return folds.assign(fold=fold.astype(int))


def check_folder(root: str | os.PathLike) -> dict:
    """Check a DATA folder end to end; return a summary, or raise :class:`DataError` at the first problem.

    Checks: meta files and labels valid (labels against the original sizes), every label id
    has a train image, every image (train and test) has a size and every size an image, the
    sample submission lists exactly the test images, once each; all PNGs share one square size.
    """
    data = DataFolder(root)
    root = data.root
    labels = data.labels  # validated against train_meta.csv: every label id has a size
    summary: dict = {}
    for split in ("train", "test"):
        sizes = data.sizes(split)
        folder = root / split
        images = {p.stem: p for p in folder.glob("*.png") if not p.name.startswith(".")} if folder.is_dir() else {}
        no_image = sorted(set(sizes["image_id"]) - set(images))
        if no_image:
            raise DataError(root / f"{split}_meta.csv",
                            f"{len(no_image)} image(s) have no {split}/<id>.png, e.g. {no_image[:3]}")
        no_size = sorted(set(images) - set(sizes["image_id"]))
        if no_size:
            raise DataError(folder, f"{len(no_size)} image(s) have no size in {split}_meta.csv, e.g. {no_size[:3]}")
        shapes = {png_size(p) for p in images.values()}
        if None in shapes:
            bad = sorted(i for i, p in images.items() if png_size(p) is None)
            raise DataError(images[bad[0]], f"not a PNG ({len(bad)} such file(s) in {folder})")
        summary[f"{split}_images"] = len(images)
        summary[f"{split}_png_sizes"] = sorted(f"{w}x{h}" for w, h in shapes)
    no_image = sorted(set(labels["image_id"]) - set(data.train_sizes["image_id"]))
    if no_image:  # check_inside already refuses these; kept for a labels table read without sizes
        raise DataError(root / "train.csv", f"{len(no_image)} labelled image(s) have no train image, e.g. {no_image[:3]}")
    sample_path = root / "sample_submission.csv"
    require_columns(read_table(sample_path, nrows=0), SUBMISSION_COLUMNS, sample_path)
    sample_ids = set(data.test_ids())
    test_ids = set(data.test_sizes["image_id"])
    extra, missing = sorted(sample_ids - test_ids), sorted(test_ids - sample_ids)
    if extra or missing:
        raise DataError(sample_path, f"ids differ from the test images: {len(extra)} not a test image (e.g. {extra[:3]}), "
                                     f"{len(missing)} test image(s) missing (e.g. {missing[:3]})")
    unlabelled = set(data.train_sizes["image_id"]) - set(labels["image_id"])
    per_image = labels.groupby("image_id")["class_id"]
    summary.update(
        label_rows=len(labels),
        labelled_images=int(labels["image_id"].nunique()),
        unlabelled_train_images=len(unlabelled),
        readers=int(labels["rad_id"].nunique()),
        finding_boxes=int((labels["class_id"] != NO_FINDING).sum()),
        normal_images=int((per_image.min() == NO_FINDING).sum()),  # every reader: No finding
    )
    return summary


def split(folds: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) for ``fold``: train on every other fold, validate on it."""
    if fold not in set(folds["fold"]):
        raise DataError("<folds>", f"fold {fold} not in the fold file (folds {sorted(set(folds['fold']))})")
    held = folds["fold"] == fold
    return folds.loc[~held, "image_id"].tolist(), folds.loc[held, "image_id"].tolist()
