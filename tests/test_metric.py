"""The competition metric on hand-worked cases, against a textbook reference, and on the real test labels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.baseline import fit_prior, predict_prior
from cxr.fusion import fuse_readers
from cxr.labels import read_physionet_labels, read_sizes
from cxr.metric import average_precision, coco_ap, ground_truth, mean_average_precision
from tests.conftest import TEST_LABELS, TEST_SIZES, TRAIN_INFO, real

B = ["x_min", "y_min", "x_max", "y_max"]


def gt(rows):
    return pd.DataFrame(rows, columns=["image_id", "class_id", *B])


def pred(rows):
    return pd.DataFrame(rows, columns=["image_id", "class_id", "score", *B])


GT = gt([["a", 0, 0, 0, 100, 100], ["a", 0, 200, 200, 300, 300], ["b", 14, 0, 0, 1, 1]])


def test_perfect():
    p = pred([["a", 0, 0.9, 0, 0, 100, 100], ["a", 0, 0.8, 200, 200, 300, 300], ["b", 14, 0.7, 0, 0, 1, 1]])
    r = mean_average_precision(GT, p)
    assert r["map"] == 1.0 and r["ap"]["0"] == 1.0 and r["ap"]["14"] == 1.0
    assert r["ap"]["5"] is None  # no ground truth: left out of the mean


def test_empty_predictions():
    r = mean_average_precision(GT, pred([]))
    assert r["map"] == 0.0 and r["ap"]["0"] == 0.0


def test_duplicate_is_a_false_positive():
    # TP (r=.5, p=1), duplicate FP (r=.5, p=.5), TP (r=1, p=2/3): AP = .5*1 + .5*2/3
    p = pred([["a", 0, 0.9, 0, 0, 100, 100], ["a", 0, 0.8, 1, 1, 100, 100], ["a", 0, 0.7, 200, 200, 300, 300]])
    assert mean_average_precision(GT, p)["ap"]["0"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_wrong_class_scores_nothing():
    p = pred([["a", 3, 0.9, 0, 0, 100, 100], ["b", 0, 0.9, 0, 0, 1, 1]])
    r = mean_average_precision(GT, p)
    assert r["ap"]["0"] == 0.0 and r["ap"]["14"] == 0.0 and r["ap"]["3"] is None


@pytest.mark.parametrize("y_max, hit", [(40.1, True), (40.0, False), (39.9, False)])
def test_iou_threshold_is_strictly_above_0_4(y_max, hit):
    # IoU of (0,0,100,y_max) with (0,0,100,100) is y_max / 100
    p = pred([["a", 0, 0.9, 0, 0, 100, y_max]])
    assert mean_average_precision(GT[GT["image_id"] == "a"], p)["ap"]["0"] == (0.5 if hit else 0.0)


def test_best_iou_box_taken_means_false_positive():
    """VOC devkit: a prediction whose best-IoU box is taken is false, even if another box fits it."""
    g = gt([["a", 0, 0, 0, 100, 100], ["a", 0, 30, 0, 130, 100]])
    p = pred([["a", 0, 0.9, 0, 0, 100, 100], ["a", 0, 0.8, 10, 0, 110, 100]])  # 2nd: IoU .82 with taken, .67 free
    assert mean_average_precision(g, p)["ap"]["0"] == pytest.approx(0.5)


def test_predictions_outside_the_scored_images_are_an_error():
    with pytest.raises(ValueError, match="not among the scored images"):
        mean_average_precision(GT, pred([["zzz", 0, 0.5, 0, 0, 1, 1]]))


def reference_voc_ap(g: pd.DataFrame, p: pd.DataFrame, cls: int, thr: float = 0.4) -> float:
    """Textbook voc_eval loop, written independently of cxr.metric."""
    g, p = g[g.class_id == cls], p[p.class_id == cls]
    taken = {i: [False] * len(x) for i, x in g.groupby("image_id")}
    boxes = {i: x[B].to_numpy() for i, x in g.groupby("image_id")}
    p = p.iloc[np.argsort(-p.score.to_numpy(), kind="stable")]
    tp, fp = [], []
    for r in p.itertuples():
        best, j = 0.0, -1
        for k, b in enumerate(boxes.get(r.image_id, [])):
            iw = max(0.0, min(r.x_max, b[2]) - max(r.x_min, b[0]))
            ih = max(0.0, min(r.y_max, b[3]) - max(r.y_min, b[1]))
            inter = iw * ih
            union = (r.x_max - r.x_min) * (r.y_max - r.y_min) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > best:
                best, j = inter / union, k
        ok = best > thr and not taken[r.image_id][j]
        if ok:
            taken[r.image_id][j] = True
        tp.append(ok)
        fp.append(not ok)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / len(g), tp / np.maximum(tp + fp, 1e-12)
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def test_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(30)]

    def boxes(n):
        xy = rng.uniform(0, 400, (n, 2))
        return np.column_stack([xy, xy + rng.uniform(20, 150, (n, 2))])

    g = gt([[rng.choice(ids), int(rng.integers(0, 3)), *b] for b in boxes(120)])
    near = g.sample(150, replace=True, random_state=1)
    p = pred(
        [[r.image_id, r.class_id, rng.uniform(), *(np.array([r.x_min, r.y_min, r.x_max, r.y_max]) + rng.normal(0, 25, 4))]
         for r in near.itertuples()]
        + [[rng.choice(ids), int(rng.integers(0, 3)), rng.uniform(), *b] for b in boxes(100)]
    )
    p[["x_max", "y_max"]] = np.maximum(p[["x_max", "y_max"]].to_numpy(), p[["x_min", "y_min"]].to_numpy() + 1)
    r = mean_average_precision(g, p, ids)
    for c in range(3):
        assert r["ap"][str(c)] == pytest.approx(reference_voc_ap(g, p, c)), c
    assert 0.1 < r["map"] < 0.9


def test_average_precision_envelope():
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)


def test_coco_reference():
    p = pred([["a", 0, 0.9, 0, 0, 100, 100], ["a", 0, 0.8, 200, 200, 300, 300], ["b", 14, 0.7, 0, 0, 1, 1]])
    assert coco_ap(GT, p) == {"coco_ap": pytest.approx(1.0), "coco_ap50": pytest.approx(1.0)}
    assert coco_ap(GT, pred([]))["coco_ap"] == 0.0


def test_several_readers_are_fused_for_scoring():
    labels = pd.DataFrame(
        [["a", 0, "R1", 0, 0, 100, 100], ["a", 0, "R2", 4, 0, 104, 100], ["a", 0, "R3", 2, 0, 102, 100]],
        columns=["image_id", "class_id", "rad_id", *B],
    )
    g = ground_truth(labels)
    assert len(g) == 1 and g[B].iloc[0].tolist() == pytest.approx([2, 0, 102, 100])


def test_real_test_labels():
    labels = read_physionet_labels(real(TEST_LABELS))
    g = ground_truth(labels)
    assert len(g) == len(labels)  # one reader: taken as it is
    perfect = g.assign(score=1.0)
    r = mean_average_precision(g, perfect)
    assert r["map"] == 1.0 and all(v == 1.0 for v in r["ap"].values())


def test_prior_baseline_on_real_test_labels(real_labels):
    """The floor on the real 3,000 test images: above zero, far below the winners' 0.314."""
    prior = fit_prior(fuse_readers(real_labels), read_sizes(real(TRAIN_INFO)))
    sizes = read_sizes(real(TEST_SIZES))
    g = ground_truth(read_physionet_labels(real(TEST_LABELS)))
    r = mean_average_precision(g, predict_prior(prior, sizes["image_id"].tolist(), sizes))
    print(f"\nprior-box baseline on the real test labels: mAP@0.4 = {r['map']:.4f}")
    assert 0.02 < r["map"] < 0.2
    assert r["ap"]["14"] > 0.6  # the No-finding row alone: ~68% of test images are normal
