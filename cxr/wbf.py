"""Weighted boxes fusion of prediction tables: flip TTA, fold models, and the model ensemble.

One function serves all three, so the ensemble fuses models exactly the way a model fuses
its own TTA views. Inputs and output are in the shared prediction format (original pixels).
ensemble-boxes wants [0, 1] coordinates, so boxes are divided by each image's original size
and multiplied back. No-finding rows (class 14, box 0 0 1 1) are not boxes to fuse: their
scores are averaged with the same weights, an input without the row counting as 0.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS

ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


def fuse_predictions(
    tables: Sequence[pd.DataFrame],
    sizes: pd.DataFrame,
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
) -> pd.DataFrame:
    """Fuse ``tables`` (one per model / fold / TTA view) image by image with WBF."""
    weights = list(weights) if weights is not None else [1.0] * len(tables)
    if len(weights) != len(tables):
        raise ValueError(f"{len(weights)} weights for {len(tables)} tables")
    known = sizes.set_index("image_id")
    groups = [dict(tuple(t.groupby("image_id"))) for t in tables]
    image_ids = sorted(set().union(*[g.keys() for g in groups]))
    parts = []
    for image_id in image_ids:
        wh = known.loc[image_id, ["width", "height"]].to_numpy(dtype=float)
        scale = np.concatenate([wh, wh])
        boxes, scores, labels, normal = [], [], [], 0.0
        for g, w in zip(groups, weights):
            t = g.get(image_id)
            t = t if t is not None else pd.DataFrame(columns=PREDICTION_COLUMNS)
            finding = t[t["class_id"] != NO_FINDING]
            boxes.append(np.clip(finding[BOX_COLUMNS].to_numpy(dtype=float) / scale, 0, 1).tolist())
            scores.append(finding["score"].to_numpy(dtype=float).tolist())
            labels.append(finding["class_id"].to_numpy(dtype=int).tolist())
            no_finding = t.loc[t["class_id"] == NO_FINDING, "score"]
            normal += w * float(no_finding.max()) if len(no_finding) else 0.0
        if any(len(b) for b in boxes):
            b, s, c = weighted_boxes_fusion(
                boxes, scores, labels, weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type
            )
            part = pd.DataFrame(np.asarray(b).reshape(-1, 4) * scale, columns=BOX_COLUMNS)
            part.insert(0, "image_id", image_id)
            part.insert(1, "class_id", np.asarray(c, dtype=int))
            part.insert(2, "score", np.clip(np.asarray(s, dtype=float), 0, 1))
            parts.append(part)
        if normal > 0:
            parts.append(pd.DataFrame([[image_id, NO_FINDING, normal / sum(weights), *NO_FINDING_BOX]], columns=PREDICTION_COLUMNS))
    if not parts:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    out = pd.concat(parts, ignore_index=True)[PREDICTION_COLUMNS]
    return out[(out["x_max"] > out["x_min"]) & (out["y_max"] > out["y_min"])].reset_index(drop=True)


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``x_min, y_min, x_max, y_max`` boxes left-right in an image ``width`` wide."""
    b = np.asarray(boxes, dtype=float).reshape(-1, 4).copy()
    b[:, [0, 2]] = width - b[:, [2, 0]]
    return b
