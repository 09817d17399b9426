"""The competition metric of :mod:`cxr.metric`, split in two so that tuning scores fast.

``cxr.metric`` walks each class's predictions in global score order and lets each take its
best-IoU free ground-truth box. A prediction's fate depends only on the predictions of the same
image and class ranked above it, so:

1. :func:`score_rows` marks every row true/false positive once per prediction table, for all
   images and classes at once (the first row, in score order, whose best ground-truth box is
   above IoU 0.4 takes it; later rows on the same box are duplicates);
2. :meth:`Scored.map` gives mAP@0.4 on any subset of images (a fold, the other folds) from the
   rows sorted once: a masked cumulative sum, no new matching.

The gate changes only scores: every box of one image is scaled by the same factor (the order
within the image is kept) or dropped, and the No-finding rows are replaced
(:func:`gated`). Results equal :func:`cxr.metric.mean_average_precision` (tests/test_ensemble.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, IOU_THRESHOLD, NO_FINDING, NUM_CLASSES
from cxr.metric import average_precision


def _desc(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` highest first, ties in input order (a stable sort only when ties exist)."""
    order = np.argsort(-scores)
    if len(order) > 1 and (np.diff(scores[order]) == 0).any():
        order = np.argsort(-scores, kind="stable")
    return order


class Truth:
    """Ground truth (from :func:`cxr.metric.ground_truth`) over ``image_ids``, indexed for matching."""

    def __init__(self, gt: pd.DataFrame, image_ids: list[str]):
        self.ids = pd.Index(sorted(set(image_ids)))
        gt = gt[gt["image_id"].isin(self.ids)]
        image = self.ids.get_indexer(gt["image_id"])
        cls = gt["class_id"].to_numpy(dtype=np.int64)
        order = np.lexsort((image, cls))  # by class, then image; rows keep their order within (stable)
        self.cls, self.image = cls[order], image[order]
        self.boxes = gt[BOX_COLUMNS].to_numpy(dtype=float)[order]
        self.area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        # rows of (class c, image i): start[c, i] .. start[c, i + 1] - 1
        key = self.cls * len(self.ids) + self.image
        self.start = np.searchsorted(key, np.arange(NUM_CLASSES * len(self.ids) + 1)).reshape(-1)
        self.counts = np.bincount(key, minlength=NUM_CLASSES * len(self.ids)).reshape(NUM_CLASSES, len(self.ids))

    def mask(self, image_ids) -> np.ndarray:
        """Boolean per image (in ``ids`` order): is it one of ``image_ids``."""
        m = np.zeros(len(self.ids), dtype=bool)
        m[self.ids.get_indexer(list(image_ids))] = True
        return m


@dataclass
class Scored:
    """Rows of one prediction table with their true-positive flags, per class sorted by score."""

    image: np.ndarray  # image index (``Truth.ids``) per row
    cls: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    truth: Truth = field(repr=False)
    order: list[np.ndarray] = field(default_factory=list, repr=False)  # per class: rows by score, ties in row order

    def __post_init__(self) -> None:
        if not self.order:
            by_class = [np.flatnonzero(self.cls == c) for c in range(NUM_CLASSES)]
            self.order = [rows[_desc(self.score[rows])] for rows in by_class]

    def ap(self, mask: np.ndarray | None = None) -> dict[str, float | None]:
        """AP@0.4 per class (``"0"`` .. ``"14"``, None without ground truth) over the images where ``mask`` is true."""
        aps: dict[str, float | None] = {}
        for c in range(NUM_CLASSES):
            n_gt = int(self.truth.counts[c].sum() if mask is None else self.truth.counts[c][mask].sum())
            if n_gt == 0:
                aps[str(c)] = None
                continue
            rows = self.order[c] if mask is None else self.order[c][mask[self.image[self.order[c]]]]
            tp = self.tp[rows]
            ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
            recall = ctp / n_gt
            precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
            aps[str(c)] = average_precision(recall, precision) if len(rows) else 0.0
        return aps

    def map(self, mask: np.ndarray | None = None) -> float:
        """mAP@0.4 over the images where ``mask`` (per image) is true; all images when None."""
        present = [v for v in self.ap(mask).values() if v is not None]
        return float(np.mean(present)) if present else 0.0


def score_rows(truth: Truth, preds: pd.DataFrame, iou_thr: float = IOU_THRESHOLD) -> Scored:
    """True-positive flag of every row of ``preds`` (prediction format), as cxr.metric matches them."""
    image = truth.ids.get_indexer(preds["image_id"])
    if (image < 0).any():
        unknown = sorted(set(preds["image_id"][image < 0]))
        raise ValueError(f"{len(unknown)} predicted image(s) are not among the scored images, e.g. {unknown[:3]}")
    return score_arrays(truth, image, preds["class_id"].to_numpy(dtype=np.int64), preds["score"].to_numpy(dtype=float),
                        preds[BOX_COLUMNS].to_numpy(dtype=float), iou_thr)


def score_arrays(truth: Truth, image: np.ndarray, cls: np.ndarray, score: np.ndarray, boxes: np.ndarray,
                 iou_thr: float = IOU_THRESHOLD) -> Scored:
    """:func:`score_rows` of a table given as arrays (``image``: index into ``truth.ids``)."""
    tp = np.zeros(len(score), dtype=bool)
    n_images = len(truth.ids)
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(cls == c)
        if len(rows) == 0:
            continue
        # within each image by score, ties in row order: the devkit's global walk restricted to one image
        by_score = _desc(score[rows])
        rank = np.empty(len(rows), dtype=np.int64)
        rank[by_score] = np.arange(len(rows))
        rows = rows[np.argsort(image[rows] * len(rows) + rank)]
        img = image[rows]
        first = truth.start[c * n_images + img]
        count = truth.counts[c][img]
        has = count > 0
        rows, img, first, count = rows[has], img[has], first[has], count[has]
        if len(rows) == 0:
            continue
        k = int(count.max())
        slots = first[:, None] + np.arange(k)
        valid = np.arange(k) < count[:, None]
        slots = np.where(valid, slots, 0)
        g, b = truth.boxes[slots], boxes[rows]
        # cxr.boxes.iou_matrix, pair by pair
        iw = np.minimum(b[:, None, 2], g[..., 2]) - np.maximum(b[:, None, 0], g[..., 0])
        ih = np.minimum(b[:, None, 3], g[..., 3]) - np.maximum(b[:, None, 1], g[..., 1])
        inter = iw.clip(min=0) * ih.clip(min=0)
        union = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[:, None] + truth.area[slots] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        iou[~valid] = -1.0
        best = np.argmax(iou, axis=1)
        hit = iou[np.arange(len(rows)), best] > iou_thr
        # the first hit on a ground-truth box takes it; later hits on it are duplicates
        key = (first + best)[hit]
        _, first_hit = np.unique(key, return_index=True)
        tp[rows[np.flatnonzero(hit)[first_hit]]] = True
    return Scored(image, cls, score, tp, truth)


def gated(s: Scored, p_abnormal: np.ndarray, rule: str, low: float = 0.0, high: float = 1.0) -> Scored:
    """``s`` after :func:`ensemble.ensemble.gate` (``p_abnormal`` per image of ``s.truth``), without re-matching.

    Box rows keep their flags (one factor per image keeps the order within the image); the
    No-finding rows become one per image that has any row, scored ``1 - p_abnormal``, a true
    positive where the image has No-finding ground truth.
    """
    if rule == "none":
        return s
    box = s.cls != NO_FINDING
    image, score, tp = s.image[box], s.score[box], s.tp[box]
    if rule == "hard":
        p_normal = 1.0 - p_abnormal[image]
        between = (p_normal >= low) & (p_normal <= high)
        score = np.where(between, score * (1.0 - p_normal), score)
        keep = p_normal <= high
        image, score, tp = image[keep], score[keep], tp[keep]
    ids = np.unique(s.image)
    normal_tp = s.truth.counts[NO_FINDING][ids] > 0
    return Scored(np.r_[image, ids], np.r_[s.cls[box][keep] if rule == "hard" else s.cls[box], np.full(len(ids), NO_FINDING)],
                  np.r_[score, 1.0 - p_abnormal[ids]], np.r_[tp, normal_tp], s.truth)
