"""Folds on the real 15,000-image labels: grouped, stratified, balanced, deterministic."""
from __future__ import annotations

import pandas as pd
import pytest

from cxr.cli import main
from cxr.folds import fold_class_table, make_folds


@pytest.fixture(scope="module")
def folds(real_labels):
    return make_folds(real_labels, n_folds=5, seed=42)


def test_every_image_in_exactly_one_fold(real_labels, folds):
    assert folds["image_id"].is_unique
    assert set(folds["image_id"]) == set(real_labels["image_id"])
    assert set(folds["fold"]) == {0, 1, 2, 3, 4}


def test_balanced(real_labels, folds):
    table = fold_class_table(real_labels, folds)
    print("\nimages per class and fold (any reader):\n" + table.to_string())
    sizes = table.loc["images"]
    assert (sizes - sizes.mean()).abs().max() <= 0.02 * sizes.mean()
    assert (table.drop(index="images") > 0).all().all()  # every class in every fold
    for name, row in table.drop(index="images").iterrows():  # each class split evenly (±10%, ±3 images)
        assert (row - row.mean()).abs().max() <= max(0.1 * row.mean(), 3), name
    normal_share = table.loc["No finding"] / sizes
    assert normal_share.max() - normal_share.min() < 0.01


def test_deterministic(real_labels, folds):
    pd.testing.assert_frame_equal(folds, make_folds(real_labels, n_folds=5, seed=42))
    assert not make_folds(real_labels, n_folds=5, seed=7)["fold"].equals(folds["fold"])


def test_cli_writes_image_fold(real_train_csv, tmp_path, capsys):
    out = tmp_path / "folds.csv"
    main(["folds", "--labels", str(real_train_csv), "--n-folds", "5", "--seed", "42", "--out", str(out)])
    written = pd.read_csv(out)
    assert list(written.columns) == ["image_id", "fold"] and len(written) == 15_000
    assert "Pneumothorax" in capsys.readouterr().out


def test_seed_out_of_range_is_a_value_error_not_numpy_traceback():
    labels = pd.DataFrame({"image_id": list("abcd"), "class_id": [14, 14, 3, 3]})
    with pytest.raises(ValueError, match=r"seed must be an integer in 0..4294967295, got -1"):
        make_folds(labels, 2, seed=-1)
