"""Prior-box baseline: the floor every learned model must beat.

For each finding class: the mean training box (in coordinates normalized by the image
size), scored by the share of training images that have the class; plus the No-finding
row scored by the share of normal images. Every image gets the same 15 rows, scaled to
its own original size. Learns from fused labels (:func:`cxr.fusion.fuse_readers`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, FINDING_CLASSES, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS


def fit_prior(fused: pd.DataFrame, sizes: pd.DataFrame) -> pd.DataFrame:
    """Per class: ``class_id, score, x_min..y_max`` with the box normalized to [0, 1]."""
    known = sizes.set_index("image_id")
    n_images = fused["image_id"].nunique()
    rows = []
    for c in FINDING_CLASSES:
        g = fused[fused["class_id"] == c]
        if len(g) == 0:
            continue
        wh = known.loc[g["image_id"], ["width", "height"]].to_numpy(dtype=float)
        norm = g[BOX_COLUMNS].to_numpy(dtype=float) / np.column_stack([wh, wh])
        rows.append([c, g["image_id"].nunique() / n_images, *norm.mean(axis=0)])
    normal = fused.loc[fused["class_id"] == NO_FINDING, "image_id"].nunique() / n_images
    rows.append([NO_FINDING, normal, *NO_FINDING_BOX])
    return pd.DataFrame(rows, columns=["class_id", "score", *BOX_COLUMNS])


def predict_prior(prior: pd.DataFrame, image_ids: list[str], sizes: pd.DataFrame) -> pd.DataFrame:
    """The prior's rows for every image, in the prediction format (original pixels): per image its finding
    rows then its No-finding row."""
    ids = list(image_ids)
    wh = sizes.set_index("image_id").loc[ids, ["width", "height"]].to_numpy(dtype=float)
    finding = prior[prior["class_id"] != NO_FINDING]
    no_finding = prior[prior["class_id"] == NO_FINDING]
    rows = pd.concat([finding, no_finding], ignore_index=True)
    k = len(rows)
    scale = np.where(np.arange(k)[None, :, None] < len(finding), np.tile(wh, 2)[:, None, :], 1.0)  # No finding: 0 0 1 1
    boxes = rows[BOX_COLUMNS].to_numpy(dtype=float)[None, :, :] * scale
    out = pd.DataFrame(boxes.reshape(-1, 4), columns=BOX_COLUMNS)
    out.insert(0, "image_id", np.repeat(np.asarray(ids, dtype=object), k))
    out.insert(1, "class_id", np.tile(rows["class_id"].to_numpy(), len(ids)))
    out.insert(2, "score", np.tile(rows["score"].to_numpy(dtype=float), len(ids)))
    return out[PREDICTION_COLUMNS]


def oof_prior(fused: pd.DataFrame, sizes: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Out-of-fold prior predictions: each fold's images get the prior fit on the other folds."""
    parts = []
    for k in sorted(folds["fold"].unique()):
        held_out = folds.loc[folds["fold"] == k, "image_id"].tolist()
        prior = fit_prior(fused[~fused["image_id"].isin(held_out)], sizes)
        parts.append(predict_prior(prior, held_out, sizes))
    return pd.concat(parts, ignore_index=True)
