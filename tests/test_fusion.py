"""Reader fusion on hand-made readers (known answers) and box counts on the real labels."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from cxr.fusion import FusionConfig, count_boxes, fuse_readers

B = ["x_min", "y_min", "x_max", "y_max"]


def frame(rows):
    return pd.DataFrame(rows, columns=["image_id", "class_id", "rad_id", *B])


READERS = frame(
    [
        ["a", 3, "R1", 100, 100, 200, 200],
        ["a", 3, "R2", 110, 100, 210, 200],  # same finding as R1 (IoU 0.82)
        ["a", 3, "R3", 600, 600, 700, 700],  # a different place
        ["a", 8, "R1", 100, 100, 200, 200],  # another class at R1's box: never fused with class 3
        ["n", 14, "R1", np.nan, np.nan, np.nan, np.nan],
        ["n", 14, "R2", np.nan, np.nan, np.nan, np.nan],
    ]
)


def test_keep_all_keeps_every_box():
    fused = fuse_readers(READERS, FusionConfig(mode="keep_all"))
    assert (fused["class_id"] != 14).sum() == 4
    assert fused[fused["image_id"] == "n"]["class_id"].tolist() == [14]  # one No-finding row per normal image


def test_wbf_averages_agreeing_readers():
    fused = fuse_readers(READERS, FusionConfig(mode="wbf", iou_thr=0.4))
    c3 = fused[fused["class_id"] == 3].sort_values("x_min")
    assert len(c3) == 2
    np.testing.assert_allclose(c3[B].iloc[0], [105, 100, 205, 200])
    np.testing.assert_allclose(c3[B].iloc[1], [600, 600, 700, 700])
    # 3 readers read image a: two agree on the first box, one drew the second
    np.testing.assert_allclose(c3["score"], [2 / 3, 1 / 3])
    assert (fused["class_id"] == 8).sum() == 1


def test_nms_keeps_one_reader_box():
    fused = fuse_readers(READERS, FusionConfig(mode="nms", iou_thr=0.4))
    c3 = fused[fused["class_id"] == 3].sort_values("x_min")
    assert len(c3) == 2
    assert c3[B].iloc[0].tolist() in ([100, 100, 200, 200], [110, 100, 210, 200])


def test_iou_threshold_matters():
    assert (fuse_readers(READERS, FusionConfig(mode="wbf", iou_thr=0.9))["class_id"] == 3).sum() == 3


def test_drop_readers():
    fused = fuse_readers(READERS, FusionConfig(mode="wbf", drop_readers=("R2",)))
    np.testing.assert_allclose(fused[fused["class_id"] == 3].sort_values("x_min")[B].iloc[0], [100, 100, 200, 200])
    # an image that loses all its readers leaves the labels instead of becoming "normal"
    fused = fuse_readers(READERS, FusionConfig(mode="wbf", drop_readers=("R1", "R2")))
    assert sorted(fused["image_id"].unique()) == ["a"]


def test_fusion_needs_no_image_size():
    """Coordinates far beyond 1 (original pixels) fuse exactly; ensemble-boxes would clip them."""
    big = READERS.copy()
    big[B] = big[B] * 10
    a = fuse_readers(READERS)
    b = fuse_readers(big)
    np.testing.assert_allclose(b[B].dropna().to_numpy(), a[B].dropna().to_numpy() * 10)


def test_real_label_counts(real_labels):
    configs = {m: FusionConfig(mode=m) for m in ("keep_all", "nms", "wbf")}
    counts = count_boxes(real_labels, configs)
    total = counts.sum()
    print("\nfinding boxes per fusion mode (IoU 0.4) on the real train labels:\n" + counts.to_string())
    print(total.to_dict())
    assert total["keep_all"] == 36_096  # 67,914 rows less 3 No-finding rows on each of 10,606 normal images
    assert total["wbf"] < 0.75 * total["keep_all"]
    assert total["nms"] == pytest.approx(total["wbf"], rel=0.05)
    assert (counts > 0).all().all()


@pytest.mark.parametrize("cls, values, message", [
    ("FusionConfig", {"iou_thr": 5}, "iou_thr: 5.0 is out of range: must be in (0, 1]"),
    ("WBF", {"iou_thr": 0}, "iou_thr: 0.0 is out of range: must be in (0, 1]"),
    ("WBF", {"skip_box_thr": 1.5}, "skip_box_thr: 1.5 is out of range: must be in [0, 1]"),
])
def test_fusion_settings_in_yaml_are_range_checked(cls, values, message):
    """A profile's labels: block, blend YAML and FOLD_FUSION meet the same rule as the command-line flags."""
    from cxr import fusion, wbf
    from cxr.config import from_dict
    from cxr.io import DataError

    with pytest.raises(DataError, match=re.escape(f"x.yaml: {message}")):
        from_dict(getattr(fusion, cls, None) or getattr(wbf, cls), values, "x.yaml")


# --- reader selection: whole images by who read them -------------------------------------------------

SELECT = frame(
    [
        ["a", 3, "R8", 100, 100, 200, 200],  # abnormal, read only by R8-R10
        ["a", 3, "R9", 105, 100, 200, 200],
        ["a", 14, "R10", np.nan, np.nan, np.nan, np.nan],
        ["b", 14, "R8", np.nan, np.nan, np.nan, np.nan],  # normal, read only by R8-R10
        ["b", 14, "R9", np.nan, np.nan, np.nan, np.nan],
        ["c", 5, "R8", 10, 10, 50, 50],  # abnormal, read by R8 and R11
        ["c", 5, "R11", 12, 10, 50, 50],
        ["d", 14, "R11", np.nan, np.nan, np.nan, np.nan],  # normal, read by others
    ]
)


@pytest.mark.parametrize("select, normals_too, kept", [
    ("drop", False, {"b", "c", "d"}),  # the 2nd place's rule: abnormal R8-R10 images go, normal ones stay
    ("drop", True, {"c", "d"}),
    ("only", False, {"a", "b", "d"}),
    ("only", True, {"a", "b"}),
])
def test_images_read_only_by(select, normals_too, kept):
    cfg = FusionConfig(images_read_only_by=("R8", "R9", "R10"), select=select, normals_too=normals_too)
    fused = fuse_readers(SELECT, cfg)
    assert set(fused["image_id"]) == kept
    assert set(fuse_readers(SELECT)["image_id"]) == {"a", "b", "c", "d"}  # no selection: every image


def test_a_misspelt_reader_is_an_error():
    from cxr.io import DataError

    with pytest.raises(DataError, match=r"images_read_only_by: 'R08' read no image here \(readers: R10, R11, R8, R9\)"):
        fuse_readers(SELECT, FusionConfig(images_read_only_by=("R08", "R9")))


def test_the_2nd_place_selection_on_the_real_labels(real_labels):
    """Images and boxes kept by the 2nd place's rule, against a direct pandas computation on train.csv."""
    from cxr.fusion import selection_summary

    cfg = FusionConfig(images_read_only_by=("R8", "R9", "R10"))
    readers = real_labels.groupby("image_id")["rad_id"].agg(frozenset)
    abnormal = set(real_labels.loc[real_labels["class_id"] != 14, "image_id"])
    dropped = {i for i, r in readers.items() if r <= {"R8", "R9", "R10"} and i in abnormal}
    fused = fuse_readers(real_labels, cfg)
    assert set(fused["image_id"]) == set(readers.index) - dropped
    expected = fuse_readers(real_labels[~real_labels["image_id"].isin(dropped)])
    pd.testing.assert_frame_equal(fused, expected)
    line = selection_summary(real_labels, cfg)
    n_abnormal = len(abnormal - dropped)
    assert f"kept {15000 - len(dropped)}/15000 images ({n_abnormal}/{len(abnormal)} with a finding)" in line, line
    cardiomegaly = (expected["class_id"] == 3).sum()
    assert f"Cardiomegaly {cardiomegaly}/" in line, line
    assert len(dropped) == 4146 and n_abnormal == 248  # VinDr: R8, R9 and R10 read 94% of the abnormal images
