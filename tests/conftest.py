"""Shared fixtures: the real VinDr files in ../shared/data (never copied into the repo) and a small
synthetic benchmark generated once per session.

Real-data tests skip with a reason when the files are absent, except under CI (``CI=true``),
where a missing file is a failure: CI must never go green by skipping them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from cxr.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAIN_FOLDS = "vindr-cxr-train-annotations/nhtlongcs/data/folds"
TRAIN_INFO = "vindr-cxr-train-annotations/nhtlongcs/datasets/train_info.csv"
TEST_LABELS = "vindr-cxr-test-annotations/Tuprott991/vindr_physionet_384/annotations_test.csv"
TEST_SIZES = "kaggle-competition-files/aqx95/data/csv/test.csv"
SAMPLE_SUBMISSION = "kaggle-competition-files/aqx95/data/csv/sample_submission.csv"
MANIFEST = "vindr-cxr-images/manifest.csv"


def real(relpath: str) -> Path:
    """Path of a file in ../shared/data; skip (or fail under CI) when it is missing."""
    path = SHARED / relpath
    if not path.exists():
        message = f"real VinDr data not found: {path} (set CXR_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def real_train_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle's train.csv (67,914 rows), rebuilt from the five staged fold files, in a temp dir."""
    folds = real(TRAIN_FOLDS)
    parts = [pd.read_csv(p, dtype={"image_id": str}) for p in sorted(folds.glob("*/*_val.csv"))]
    df = pd.concat(parts, ignore_index=True)
    path = tmp_path_factory.mktemp("real") / "train.csv"
    df[["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def real_labels(real_train_csv: Path) -> pd.DataFrame:
    from cxr.labels import read_sizes, read_train_labels

    return read_train_labels(real_train_csv, read_sizes(real(TRAIN_INFO)))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return generate(SynthConfig(out=str(out), n_train=150, n_test=40, seed=3))
