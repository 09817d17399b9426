"""cxr.wbf against the reference, ensemble-boxes' weighted_boxes_fusion: random cases and edge cases,
every conf_type, weights and skip threshold; same count, same boxes/labels/scores within 1e-6."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from ensemble_boxes import weighted_boxes_fusion

from cxr.dataset import PREDICTION_COLUMNS
from cxr.wbf import CONF_TYPES, WBF, fuse_predictions, reference_fuse_predictions, wbf, wbf_each

TOL = 1e-6


def sorted_rows(labels, boxes, scores) -> np.ndarray:
    rows = np.column_stack([np.asarray(labels, dtype=float), np.asarray(scores, dtype=float),
                            np.asarray(boxes, dtype=float).reshape(-1, 4)])
    return rows[np.lexsort(rows.T[::-1])]


def reference(images, weights, iou_thr, skip_box_thr, conf_type) -> list[np.ndarray]:
    """ensemble-boxes image by image; ``images``: list of per-model (boxes, scores, labels)."""
    out = []
    for models in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its clipping warnings
            b, s, c = weighted_boxes_fusion([m[0] for m in models], [m[1] for m in models], [m[2] for m in models],
                                            weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type)
        out.append(sorted_rows(c, b, s))
    return out


def ours(images, weights, iou_thr, skip_box_thr, conf_type) -> list[np.ndarray]:
    """cxr.wbf.wbf on every image at once (group = image * 100 + label), split back per image."""
    group, model, scores, boxes = [], [], [], []
    for i, models in enumerate(images):
        for t, (b, s, c) in enumerate(models):
            group.append(i * 100 + np.asarray(c, dtype=np.int64))
            model.append(np.full(len(s), t))
            scores.append(np.asarray(s, dtype=float))
            boxes.append(np.asarray(b, dtype=float).reshape(-1, 4))
    g, b, s = wbf(np.concatenate(group), np.concatenate(model), np.concatenate(scores), np.concatenate(boxes),
                  weights, iou_thr, skip_box_thr, conf_type)
    assert (np.diff(g) >= 0).all(), "output sorted by group"
    return [sorted_rows(g[g // 100 == i] % 100, b[g // 100 == i], s[g // 100 == i]) for i in range(len(images))]


def assert_same(images, weights, iou_thr=0.55, skip_box_thr=0.0, conf_type="avg"):
    expected = reference(images, weights, iou_thr, skip_box_thr, conf_type)
    got = ours(images, weights, iou_thr, skip_box_thr, conf_type)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape == g.shape, f"image {i}: {len(g)} fused boxes, ensemble-boxes {len(e)}"
        np.testing.assert_allclose(g, e, atol=TOL, rtol=0, err_msg=f"image {i}")


def random_model(rng, n_max, n_labels, clustered=True):
    n = int(rng.integers(0, n_max + 1))
    centers = rng.uniform(0.1, 0.9, (4, 2))
    if clustered:  # boxes around a few centres, so clusters grow and the fused box moves
        c = centers[rng.integers(0, 4, n)] + rng.normal(0, 0.03, (n, 2))
    else:
        c = rng.uniform(0, 1, (n, 2))
    half = rng.uniform(0.02, 0.2, (n, 2))
    boxes = np.column_stack([c - half, c + half])  # some outside [0, 1]: clipped by both
    return boxes.tolist(), rng.uniform(0, 1, n).tolist(), rng.integers(0, n_labels, n).tolist()


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_random_cases_match_ensemble_boxes(conf_type):
    rng = np.random.default_rng(CONF_TYPES.index(conf_type))
    for trial in range(6):
        n_models = int(rng.integers(1, 5))
        weights = rng.uniform(0.5, 3.0, n_models).round(2).tolist()
        iou_thr = float(rng.choice([0.3, 0.4, 0.5, 0.55, 0.7]))
        skip = float(rng.choice([0.0, 0.05, 0.3]))
        images = [[random_model(rng, 40, 4, clustered=trial % 2 == 0) for _ in range(n_models)] for _ in range(25)]
        assert_same(images, weights, iou_thr, skip, conf_type)


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_edge_cases_match_ensemble_boxes(conf_type):
    box = [0.1, 0.2, 0.4, 0.6]
    one = ([box], [0.7], [3])
    empty = ([], [], [])
    images = [
        [one, empty, empty],  # one box; empty models
        [empty, empty, empty],  # nothing at all
        [([box, box], [0.5, 0.5], [2, 2]), ([box], [0.5], [2]), ([box], [0.9], [2])],  # identical boxes
        [([box, [0.5, 0.5, 0.9, 0.9]], [0.01, 0.02], [1, 1]), ([box], [0.03], [5]), empty],  # all under skip
        [([[0.3, 0.3, 0.3, 0.8], box], [0.9, 0.4], [0, 0]), one, ([[1.2, 1.2, 1.5, 1.5]], [0.8], [0])],  # zero area
        [([box, [0.12, 0.21, 0.41, 0.62]], [0.8, 0.6], [4, 4]), ([[0.11, 0.2, 0.4, 0.61]], [0.7], [4]), empty],
        # equal scores, chained overlaps (A~B, B~C, not A~C): the walk order decides the clusters
        [([[0.1, 0.1, 0.5, 0.5], [0.2, 0.1, 0.6, 0.5]], [0.6, 0.6], [1, 1]), ([[0.3, 0.1, 0.7, 0.5]], [0.6], [1]), empty],
    ]
    for skip in (0.0, 0.05):
        assert_same(images, [1.0, 2.0, 0.5], 0.55, skip, conf_type)
    assert_same([[one]], [1.0], 0.55, 0.0, conf_type)


def test_nothing_left_is_empty_arrays():
    g, b, s = wbf(np.array([3]), np.array([0]), np.array([0.01]), np.array([[0.1, 0.1, 0.2, 0.2]]), [1.0], 0.5, 0.5)
    assert g.shape == (0,) and b.shape == (0, 4) and s.shape == (0,)
    with pytest.raises(ValueError, match="conf_type"):
        wbf(np.array([3]), np.array([0]), np.array([0.5]), np.array([[0.1, 0.1, 0.2, 0.2]]), [1.0], conf_type="mean")


def prediction_tables(rng, n_images=30, n_models=3):
    ids = [f"img{i:03d}" for i in range(n_images)]
    sizes = pd.DataFrame({"image_id": ids, "width": rng.integers(800, 3000, n_images), "height": rng.integers(800, 3000, n_images)})
    tables = []
    for t in range(n_models):
        rows = []
        for image_id, w, h in sizes.itertuples(index=False):
            if rng.uniform() < 0.1:
                continue  # an image this model has no row for
            boxes, scores, labels = random_model(rng, 30, 14)
            for (x0, y0, x1, y1), s, c in zip(boxes, scores, labels):
                x0, x1 = np.clip([x0, x1], 0, 1) * w
                y0, y1 = np.clip([y0, y1], 0, 1) * h
                if x1 > x0 and y1 > y0:
                    rows.append([image_id, c, s, x0, y0, x1, y1])
            if rng.uniform() < 0.8:
                rows.append([image_id, 14, rng.uniform(), 0.0, 0.0, 1.0, 1.0])
        tables.append(pd.DataFrame(rows, columns=PREDICTION_COLUMNS).sample(frac=1, random_state=t))
    return tables, sizes


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_fuse_predictions_matches_the_image_by_image_reference(conf_type):
    tables, sizes = prediction_tables(np.random.default_rng(7))
    for weights, iou, skip in (([1, 1, 1], 0.55, 0.0), ([3, 1, 0.5], 0.4, 0.1)):
        got = fuse_predictions(tables, sizes, weights, iou, skip, conf_type)
        expected = reference_fuse_predictions(tables, sizes, weights, WBF(iou, skip, conf_type))
        assert list(got.columns) == PREDICTION_COLUMNS
        key = ["image_id", "class_id", "score", "x_min", "y_min"]
        got, expected = (d.sort_values(key).reset_index(drop=True) for d in (got, expected))
        assert len(got) == len(expected)
        assert (got["image_id"] == expected["image_id"]).all() and (got["class_id"] == expected["class_id"]).all()
        np.testing.assert_allclose(got["score"], expected["score"], atol=TOL, rtol=0)
        # boxes in original pixels: 1e-6 of the image size
        np.testing.assert_allclose(got.iloc[:, 3:].to_numpy(float), expected.iloc[:, 3:].to_numpy(float), atol=TOL * 3000, rtol=0)


def test_fuse_predictions_order_and_no_finding():
    sizes = pd.DataFrame({"image_id": ["a", "b"], "width": [100, 200], "height": [100, 100]})
    t1 = pd.DataFrame([["b", 3, 0.5, 10, 10, 50, 50], ["b", 14, 0.4, 0, 0, 1, 1], ["a", 2, 0.2, 5, 5, 20, 20],
                       ["a", 5, 0.9, 50, 50, 90, 90]], columns=PREDICTION_COLUMNS)
    t2 = pd.DataFrame([["b", 3, 0.7, 12, 10, 52, 50], ["b", 14, 0.8, 0, 0, 1, 1]], columns=PREDICTION_COLUMNS)
    out = fuse_predictions([t1, t2], sizes, [1.0, 3.0])
    assert out["image_id"].tolist() == ["a", "a", "b", "b"]  # per image: boxes by score, then No finding
    assert out["class_id"].tolist() == [5, 2, 3, 14]
    assert out["score"].iloc[-1] == pytest.approx((0.4 + 3 * 0.8) / 4)
    assert fuse_predictions([t1.iloc[:0]], sizes).empty
    with pytest.raises(ValueError, match="2 weights for 1 tables"):
        fuse_predictions([t1], sizes, [1, 2])
    with pytest.raises(ValueError, match="no size"):
        fuse_predictions([t1], sizes.iloc[:1])


def test_one_clustering_serves_every_conf_type():
    rng = np.random.default_rng(11)
    images = [[random_model(rng, 30, 3) for _ in range(3)] for _ in range(10)]
    group = np.concatenate([i * 100 + np.asarray(m[2], dtype=np.int64) for i, ms in enumerate(images) for m in ms])
    model = np.concatenate([np.full(len(m[1]), t) for ms in images for t, m in enumerate(ms)])
    scores = np.concatenate([np.asarray(m[1], dtype=float) for ms in images for m in ms])
    boxes = np.concatenate([np.asarray(m[0], dtype=float).reshape(-1, 4) for ms in images for m in ms])
    each = wbf_each(group, model, scores, boxes, [2.0, 1.0, 0.5], 0.5, 0.1, CONF_TYPES)
    for conf_type, (g, b, s) in zip(CONF_TYPES, each):
        g1, b1, s1 = wbf(group, model, scores, boxes, [2.0, 1.0, 0.5], 0.5, 0.1, conf_type)
        assert (g == g1).all() and np.array_equal(b, b1) and np.array_equal(s, s1)
