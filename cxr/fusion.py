"""Reader fusion: turn 3 radiologists' boxes per image into training / scoring labels.

Modes (per image and class, each reader treated as one "model" of ensemble-boxes):

* ``keep_all``: every reader's box is kept (duplicates and all).
* ``nms``: overlapping boxes (IoU > ``iou_thr``) collapse to one reader's box.
* ``wbf``: overlapping boxes are averaged by weighted boxes fusion; ``score`` is the
  share of readers that drew the box (1.0 = all readers agree).

``drop_readers`` removes the named ``rad_id`` s first; an image that loses all its
readers is removed from the labels (it has no opinion left), not turned into No finding.

Reader selection works on whole images, by who read them: ``images_read_only_by`` names readers,
and the images every one of whose readers is among them are dropped (``select: drop``) or are the
only ones kept (``select: only``). ``normals_too: false`` (the default) leaves the images all their
readers called normal where they are, so the selection moves abnormal images only: the 2nd place's
rule is ``images_read_only_by: [R8, R9, R10]`` with ``select: drop``. A dropped image is gone from
the labels (a trainer skips it), never a No-finding image.

ensemble-boxes wants coordinates in [0, 1]. IoU is unchanged and box averages move
along when each axis is scaled by a constant, so each image is divided by its own largest
coordinate per axis and multiplied back: fusion needs no image sizes and is exact.

The default (:data:`DEFAULT`), used for OOF scoring and training labels unless a run
says otherwise: WBF at IoU 0.4, the competition's own matching threshold, so readers'
boxes the metric would treat as the same object become one box.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
from ensemble_boxes import nms, weighted_boxes_fusion

from cxr.config import IoU
from cxr.io import DataError
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, NO_FINDING

Mode = Literal["keep_all", "nms", "wbf"]


@dataclass(frozen=True)
class FusionConfig:
    mode: Mode = "wbf"  # keep_all: every reader's box; nms: one reader's box per overlap; wbf: their average
    iou_thr: IoU = 0.4  # readers' boxes overlapping more than this are one object
    drop_readers: tuple[str, ...] = field(default_factory=tuple)  # these readers' rows are removed first
    images_read_only_by: tuple[str, ...] = field(default_factory=tuple)  # images all of whose readers are here ...
    select: Literal["drop", "only"] = "drop"  # ... are dropped, or are the only ones kept
    normals_too: bool = False  # false: images every reader called normal are never dropped by the selection

    def selects(self) -> bool:
        return bool(self.images_read_only_by)


DEFAULT = FusionConfig()
FUSED_COLUMNS = ["image_id", "class_id", "rad_id", *BOX_COLUMNS, "score"]


def fuse_readers(labels: pd.DataFrame, cfg: FusionConfig = DEFAULT) -> pd.DataFrame:
    """Fuse a label frame (see :mod:`cxr.labels`) into one set of boxes per image.

    Returns the label frame's columns plus ``score`` (reader agreement, 1.0 for
    ``keep_all``); every image keeps at least one row: an image with no finding box
    gets a single No-finding row.
    """
    labels = select_images(labels[~labels["rad_id"].isin(cfg.drop_readers)], cfg)
    findings = labels[labels["class_id"] != NO_FINDING]
    parts = []
    if cfg.mode == "keep_all":
        parts.append(findings.assign(score=1.0))
    elif len(findings):
        parts.append(_fuse_findings(findings, labels, cfg))
    normal_ids = sorted(set(labels["image_id"]) - set(findings["image_id"]))
    normal = pd.DataFrame({"image_id": normal_ids, "class_id": NO_FINDING, "rad_id": "fused", "score": 1.0})
    normal[BOX_COLUMNS] = np.nan
    parts.append(normal)
    out = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else normal
    out["class_id"] = out["class_id"].astype(int)
    return out[FUSED_COLUMNS].sort_values(["image_id", "class_id"], kind="stable").reset_index(drop=True)


def selected_images(labels: pd.DataFrame, cfg: FusionConfig) -> pd.Index:
    """The ids ``cfg``'s reader selection keeps (all ids when it selects nothing)."""
    ids = pd.Index(labels["image_id"].unique())
    if not cfg.selects():
        return ids
    only = labels.groupby("image_id", sort=False)["rad_id"].agg(lambda r: set(r) <= set(cfg.images_read_only_by))
    normal = ~only.index.isin(labels.loc[labels["class_id"] != NO_FINDING, "image_id"])
    chosen = only if cfg.select == "only" else ~only
    if not cfg.normals_too:
        chosen |= normal
    return ids[ids.isin(chosen[chosen].index)]


def select_images(labels: pd.DataFrame, cfg: FusionConfig) -> pd.DataFrame:
    """The label rows of the images ``cfg``'s reader selection keeps."""
    if not cfg.selects():
        return labels
    unknown = sorted(set(cfg.images_read_only_by) - set(labels["rad_id"]))
    if unknown:  # a misspelt reader would select nothing without a word
        raise DataError("labels", f"images_read_only_by: {', '.join(map(repr, unknown))} read no image here "
                                  f"(readers: {', '.join(sorted(set(labels['rad_id'])))})")
    return labels[labels["image_id"].isin(selected_images(labels, cfg))]


def selection_summary(labels: pd.DataFrame, cfg: FusionConfig, fused: pd.DataFrame | None = None) -> str:
    """What ``cfg``'s reader selection keeps, for a run's log: images (abnormal ones) and fused boxes per class,
    each as kept/all. ``fused``: ``fuse_readers(labels, cfg)`` where the caller has it already."""
    fused_all = fuse_readers(labels, replace(cfg, images_read_only_by=()))
    fused = fuse_readers(labels, cfg) if fused is None else fused
    rule = (f"images read only by {','.join(cfg.images_read_only_by)}"
            f"{'' if cfg.normals_too else ' with a finding'}: {'dropped' if cfg.select == 'drop' else 'the only ones kept'}")

    def counts(f: pd.DataFrame) -> tuple[int, int, pd.Series]:
        finding = f[f["class_id"] != NO_FINDING]
        return f["image_id"].nunique(), finding["image_id"].nunique(), finding["class_id"].value_counts()

    n, ab, boxes = counts(fused)
    n0, ab0, boxes0 = counts(fused_all)
    per_class = ", ".join(f"{CLASS_NAMES[c]} {int(boxes.get(c, 0))}/{int(boxes0[c])}" for c in sorted(boxes0.index))
    return (f"labels: {rule}; kept {n}/{n0} images ({ab}/{ab0} with a finding); boxes per class kept/all: "
            f"{per_class}")


def count_boxes(labels: pd.DataFrame, configs: dict[str, FusionConfig]) -> pd.DataFrame:
    """Finding boxes kept per class under each fusion config (for reports and closing notes)."""
    table = {}
    for name, cfg in configs.items():
        fused = fuse_readers(labels, cfg)
        table[name] = fused[fused["class_id"] != NO_FINDING]["class_id"].value_counts()
    return pd.DataFrame(table).fillna(0).astype(int).sort_index()


def _fuse_findings(findings: pd.DataFrame, labels: pd.DataFrame, cfg: FusionConfig) -> pd.DataFrame:
    """Every image's finding boxes fused, one image at a time on numpy arrays (pandas indexing per image cost
    ~10x the fusion itself: 45 s instead of a few for the 15,000 real train images)."""
    findings = findings.sort_values("image_id", kind="stable")
    ids = findings["image_id"].to_numpy()
    boxes = findings[BOX_COLUMNS].to_numpy(dtype=float)
    classes = findings["class_id"].to_numpy(dtype=int)
    rads = findings["rad_id"].to_numpy()
    readers = labels.groupby("image_id")["rad_id"].unique()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    out_ids, out_boxes, out_classes, out_scores = [], [], [], []
    for a, b in zip(starts, [*starts[1:], len(ids)]):
        fb, fs, fc = _fuse_image(boxes[a:b], classes[a:b], rads[a:b], sorted(readers[ids[a]]), cfg)
        out_ids.append(np.full(len(fs), ids[a], dtype=object))
        out_boxes.append(fb)
        out_classes.append(fc)
        out_scores.append(fs)
    fused = pd.DataFrame(np.concatenate(out_boxes), columns=BOX_COLUMNS)
    fused.insert(0, "image_id", np.concatenate(out_ids))
    fused.insert(1, "class_id", np.concatenate(out_classes))
    fused.insert(2, "rad_id", "fused")
    fused["score"] = np.concatenate(out_scores)
    return fused


def _fuse_image(boxes: np.ndarray, classes: np.ndarray, rads: np.ndarray, readers: list[str],
                cfg: FusionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse one image's finding boxes (original pixels); readers who drew nothing still count in the
    agreement share. Returns (boxes (N, 4), scores, classes)."""
    extent = np.array([boxes[:, 2].max(), boxes[:, 3].max()] * 2)
    boxes_list, scores_list, labels_list = [], [], []
    for reader in readers:
        mine = rads == reader
        boxes_list.append((boxes[mine] / extent).tolist())
        scores_list.append([1.0] * int(mine.sum()))
        labels_list.append(classes[mine].tolist())
    if cfg.mode == "wbf":
        b, s, c = weighted_boxes_fusion(boxes_list, scores_list, labels_list, iou_thr=cfg.iou_thr, skip_box_thr=0.0)
    else:
        b, s, c = nms(boxes_list, scores_list, labels_list, iou_thr=cfg.iou_thr)
    return np.asarray(b, dtype=float).reshape(-1, 4) * extent, np.asarray(s, dtype=float), np.asarray(c, dtype=int)
