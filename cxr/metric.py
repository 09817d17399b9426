"""The competition metric: PASCAL VOC mAP at IoU 0.4 over 15 classes, plus COCO AP for reference.

Per class (the PASCAL VOC devkit's ``voc_eval``, all-point interpolation):

1. All predictions of the class, over all images, sorted by score (highest first; ties
   keep input order).
2. Each prediction takes the ground-truth box of its image and class with the highest
   IoU. If that IoU is > 0.4 and the box is not yet taken, the prediction is a true
   positive and takes it; otherwise a false positive (a second hit on a taken box is a
   duplicate, hence false).
3. AP = area under the precision envelope of the precision/recall curve.

No finding (class 14) is scored like any class on the box ``(0, 0, 1, 1)``: ground truth
for every image without a finding, predictions from ``14 p 0 0 1 1`` rows. mAP is the mean
over the classes that have ground truth in the evaluated images; a class with none has
AP ``None`` and is left out (with all 3,000 test images every class has some).

Ground truth comes from a label frame (:mod:`cxr.labels`): several readers per image
(Kaggle train) are fused with :data:`cxr.fusion.DEFAULT` (WBF, IoU 0.4); a single reader
(PhysioNet consensus) is taken as it is.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
import pandas as pd

from cxr.boxes import iou_matrix
from cxr.dataset import BOX_COLUMNS, IOU_THRESHOLD, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES
from cxr.fusion import DEFAULT, FusionConfig, fuse_readers


def ground_truth(labels: pd.DataFrame, fusion: FusionConfig | None = None) -> pd.DataFrame:
    """Scoring boxes ``image_id, class_id, x_min..y_max``, No finding as ``0 0 1 1``.

    ``fusion=None`` picks the default: fuse when an image has several readers.
    """
    if fusion is None:
        several = labels.groupby("image_id")["rad_id"].nunique().max() > 1
        fusion = DEFAULT if several else FusionConfig(mode="keep_all")
    gt = fuse_readers(labels, fusion)[["image_id", "class_id", *BOX_COLUMNS]].copy()
    gt.loc[gt["class_id"] == NO_FINDING, BOX_COLUMNS] = NO_FINDING_BOX
    return gt.reset_index(drop=True)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated AP of one precision/recall curve."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def match_class(gt: pd.DataFrame, preds: pd.DataFrame, iou_thr: float = IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and true-positive flags of one class's predictions (sorted by score), and #GT.

    Matching is per image, but because every image is walked in the same global score
    order, the result is the devkit's global greedy matching.
    """
    order = np.argsort(-preds["score"].to_numpy(dtype=float), kind="stable")
    scores = preds["score"].to_numpy(dtype=float)[order]
    boxes = preds[BOX_COLUMNS].to_numpy(dtype=float)[order]
    image_of = preds["image_id"].to_numpy()[order]
    tp = np.zeros(len(order), dtype=bool)
    gt_by_image = {k: g[BOX_COLUMNS].to_numpy(dtype=float) for k, g in gt.groupby("image_id")}
    for image_id, rows in pd.Series(image_of).groupby(image_of, sort=False).indices.items():
        gt_boxes = gt_by_image.get(image_id)
        if gt_boxes is None:
            continue
        ious = iou_matrix(boxes[rows], gt_boxes)  # rows ascend, so they are in score order
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for k, row in enumerate(rows):
            j = int(np.argmax(ious[k]))
            if ious[k, j] > iou_thr and not taken[j]:
                taken[j] = True
                tp[row] = True
    return scores, tp, len(gt)


def class_pr(gt: pd.DataFrame, preds: pd.DataFrame, iou_thr: float = IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall arrays of one class (for AP and PR plots)."""
    _, tp, n_gt = match_class(gt, preds, iou_thr)
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    recall = ctp / max(n_gt, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
    return precision, recall


def mean_average_precision(
    gt: pd.DataFrame,
    preds: pd.DataFrame,
    image_ids: Iterable[str] | None = None,
    iou_thr: float = IOU_THRESHOLD,
) -> dict:
    """``{"map": float, "ap": {"0": float|None, ..., "14": ...}}`` over ``image_ids``.

    ``gt`` from :func:`ground_truth`; ``preds`` in the prediction format. ``image_ids``
    defaults to every image in ``gt``; predictions for other images are an error,
    since they usually mean the wrong split was scored.
    """
    ids = set(gt["image_id"]) if image_ids is None else set(image_ids)
    unknown = set(preds["image_id"]) - ids
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image(s) are not among the scored images, e.g. {sorted(unknown)[:3]}")
    gt = gt[gt["image_id"].isin(ids)]
    ap: dict[str, float | None] = {}
    for c in range(NUM_CLASSES):
        g, p = gt[gt["class_id"] == c], preds[preds["class_id"] == c]
        if len(g) == 0:
            ap[str(c)] = None
            continue
        precision, recall = class_pr(g, p, iou_thr)
        ap[str(c)] = average_precision(recall, precision) if len(p) else 0.0
    present = [v for v in ap.values() if v is not None]
    return {"map": float(np.mean(present)) if present else 0.0, "ap": ap}


def coco_ap(gt: pd.DataFrame, preds: pd.DataFrame, image_ids: Iterable[str] | None = None) -> dict:
    """COCO AP (IoU .50:.95) and AP50 over the same 15 classes, via pycocotools (reference only).

    COCO's standard cap of 100 boxes per image applies here; the competition metric has none.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = sorted(set(gt["image_id"]) if image_ids is None else set(image_ids))
    index = {k: i for i, k in enumerate(ids)}
    gt = gt[gt["image_id"].isin(index)]

    def xywh(df: pd.DataFrame) -> np.ndarray:
        b = df[BOX_COLUMNS].to_numpy(dtype=float)
        return np.column_stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]])

    coco_gt = COCO()
    coco_gt.dataset = {
        "images": [{"id": i} for i in range(len(ids))],
        "categories": [{"id": c} for c in range(NUM_CLASSES)],
        "annotations": [
            {"id": n + 1, "image_id": index[r.image_id], "category_id": int(r.class_id), "bbox": list(map(float, box)),
             "area": float(box[2] * box[3]), "iscrowd": 0}
            for n, (r, box) in enumerate(zip(gt.itertuples(), xywh(gt)))
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        if len(preds) == 0:
            return {"coco_ap": 0.0, "coco_ap50": 0.0}
        dets = np.column_stack([preds["image_id"].map(index).to_numpy(), xywh(preds), preds["score"], preds["class_id"]])
        coco_dt = coco_gt.loadRes(dets.astype(float))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"coco_ap": float(ev.stats[0]), "coco_ap50": float(ev.stats[1])}
