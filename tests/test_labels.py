"""Ingestion: every error path names file, row and value; the real label files read cleanly."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.dataset import CLASS_NAMES, NO_FINDING
from cxr.io import DataError
from cxr.labels import read_labels, read_physionet_labels, read_sizes, read_train_labels
from tests.conftest import TEST_LABELS, TRAIN_INFO, real

GOOD = [
    ["a1", "Aortic enlargement", 0, "R1", 10, 20, 30, 40],
    ["a1", "Nodule/Mass", 8, "R2", 5, 5, 9, 9],
    ["n1", "No finding", 14, "R3", None, None, None, None],
]
COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]


def write(tmp_path, rows, columns=COLUMNS, name="train.csv"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def test_reads_good_file(tmp_path):
    labels = read_train_labels(write(tmp_path, GOOD))
    assert list(labels["class_id"]) == [0, 8, 14]
    assert labels.loc[2, ["x_min", "x_max"]].isna().all()


@pytest.mark.parametrize(
    "row, message",
    [
        (["a2", "Atelectasis", 1, "R1", 50, 20, 30, 40], "x_min must be < x_max"),
        (["a2", "Atelectasis", 1, "R1", 10, 50, 30, 40], "y_min must be < y_max"),
        (["a2", "Atelectasis", 1, "R1", -3, 20, 30, 40], "negative coordinate"),
        (["a2", "Atelectasis", 1, "R1", None, 20, 30, 40], "four finite coordinates"),
        (["a2", "Atelectasis", 1, "R1", "ten", 20, 30, 40], "x_min='ten' is not a number"),
        (["a2", "Atelectasis", 15, "R1", 10, 20, 30, 40], "class_id=15"),
        (["a2", "Atelectasis", "x", "R1", 10, 20, 30, 40], "class_id='x'"),
        (["a2", "Cardiomegaly", 1, "R1", 10, 20, 30, 40], "does not match class_id=1"),
        (["a2", "Atelectasis", 1, None, 10, 20, 30, 40], "empty rad_id"),
        (["", "Atelectasis", 1, "R1", 10, 20, 30, 40], "unsafe image_id"),
        (["a 2", "Atelectasis", 1, "R1", 10, 20, 30, 40], "unsafe image_id"),
        (["n2", "No finding", 14, "R1", 10, 20, 30, 40], "No finding must have an empty or 0 0 1 1 box"),
    ],
)
def test_error_names_file_row_and_value(tmp_path, row, message):
    path = write(tmp_path, GOOD + [row])
    with pytest.raises(DataError, match=message) as e:
        read_train_labels(path)
    assert str(path) in str(e.value) and "row 5" in str(e.value)  # header + 3 good rows before it


def test_repeated_rows_are_an_error_naming_count_and_line(tmp_path):
    """Issue 20: train.csv twice moved a score from 0.770 to 0.441 without a word."""
    with pytest.raises(DataError, match=r"train.csv, row 5: 3 row\(s\) repeat an earlier row exactly; this one "
                                        r"\(image_id 'a1'\) repeats row 2"):
        read_train_labels(write(tmp_path, GOOD + GOOD))
    physionet = [["p1", "Cardiomegaly", 10, 10, 50, 50], ["p2", "No finding", None, None, None, None]]
    path = write(tmp_path, physionet + physionet[1:], ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
    with pytest.raises(DataError, match=r"row 4: 1 row\(s\) repeat .* repeats row 3"):
        read_labels(path)
    read_train_labels(write(tmp_path, GOOD + [["a1", "Nodule/Mass", 8, "R3", 5, 5, 9, 9]]))  # another reader: fine


def test_class_names_off_by_case_or_spacing_are_read_with_a_warning(tmp_path):
    """Issue 20: a PhysioNet 'cardiomegaly' was dropped as a label outside the 14 (the score moved, no warning)."""
    columns = ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    path = write(tmp_path, [["p1", "cardiomegaly", 10, 10, 50, 50], ["p1", "Nodule /  mass", 1, 1, 5, 5],
                            ["p2", "Rib fracture", 1, 1, 5, 5], ["p3", "No finding", None, None, None, None]], columns)
    warnings: list[str] = []
    labels = read_labels(path, warn=warnings.append)
    assert sorted(labels.loc[labels["image_id"] == "p1", "class_id"]) == [3, 8]
    assert labels.set_index("image_id").loc[["p2", "p3"], "class_id"].tolist() == [NO_FINDING, NO_FINDING]
    assert warnings == [(f"{path}, row 2: 2 class_name(s) differ from the known names only by case or spacing, "
                         "read as the known class, e.g. 'cardiomegaly' -> 'Cardiomegaly'")]
    warnings.clear()
    labels = read_train_labels(write(tmp_path, GOOD + [["a2", "lung  opacity", 7, "R1", 1, 2, 3, 4]]), warn=warnings.append)
    assert labels["class_id"].tolist()[-1] == 7 and len(warnings) == 1 and "row 5: 1 class_name(s)" in warnings[0]
    with pytest.raises(DataError, match="does not match class_id=7"):  # another name is still an error
        read_train_labels(write(tmp_path, GOOD + [["a2", "Lung opacities", 7, "R1", 1, 2, 3, 4]]))


def test_missing_column_and_file(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['rad_id'\]"):
        read_train_labels(write(tmp_path, [r[:3] + r[4:] for r in GOOD], [c for c in COLUMNS if c != "rad_id"]))
    with pytest.raises(DataError, match="file not found"):
        read_train_labels(tmp_path / "nope.csv")


def test_boxes_must_lie_inside_the_image(tmp_path):
    sizes = pd.DataFrame({"image_id": ["a1", "n1"], "width": [100, 100], "height": [100, 100]})
    read_train_labels(write(tmp_path, GOOD), sizes)
    sizes.loc[0, "width"] = 20
    with pytest.raises(DataError, match=r"outside the 20x100 image 'a1'.*") as e:
        read_train_labels(write(tmp_path, GOOD), sizes)
    assert "row 2" in str(e.value)
    with pytest.raises(DataError, match="has no size"):
        read_train_labels(write(tmp_path, GOOD), sizes.iloc[:1])


def test_width_height_columns_in_the_label_file_are_checked(tmp_path):
    rows = [r + [25, 100] for r in GOOD]
    with pytest.raises(DataError, match="outside the 25x100 image"):
        read_train_labels(write(tmp_path, rows, COLUMNS + ["width", "height"]))


def test_read_sizes_meta_and_width_height(tmp_path):
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["a", "b"], "dim0": [3000, 2000], "dim1": [2500, 1800]}).to_csv(meta, index=False)
    sizes = read_sizes(meta)
    assert sizes.set_index("image_id").loc["a"].tolist() == [2500, 3000]  # dim1 = width, dim0 = height
    wh = tmp_path / "test.csv"
    pd.DataFrame({"image_id": ["a"], "width": [7], "height": [9]}).to_csv(wh, index=False)
    assert read_sizes(wh).iloc[0].tolist() == ["a", 7, 9]
    pd.DataFrame({"image_id": ["a", "b"], "dim0": [3000, 0], "dim1": [2500, 1800]}).to_csv(meta, index=False)
    with pytest.raises(DataError, match=r"row 3: height=0"):
        read_sizes(meta)
    pd.DataFrame({"image_id": ["a", "a"], "dim0": [3, 3], "dim1": [2, 2]}).to_csv(meta, index=False)
    with pytest.raises(DataError, match="listed twice"):
        read_sizes(meta)


def test_physionet_format(tmp_path):
    path = write(
        tmp_path,
        [
            ["p1", "Cardiomegaly", 10, 10, 50, 50],
            ["p1", "Rib fracture", 1, 1, 5, 5],  # not a competition class: ignored
            ["p2", "Rib fracture", 1, 1, 5, 5],  # only a non-competition label: No finding
            ["p3", "No finding", None, None, None, None],
        ],
        ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
    )
    labels = read_labels(path)
    assert sorted(labels["image_id"]) == ["p1", "p2", "p3"]
    assert labels.set_index("image_id")["class_id"].to_dict() == {"p1": 3, "p2": NO_FINDING, "p3": NO_FINDING}


def test_real_train_labels(real_labels):
    assert len(real_labels) == 67_914
    assert real_labels["image_id"].nunique() == 15_000
    assert (real_labels.groupby("image_id")["rad_id"].nunique() == 3).all()
    assert set(real_labels["class_id"]) == set(range(len(CLASS_NAMES)))
    assert real_labels.loc[real_labels["class_id"] == NO_FINDING, "x_min"].isna().all()
    sizes = read_sizes(real(TRAIN_INFO))
    assert len(sizes) == 15_000 and (sizes[["width", "height"]] > 0).all().all()


def test_real_physionet_test_labels():
    warnings: list[str] = []
    labels = read_physionet_labels(real(TEST_LABELS), warn=warnings.append)
    assert warnings == []  # every name spelled as Kaggle spells it; 65 rows outside the 14 dropped by design
    assert labels["image_id"].nunique() == 3_000
    findings = labels[labels["class_id"] != NO_FINDING]
    assert len(findings) == 2_632  # 2,697 boxes less 65 outside the 14 competition classes
    assert np.isfinite(findings[["x_min", "y_min", "x_max", "y_max"]].to_numpy()).all()
