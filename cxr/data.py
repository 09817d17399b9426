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

import pandas as pd

from cxr.fusion import DEFAULT, FusionConfig, fuse_readers
from cxr.io import DataError, read_table
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
        return fuse_readers(self.labels, cfg)

    def image(self, split: str, image_id: str) -> Path:
        path = self.root / split / f"{image_id}.png"
        if not path.is_file():
            raise DataError(path, f"image of {split} id {image_id!r} not found")
        return path

    def test_ids(self) -> list[str]:
        return read_table(self.root / "sample_submission.csv", dtype={"image_id": str})["image_id"].tolist()


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    folds = read_table(path, dtype={"image_id": str})
    if list(folds.columns) != ["image_id", "fold"]:
        raise DataError(path, f"expected columns ['image_id', 'fold'], got {list(folds.columns)}")
    return folds


def split(folds: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) for ``fold``: train on every other fold, validate on it."""
    if fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} not in the fold file (folds {sorted(set(folds['fold']))})")
    held = folds["fold"] == fold
    return folds.loc[~held, "image_id"].tolist(), folds.loc[held, "image_id"].tolist()
