"""Weighted boxes fusion of prediction tables: flip TTA, fold models, and the model ensemble.

One function serves all three, so the ensemble fuses models exactly the way a model fuses
its own TTA views. Inputs and output are in the shared prediction format (original pixels).
Boxes are divided by each image's original size (WBF works in [0, 1]) and multiplied back.
No-finding rows (class 14, box 0 0 1 1) are not boxes to fuse: their scores are averaged with
the same weights, an input without the row counting as 0.

The fusion is ensemble-boxes' ``weighted_boxes_fusion`` (ZFTurbo, v1.0.9), re-implemented to
run on every image and class at once; ensemble-boxes stays the reference of the parity tests
(``tests/test_wbf.py``, tolerance 1e-6) and of ``bench/wbf_bench.py``. Its algorithm, per image
and class:

1. drop boxes scoring under ``skip_box_thr`` and boxes of zero area (after clipping to [0, 1]);
   a box's weighted score is ``score * weight[model]``;
2. walk the boxes by weighted score, highest first; each joins the cluster whose current fused
   box overlaps it most if that IoU is > ``iou_thr``, else starts a cluster;
3. a cluster's fused box is the weighted-score-weighted mean of its members (kept in float32,
   as ensemble-boxes does), its score the mean weighted score (``max``: the highest), then
   rescaled by ``conf_type``.

Step 2 is sequential within one image and class but independent across them, so the walk runs
in lockstep: step r takes the r-th box of every (image, class) group at once, with numpy.
Ties in score are broken later-input-first (what ensemble-boxes' ``argsort()[::-1]`` gives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from cxr.config import Fraction, IoU
from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, NUM_CLASSES, PREDICTION_COLUMNS

ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
CONF_TYPES: tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
CHUNK_BOXES = 400_000  # boxes fused per lockstep pass: bounds memory, costs nothing in speed


def wbf(
    group: np.ndarray,
    model: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    weights: Sequence[float],
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WBF of many independent groups (one group = one image and class) in one call.

    Inputs, one entry per box, in the order ensemble-boxes would see them (model by model, then
    row by row): ``group`` int keys, ``model`` index into ``weights``, raw ``scores``, ``boxes``
    ``(N, 4)`` in [0, 1] (clipped here). Returns ``(group, boxes, scores)`` of the fused boxes,
    sorted by group, then score (highest first). For one group this equals
    ``ensemble_boxes.weighted_boxes_fusion`` (within 1e-6).
    """
    return wbf_each(group, model, scores, boxes, weights, iou_thr, skip_box_thr, (conf_type,))[0]


def wbf_each(
    group: np.ndarray,
    model: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    weights: Sequence[float],
    iou_thr: float,
    skip_box_thr: float,
    conf_types: Sequence[str],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`wbf` for several ``conf_types`` at the price of one: the clusters do not depend on it."""
    bad = [c for c in conf_types if c not in CONF_TYPES]
    if bad:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {bad[0]!r}")
    if not 0 <= iou_thr <= 1:
        raise ValueError(f"iou_thr must be in [0, 1], got {iou_thr}")
    w = np.asarray(weights, dtype=float)
    group = np.asarray(group, dtype=np.int64)
    model = np.asarray(model, dtype=np.int64)
    scores = np.asarray(scores, dtype=float)
    b = np.clip(np.asarray(boxes, dtype=float).reshape(-1, 4), 0.0, 1.0)
    b = np.column_stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                         np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])])
    keep = (scores >= skip_box_thr) & ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) != 0.0)
    index = np.flatnonzero(keep)
    if len(index) == 0:
        return [(np.zeros(0, dtype=np.int64), np.zeros((0, 4)), np.zeros(0)) for _ in conf_types]
    group, model, b = group[index], model[index], b[index]
    weighted = scores[index] * w[model]
    order = _group_then_score(group, weighted)
    group, model, weighted, b = group[order], model[order], weighted[order], b[order]
    # chunks of whole groups, about CHUNK_BOXES boxes each
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    cuts = np.unique(np.r_[0, starts[np.searchsorted(starts, np.arange(CHUNK_BOXES, len(group), CHUNK_BOXES))], len(group)])
    out = [_wbf_sorted(group[i:j], model[i:j], weighted[i:j], b[i:j], w, iou_thr, tuple(conf_types))
           for i, j in zip(cuts[:-1], cuts[1:]) if j > i]
    g = np.concatenate([o[0] for o in out])
    fused = np.concatenate([o[1] for o in out])
    results = []
    for k in range(len(conf_types)):
        s = np.concatenate([o[2][k] for o in out])
        order = _group_then_score(g, s, later_first=False)
        results.append((g[order], fused[order], s[order]))
    return results


def _group_then_score(group: np.ndarray, score: np.ndarray, later_first: bool = True) -> np.ndarray:
    """Indices ordering rows by group, then score (highest first); equal scores later input first
    (ensemble-boxes' ``argsort()[::-1]``) or, with ``later_first=False``, in input order. One float
    and one integer sort: a lexsort is ten times slower."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if later_first:
        return n - 1 - _group_then_score(group[::-1], score[::-1], later_first=False)
    by_score = np.argsort(-score)
    if (np.diff(score[by_score]) == 0).any():  # ties: a stable sort keeps input order
        by_score = np.argsort(-score, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[by_score] = np.arange(n)
    low, high = int(group.min()), int(group.max())
    if (high - low + 1) * n >= 2**62:
        return np.lexsort((rank, group))
    return np.argsort((group - low) * n + rank)


def _wbf_sorted(group, model, weighted, b, w, iou_thr, conf_types):
    """The lockstep walk over boxes already sorted by group, then weighted score (highest first)."""
    n = len(group)
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    size = np.diff(np.r_[first, n])
    by_size = np.argsort(-size, kind="stable")  # active groups at step r are a prefix
    start, size = first[by_size], size[by_size]
    n_groups = len(start)
    # cluster k of group i lives in slot start[i] + k (a group has at most as many clusters as boxes);
    # slot n is a dummy of zero area, IoU 0 with anything, that pads the groups with fewer clusters
    x1, y1, x2, y2 = (np.full(n + 1, -1.0) for _ in range(4))  # the fused box that boxes are matched to
    area = np.zeros(n + 1)
    acc = np.zeros((n, 4), dtype=np.float32)  # sum of weighted score * box, accumulated in float32 like ensemble-boxes
    conf = np.zeros(n)  # sum of weighted scores
    wsum = np.zeros(n)  # sum of model weights
    top = np.zeros(n)  # highest weighted score
    count = np.zeros(n, dtype=np.int64)
    needs_models = bool({"box_and_model_avg", "absent_model_aware_avg"} & set(conf_types))
    present = np.zeros((n, len(w)), dtype=bool) if needs_models else None
    clusters = np.zeros(n_groups, dtype=np.int64)
    steps = np.arange(int(size[0]))
    active_at = np.searchsorted(-size, -steps, side="left")  # groups with more than r boxes
    for r in steps:
        active = active_at[r]
        st, cl = start[:active], clusters[:active]
        box = st + r
        nb = b[box]
        bx1, by1, bx2, by2 = nb[:, 0:1], nb[:, 1:2], nb[:, 2:3], nb[:, 3:4]
        slot = st + cl
        k = int(cl.max())
        if k:
            slots = np.where(steps[:k] < cl[:, None], st[:, None] + steps[:k], n)
            inter = (np.maximum(np.minimum(x2.take(slots), bx2) - np.maximum(x1.take(slots), bx1), 0)
                     * np.maximum(np.minimum(y2.take(slots), by2) - np.maximum(y1.take(slots), by1), 0))
            iou = inter / (area.take(slots) + (bx2 - bx1) * (by2 - by1) - inter)
            best = np.argmax(iou, axis=1)
            rows = np.arange(active)
            join = iou[rows, best] > iou_thr
            slot = np.where(join, slots[rows, best], slot)
        else:
            join = np.zeros(active, dtype=bool)
        new = ~join
        clusters[:active] += new
        ws = weighted[box]
        acc[slot] = (acc[slot].astype(float) + ws[:, None] * nb).astype(np.float32)
        conf[slot] += ws
        wsum[slot] += w[model[box]]
        top[slot] = np.maximum(top[slot], ws)
        count[slot] += 1
        if needs_models:
            present[slot, model[box]] = True
        # a new cluster is the box itself; a grown one is the float32 weighted mean
        fused = np.where(join[:, None], (acc[slot].astype(float) / conf[slot][:, None]).astype(np.float32), nb)
        x1[slot], y1[slot], x2[slot], y2[slot] = fused.T
        area[slot] = (fused[:, 2] - fused[:, 0]) * (fused[:, 3] - fused[:, 1])
    coords = np.column_stack([x1[:n], y1[:n], x2[:n], y2[:n]])
    # every group's clusters: slots start[i] .. start[i] + clusters[i] - 1
    offset = np.arange(int(clusters.sum())) - np.repeat(np.cumsum(clusters) - clusters, clusters)
    slots = np.repeat(start, clusters) + offset
    cnt, conf_s, wsum_s = count[slots], conf[slots], wsum[slots]
    single = cnt == 1
    # ensemble-boxes keeps a one-box cluster as the box (float64); a fused one in float32
    mean = np.where(single, conf_s, (conf_s / cnt).astype(np.float32).astype(float))
    weight = np.where(single, wsum_s, wsum_s.astype(np.float32).astype(float))
    scores = []
    for conf_type in conf_types:  # the clusters do not depend on conf_type, only their scores
        if conf_type == "max":
            score = np.where(single, conf_s, top[slots].astype(np.float32).astype(float)) / w.max()
        elif conf_type == "box_and_model_avg":
            score = mean * cnt / weight
            score = score * (present[slots] * w).sum(axis=1) / w.sum()
        elif conf_type == "absent_model_aware_avg":
            score = mean * cnt / (weight + (~present[slots] * w).sum(axis=1))
        else:
            score = mean * np.minimum(len(w), cnt) / w.sum()
        scores.append(score)
    return group[slots], coords[slots], scores


@dataclass
class Prepared:
    """Prediction tables as arrays, ready to fuse with any parameters (the tuner fuses one set many times)."""

    image_ids: np.ndarray  # sorted ids of every image with a row in any table
    scale: np.ndarray  # (images, 4): width, height, width, height
    n_tables: int
    group: np.ndarray  # finding rows: image index * 15 + class
    model: np.ndarray  # table index
    score: np.ndarray
    boxes: np.ndarray  # (rows, 4), divided by the image size
    nf_image: np.ndarray  # per image and table with No-finding rows: the highest such score
    nf_model: np.ndarray
    nf_score: np.ndarray


def prepare(tables: Sequence[pd.DataFrame], sizes: pd.DataFrame) -> Prepared:
    """``tables`` in the prediction format, ``sizes`` (``image_id, width, height``) of all their images."""
    all_rows = pd.concat([t[PREDICTION_COLUMNS] for t in tables], ignore_index=True)
    model = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    code, image_ids = pd.factorize(all_rows["image_id"].astype(str), sort=True)
    image_ids = np.asarray(image_ids, dtype=object)
    known = sizes.assign(image_id=sizes["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id")
    unknown = sorted(set(image_ids) - set(known.index))
    if unknown:
        raise ValueError(f"{len(unknown)} image(s) have no size, e.g. {unknown[:3]}")
    wh = known.loc[image_ids, ["width", "height"]].to_numpy(dtype=float).reshape(-1, 2)
    scale = np.column_stack([wh, wh])
    cls = all_rows["class_id"].to_numpy(dtype=np.int64)
    score = all_rows["score"].to_numpy(dtype=float)
    f = np.flatnonzero(cls != NO_FINDING)
    nf = np.flatnonzero(cls == NO_FINDING)
    best = pd.Series(score[nf]).groupby([code[nf], model[nf]]).max()
    return Prepared(image_ids, scale, len(tables), code[f] * NUM_CLASSES + cls[f], model[f], score[f],
                    all_rows[BOX_COLUMNS].to_numpy(dtype=float)[f] / scale[code[f]],
                    best.index.get_level_values(0).to_numpy(dtype=np.int64),
                    best.index.get_level_values(1).to_numpy(dtype=np.int64), best.to_numpy(dtype=float))


def fuse_arrays(
    prep: Prepared,
    weights: Sequence[float],
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fuse_predictions` as arrays ``(image index into prep.image_ids, class_id, score, boxes)``,
    rows in the order of its table."""
    return fuse_arrays_each(prep, weights, iou_thr, skip_box_thr, (conf_type,))[0]


def fuse_arrays_each(
    prep: Prepared,
    weights: Sequence[float],
    iou_thr: float,
    skip_box_thr: float,
    conf_types: Sequence[str],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`fuse_arrays` for several ``conf_types``, clustering once."""
    w = np.asarray(weights, dtype=float)
    if len(w) != prep.n_tables:
        raise ValueError(f"{len(w)} weights for {prep.n_tables} tables")
    # No finding: per image, the weighted sum over inputs of each input's highest No-finding score
    normal = np.zeros(len(prep.image_ids))
    np.add.at(normal, prep.nf_image, w[prep.nf_model] * prep.nf_score)
    has = np.flatnonzero(normal > 0)
    out = []
    for g, fused, s in wbf_each(prep.group, prep.model, prep.score, prep.boxes, w, iou_thr, skip_box_thr, conf_types):
        image = np.r_[g // NUM_CLASSES, has]
        cls = np.r_[g % NUM_CLASSES, np.full(len(has), NO_FINDING)]
        score = np.r_[np.clip(s, 0, 1), normal[has] / w.sum()]
        boxes = np.r_[fused * prep.scale[g // NUM_CLASSES], np.tile(np.asarray(NO_FINDING_BOX, dtype=float), (len(has), 1))]
        # per image: boxes by score (highest first), then the No-finding row
        order = _group_then_score(image * 2 + (cls == NO_FINDING), score, later_first=False)
        keep = order[(boxes[order, 2] > boxes[order, 0]) & (boxes[order, 3] > boxes[order, 1])]
        out.append((image[keep], cls[keep], score[keep], boxes[keep]))
    return out


@dataclass(frozen=True)
class WBF:
    """WBF settings as a config block (blend YAML, fold merge). Defaults: the 2nd-place final blend
    (IoU 0.4, skip 0, avg; ZFTurbo et al.'s ensemble_models.py)."""

    iou_thr: IoU = 0.4
    skip_box_thr: Fraction = 0.0
    conf_type: ConfType = "avg"


# How ``python -m models MODEL merge`` fuses its folds' test tables unless told otherwise
# (``--fold-fusion``, make's FOLD_FUSION=); predict-images reads the settings the merge saved.
FOLD_MERGE = WBF(iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")


def _table_weights(tables: Sequence[pd.DataFrame], weights: Sequence[float] | None) -> list[float]:
    weights = [1.0] * len(tables) if weights is None else [float(w) for w in weights]
    if len(weights) != len(tables):
        raise ValueError(f"{len(weights)} weights for {len(tables)} tables")
    return weights


def fuse_group(tables: Sequence[pd.DataFrame], sizes: pd.DataFrame, settings: WBF,
               weights: Sequence[float] | None = None) -> pd.DataFrame:
    """WBF of ``tables`` with ``settings``: the one fusion step of fold merge, blend groups and the final blend.

    Tables of weight 0 are left out; one table left is returned as it is (a single table is not
    fused with itself). ``sizes`` = ``image_id, width, height`` of every image.
    """
    weights = _table_weights(tables, weights)
    kept = [(t, w) for t, w in zip(tables, weights) if w > 0]
    if not kept:
        raise ValueError("every table has weight 0: nothing to fuse")
    if len(kept) == 1:
        return kept[0][0].reset_index(drop=True)
    return fuse_predictions([t for t, _ in kept], sizes, [w for _, w in kept], settings.iou_thr,
                            settings.skip_box_thr, settings.conf_type)


def fuse_predictions(
    tables: Sequence[pd.DataFrame],
    sizes: pd.DataFrame,
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
) -> pd.DataFrame:
    """Fuse ``tables`` (one per model / fold / TTA view) image by image with WBF.

    ``sizes``: ``image_id, width, height`` (original pixels) of every image in the tables.
    Returns one table in the prediction format: per image (sorted ids) its fused boxes, highest
    score first, then its No-finding row (the weighted mean of the inputs' No-finding scores)
    when that is above 0. Scores are clipped to [0, 1].
    """
    weights = _table_weights(tables, weights)
    if not tables:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    prep = prepare(tables, sizes)
    image, cls, score, boxes = fuse_arrays(prep, weights, iou_thr, skip_box_thr, conf_type)
    out = pd.DataFrame({"image_id": prep.image_ids[image], "class_id": cls.astype(int), "score": score})
    out[BOX_COLUMNS] = boxes
    return out


def reference_fuse_predictions(tables: Sequence[pd.DataFrame], sizes: pd.DataFrame, weights: Sequence[float] | None,
                               settings: WBF) -> pd.DataFrame:
    """:func:`fuse_predictions` with ``settings`` by calling ensemble-boxes image by image: the parity
    reference of the tests and the bench (slow: ~30 ms per image of three models with 100 boxes each)."""
    from ensemble_boxes import weighted_boxes_fusion

    weights = _table_weights(tables, weights)
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
                boxes, scores, labels, weights=weights, iou_thr=settings.iou_thr, skip_box_thr=settings.skip_box_thr,
                conf_type=settings.conf_type
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
