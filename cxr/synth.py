"""Embedded synthetic benchmark: chest-radiograph-like images in Kaggle's 256-px PNG layout.

The real training images are not redistributable, so the demo and the tests run on this.
:func:`compute_stats` reduces the real ``train.csv`` to summary statistics (class
frequencies, box position/size quantiles, reader agreement and jitter, image sizes),
committed as ``cxr/vindr_stats.json``; :func:`generate` draws a data set from them:

* ~70% normal images (the real share), each abnormal image's classes drawn with the real
  per-class frequencies, boxes drawn from the real per-class quantiles;
* each class painted with its own shape, texture and intensity (learnable, but with
  anatomy, noise, blur and random amplitude on top, not trivial);
* every image read by 3 of 17 simulated readers, the set drawn as the real sets read normal and
  abnormal images (R8, R9 and R10 read 94% of the abnormal ones), who miss boxes (real per-class
  agreement times the reader's own), jitter them (real per-class jitter times the reader's own)
  and add stray boxes (as often as the reader strays relative to the others), so reader fusion and
  reader selection matter;
* written exactly as Kaggle's resized set: ``train/``, ``test/`` (PNG, squashed to
  ``size``), ``train.csv`` (original pixels), ``train_meta.csv``/``test_meta.csv``
  (``dim0`` = original height, ``dim1`` = width, non-square), ``sample_submission.csv``,
  plus ``test_labels.csv`` in the PhysioNet format for scoring.

Deterministic: image ``i`` of a split uses its own generator seeded by ``(seed, split, i)``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.boxes import iou_matrix, to_original
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.fusion import fuse_readers
from cxr.config import save
from cxr.io import DataError, atomic_path, write_table
from cxr.submission import EMPTY_PREDICTION

STATS_PATH = Path(__file__).with_name("vindr_stats.json")
QUANTILES = np.linspace(0, 1, 11)


@dataclass
class SynthConfig:
    out: str = "data/synth"
    n_train: int = 600
    n_test: int = 150
    size: int = 256
    seed: int = 0
    normal_share: float | None = None  # None: the real share from the stats (~0.70)
    stray_boxes: float = 0.15  # mean stray boxes per reader per abnormal image (each reader's real factor on top)
    noise: float = 7.0  # pixel noise sigma (0..255 scale)
    # every class equally frequent (1-3 per abnormal image) with boxes at least this share of the
    # image side: the "all classes" variant, where a class-id mix-up in an adapter shows up as a
    # class with AP 0. 0 = the real VinDr frequencies and box sizes (the demo).
    balanced_min_box: float = 0.0
    stats: str = str(STATS_PATH)


# ---------------------------------------------------------------------------- statistics


def compute_stats(labels: pd.DataFrame, sizes: pd.DataFrame) -> dict:
    """Summary statistics of the real train labels (no image ids, no boxes: safe to commit)."""
    known = sizes.set_index("image_id")
    fused = fuse_readers(labels)
    finding = labels[labels["class_id"] != NO_FINDING]
    images = labels["image_id"].unique()
    abnormal = finding["image_id"].unique()
    wh = known.loc[fused["image_id"], ["width", "height"]].to_numpy(dtype=float)
    b = fused[BOX_COLUMNS].to_numpy(dtype=float) / np.column_stack([wh, wh])
    geometry = pd.DataFrame(
        {"class_id": fused["class_id"], "cx": (b[:, 0] + b[:, 2]) / 2, "cy": (b[:, 1] + b[:, 3]) / 2,
         "w": b[:, 2] - b[:, 0], "h": b[:, 3] - b[:, 1]}
    )
    classes = {}
    for c in FINDING_CLASSES:
        mine = finding[finding["class_id"] == c]
        readers_per_image = mine.groupby("image_id")["rad_id"].nunique()
        g = geometry[geometry["class_id"] == c]
        classes[str(c)] = {
            "name": CLASS_NAMES[c],
            "image_share": round(len(readers_per_image) / len(abnormal), 5),
            "boxes_per_image": round(float((fused["class_id"] == c).sum() / max(len(readers_per_image), 1)), 4),
            "reader_agreement": round(float(readers_per_image.mean() / 3), 4),
            "jitter": round(_jitter(mine, fused[fused["class_id"] == c]), 4),
            "quantiles": {k: [round(float(v), 4) for v in g[k].quantile(QUANTILES)] for k in ("cx", "cy", "w", "h")},
        }
    reader_share = labels.drop_duplicates(["image_id", "rad_id"])["rad_id"].value_counts(normalize=True)
    figures, triples = reader_stats(labels, fused)
    return {
        "source": "VinBigData train.csv (67,914 rows, 15,000 images), fused with cxr.fusion.DEFAULT",
        "n_images": int(len(images)),
        "normal_share": round(1 - len(abnormal) / len(images), 5),
        "readers": {k: round(float(v), 5) for k, v in reader_share.sort_index().items()},
        "sizes": {k: [int(v) for v in known.loc[images, k].quantile(QUANTILES)] for k in ("width", "height")},
        "classes": classes,
        "reader_figures": figures,
        "reader_triples": triples,
    }


def _jitter(readers: pd.DataFrame, fused: pd.DataFrame) -> float:
    """Robust spread of reader box edges around the fused box they belong to, relative to its size.

    Only fused boxes drawn by at least two readers count: a box one reader drew alone is
    its own fused box and would report zero jitter.
    """
    return _spread(_edge_errors(readers, fused))


def _spread(e: np.ndarray) -> float:
    e = e[np.isfinite(e)]
    return float(np.median(np.abs(e - np.median(e))) * 1.4826) if len(e) else 0.0


def _by_image(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """image id -> its rows' boxes, on numpy slices (a pandas groupby per call cost minutes at real scale)."""
    frame = frame.sort_values("image_id", kind="stable")
    ids, boxes = frame["image_id"].to_numpy(), frame[BOX_COLUMNS].to_numpy(dtype=float)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=int)
    return {ids[a]: boxes[a:b] for a, b in zip(starts, [*starts[1:], len(ids)])}


def _edge_errors(readers: pd.DataFrame, fused: pd.DataFrame) -> np.ndarray:
    """Each reader box's edge offsets (rows of ``readers``, one class) from the fused box it belongs to, over
    that box's size: shape (len(readers), 4), NaN for a box that belongs to no fused box of 2+ readers."""
    fused_by_image = _by_image(fused[fused["score"] > 0.34])
    ids, boxes = readers["image_id"].to_numpy(), readers[BOX_COLUMNS].to_numpy(dtype=float)
    errors = np.full((len(readers), 4), np.nan)
    for image_id in pd.unique(ids):
        f = fused_by_image.get(image_id)
        if f is None:
            continue
        rows = np.flatnonzero(ids == image_id)
        iou = iou_matrix(boxes[rows], f)
        member = iou.max(axis=1) > 0.4
        best = f[iou.argmax(axis=1)][member]
        size = np.column_stack([best[:, 2] - best[:, 0], best[:, 3] - best[:, 1]] * 2)
        errors[rows[member]] = (boxes[rows][member] - best) / size
    return errors


def reader_stats(labels: pd.DataFrame, fused: pd.DataFrame) -> tuple[dict, dict]:
    """Each reader as the labels show them, and who reads which images.

    Returns ``(figures, triples)``. ``figures[R]``: ``images`` read, ``normal_share`` of them (every
    reader of an image agrees on normal vs abnormal in VinDr), ``boxes_per_image`` on abnormal ones,
    ``agreement`` per class as ``[marked, chances]`` (a chance: a co-reader of the same image marked the
    class; marked: this reader did too), ``jitter`` (box-edge spread around the fused boxes, as the
    class ``jitter``) and ``stray`` (boxes per abnormal image no co-reader's box of that class overlaps at
    IoU > 0.4). ``triples``: the share of each set of readers among normal and among abnormal images.
    """
    finding = labels[labels["class_id"] != NO_FINDING]
    abnormal = set(finding["image_id"])
    reads = labels.drop_duplicates(["image_id", "rad_id"])
    who = reads.groupby("image_id")["rad_id"].agg(lambda r: ",".join(sorted(r)))
    is_abnormal = who.index.isin(list(abnormal))
    triples = {kind: {k: round(float(v), 6) for k, v in who[mask].value_counts(normalize=True).sort_index().items()}
               for kind, mask in (("normal", ~is_abnormal), ("abnormal", is_abnormal))}
    marked = finding.groupby(["image_id", "class_id"])["rad_id"].agg(set)
    readers_of = reads.groupby("image_id")["rad_id"].agg(list)
    chances: dict[tuple[str, int], list[int]] = {}
    for (image_id, c), drew in marked.items():
        for r in readers_of[image_id]:
            if drew - {r}:
                tally = chances.setdefault((r, int(c)), [0, 0])
                tally[0] += r in drew
                tally[1] += 1
    stray: dict[str, int] = {}
    for _, g in finding.groupby("image_id"):
        b, cls, rad = g[BOX_COLUMNS].to_numpy(dtype=float), g["class_id"].to_numpy(), g["rad_id"].to_numpy()
        iou = iou_matrix(b, b)
        for k in range(len(g)):
            alone = not (iou[k][(rad != rad[k]) & (cls == cls[k])] > 0.4).any()
            stray[rad[k]] = stray.get(rad[k], 0) + int(alone)
    errors = np.full((len(finding), 4), np.nan)
    classes = finding["class_id"].to_numpy()
    for c in FINDING_CLASSES:
        errors[classes == c] = _edge_errors(finding[classes == c], fused[fused["class_id"] == c])
    figures = {}
    for r, mine in reads.groupby("rad_id"):
        ab_images = int(mine["image_id"].isin(list(abnormal)).sum())
        boxes = (finding["rad_id"] == r).to_numpy()
        figures[r] = {
            "images": int(len(mine)),
            "normal_share": round(1 - ab_images / len(mine), 5),
            "boxes_per_image": round(int(boxes.sum()) / ab_images, 4) if ab_images else 0.0,
            "agreement": {str(c): chances[(r, c)] for c in FINDING_CLASSES if (r, c) in chances},
            "jitter": round(_spread(errors[boxes].ravel()), 4),
            "stray": round(stray.get(r, 0) / ab_images, 4) if ab_images else 0.0,
        }
    return dict(sorted(figures.items(), key=lambda kv: int(kv[0].lstrip("R")) if kv[0][1:].isdigit() else 0)), triples


def agreement_totals(figures: dict) -> tuple[int, int]:
    """A reader's (marked, chances) over every class of its ``agreement``."""
    return (sum(v[0] for v in figures["agreement"].values()), sum(v[1] for v in figures["agreement"].values()))


def reader_table(stats: dict) -> str:
    """The per-reader figures of ``stats`` as a Markdown table (the README's)."""
    figures = stats["reader_figures"]
    abnormal = stats["reader_triples"]["abnormal"]
    lines = ["| reader | images read | called normal | abnormal images read | boxes per abnormal image | "
             "agreement with co-readers (chances) | box jitter | stray boxes per abnormal image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r, f in figures.items():
        hits, chances = agreement_totals(f)
        ab = round(f["images"] * (1 - f["normal_share"]))
        agree = f"{hits / chances:.2f} ({chances})" if chances else "-"
        lines.append(f"| {r} | {f['images']} | {f['normal_share']:.2%} | {ab} | {f['boxes_per_image'] or '-'} | "
                     f"{agree} | {f['jitter'] or '-'} | {f['stray'] or '-'} |")
    top = max(abnormal, key=abnormal.get)
    lines.append(f"\nAbnormal images read by {top.replace(',', ', ')} together: {abnormal[top]:.1%}; the sets of "
                 f"readers: {len(abnormal)} for abnormal images, {len(stats['reader_triples']['normal'])} for normal ones.")
    return "\n".join(lines)


def load_stats(path: str | os.PathLike = STATS_PATH) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- drawing


def _from_quantiles(rng: np.random.Generator, q: list[float]) -> float:
    """Draw from the distribution given by its deciles (inverse CDF, linear in between)."""
    return float(np.interp(rng.uniform(), QUANTILES, q))


def _draw_box(rng: np.random.Generator, cls_stats: dict, min_side: float = 0.02) -> np.ndarray:
    q = cls_stats["quantiles"]
    cx, cy, w, h = (_from_quantiles(rng, q[k]) for k in ("cx", "cy", "w", "h"))
    w, h = max(w, min_side), max(h, min_side)
    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]).clip(0, 1)
    return box


def _anatomy(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s] / s
    dx, dy = rng.normal(0, 0.015, 2)
    sx = rng.uniform(0.93, 1.07)
    img = np.full((s, s), rng.uniform(15, 35), dtype=np.float32)
    body = ((x - 0.5 - dx) / (0.47 * sx)) ** 2 + ((y - 0.58 - dy) / 0.55) ** 2 < 1
    img += 85 * body
    for side in (-1, 1):
        lung = ((x - 0.5 - dx - side * 0.19 * sx) / (0.15 * sx)) ** 2 + ((y - 0.45 - dy) / 0.29) ** 2 < 1
        ribs = np.sin(2 * np.pi * (y * 11 + 2.5 * (x - 0.5) ** 2) + rng.uniform(0, 6.3)) > 0.75
        img += lung * (-55 + 18 * ribs)
    mediastinum = (np.abs(x - 0.5 - dx) < 0.06) & (y > 0.1) & (y < 0.75)
    heart = ((x - 0.54 - dx) / 0.13) ** 2 + ((y - 0.64 - dy) / 0.11) ** 2 < 1
    img += 30 * mediastinum + 25 * heart
    img = cv2.GaussianBlur(img, (0, 0), s / 90)
    return img * rng.uniform(0.85, 1.15) + rng.uniform(-10, 10)


def _paint(img: np.ndarray, rng: np.random.Generator, c: int, box: np.ndarray) -> None:
    """Add class ``c``'s pattern inside ``box`` (normalized) of the square image, in place."""
    s = img.shape[0]
    x0, y0, x1, y1 = (box * s).round().astype(int)
    x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)
    h, w = img[y0:y1, x0:x1].shape
    if h < 2 or w < 2:
        return
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (u + 0.5) / w, (v + 0.5) / h
    r = np.sqrt(((u - 0.5) / 0.5) ** 2 + ((v - 0.5) / 0.5) ** 2)
    ellipse = np.clip((1.0 - r) * 6, 0, 1)
    blob = cv2.GaussianBlur(rng.uniform(0, 1, (h, w)).astype(np.float32), (0, 0), max(min(h, w) / 6, 1))
    blob = (blob - blob.min()) / (np.ptp(blob) + 1e-6)
    amp = rng.uniform(0.75, 1.25)
    patterns = {
        0: lambda: 55 * ellipse,  # aortic enlargement: bright knob
        1: lambda: 50 * ellipse * (np.sin(2 * np.pi * 5 * v) > 0.2),  # atelectasis: horizontal streaks
        2: lambda: 0 * u,  # calcification: dots, below
        3: lambda: 35 * ellipse,  # cardiomegaly: large soft bright ellipse
        4: lambda: 75 * ellipse * (blob > 0.35),  # consolidation: dense irregular patch
        5: lambda: 45 * ellipse * ((np.sin(2 * np.pi * 7 * u) * np.sin(2 * np.pi * 7 * v)) > 0.25),  # ILD: reticular
        6: lambda: 55 * ellipse * blob,  # infiltration: fluffy
        7: lambda: 45 * np.exp(-(r**2) / 0.35),  # lung opacity: haze
        8: lambda: 85.0 * (r < 0.85),  # nodule/mass: hard-edged disk
        9: lambda: 70.0 * ((r > 0.55) & (r < 0.95)),  # other lesion: ring
        10: lambda: 85 * v**1.5,  # pleural effusion: bright towards the bottom
        11: lambda: 65.0 * ((u < 0.22) | (u > 0.78)) * ellipse.clip(0.5, 1),  # pleural thickening: edges
        12: lambda: -55 * ellipse,  # pneumothorax: dark pocket
        13: lambda: 55 * ellipse * (np.sin(2 * np.pi * 4 * (u + v)) > 0.3),  # pulmonary fibrosis: diagonal bands
    }
    patch = patterns[c]().astype(np.float32)
    if c == 2:
        for _ in range(rng.integers(2, 6)):
            cu, cv = rng.uniform(0.2, 0.8, 2)
            patch += 120 * (np.sqrt((u - cu) ** 2 + (v - cv) ** 2) < 0.12)
    img[y0:y1, x0:x1] += amp * patch


# ---------------------------------------------------------------------------- readers


SHRINK = 50  # a reader's agreement leans on the pooled one as if it had had this many more chances


def reader_models(stats: dict) -> dict[str, dict[str, float]]:
    """Each reader's ``recall``, ``jitter`` and ``stray`` factors (1 = the pooled reader), from
    ``reader_figures``: agreement with the co-readers (shrunk towards the pool: R2 had one chance), box jitter
    and stray boxes relative to the pool weighted by abnormal images read. Empty for stats without them."""
    figures = stats.get("reader_figures", {})
    totals = {r: agreement_totals(f) for r, f in figures.items()}
    hits, chances = {r: t[0] for r, t in totals.items()}, {r: t[1] for r, t in totals.items()}
    pooled = sum(hits.values()) / max(sum(chances.values()), 1)
    weight = {r: f["images"] * (1 - f["normal_share"]) for r, f in figures.items()}
    total = max(sum(weight.values()), 1e-9)
    mean = {k: sum(weight[r] * f[k] for r, f in figures.items()) / total for k in ("jitter", "stray")}
    models = {}
    for r, f in figures.items():
        agreement = (hits[r] + SHRINK * pooled) / (chances[r] + SHRINK)
        seen = weight[r] > 0.5  # a reader who never marked a finding has no figures of their own
        models[r] = {"recall": agreement / pooled if pooled else 1.0,
                     "jitter": f["jitter"] / mean["jitter"] if seen and mean["jitter"] else 1.0,
                     "stray": f["stray"] / mean["stray"] if seen and mean["stray"] else 1.0}
    return models


def _readers(rng: np.random.Generator, stats: dict, abnormal: bool) -> list[str]:
    """The 3 readers of an image: a set of readers drawn with its real share among normal or abnormal images
    (VinDr's abnormal images are nearly all read by R8, R9 and R10 together), else 3 by share of reads."""
    triples = stats.get("reader_triples", {}).get("abnormal" if abnormal else "normal")
    if triples:
        share = np.array(list(triples.values()))
        return list(triples)[int(rng.choice(len(triples), p=share / share.sum()))].split(",")
    share = np.array(list(stats["readers"].values()))
    return list(rng.choice(list(stats["readers"]), size=3, replace=False, p=share / share.sum()))


def _read(rng: np.random.Generator, true: list[tuple[int, np.ndarray]], stats: dict, stray: float,
          models: dict[str, dict[str, float]]) -> list[list]:
    """Boxes each of an abnormal image's 3 simulated readers draws: misses (the class's agreement times the
    reader's), jitter (the class's times the reader's) and stray boxes (``stray`` times the reader's factor)."""
    classes = stats["classes"]
    image_share = np.array([classes[str(c)]["image_share"] for c in FINDING_CLASSES])
    rows = []
    for rad in _readers(rng, stats, abnormal=True):
        me = models.get(rad, {"recall": 1.0, "jitter": 1.0, "stray": 1.0})
        mine = []
        for c, box in true:
            if rng.uniform() < np.clip(classes[str(c)]["reader_agreement"] * me["recall"], 0.35, 0.97):
                size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
                mine.append((c, box + rng.normal(0, classes[str(c)]["jitter"] * me["jitter"], 4) * size))
        for _ in range(rng.poisson(stray * me["stray"])):
            c = int(rng.choice(FINDING_CLASSES, p=image_share / image_share.sum()))
            mine.append((c, _draw_box(rng, classes[str(c)])))
        if not mine:  # VinDr readers agree on normal vs abnormal: an abnormal image gets a box from everyone
            c, box = true[int(rng.integers(len(true)))]
            mine.append((c, box))
        rows += [[rad, c, b] for c, b in mine]
    return rows


def _sorted_box(box: np.ndarray) -> np.ndarray:
    box = np.clip(box, 0, 1)
    x0, x1 = sorted((box[0], box[2]))
    y0, y1 = sorted((box[1], box[3]))
    return np.array([x0, y0, max(x1, x0 + 0.01), max(y1, y0 + 0.01)]).clip(0, 1)


# ---------------------------------------------------------------------------- data set


def _image(cfg: SynthConfig, stats: dict, split: str, index: int,
           models: dict[str, dict[str, float]]) -> tuple[dict, np.ndarray, list, list]:
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
    image_id = rng.bytes(16).hex()
    width = int(_from_quantiles(rng, stats["sizes"]["width"]))
    height = int(_from_quantiles(rng, stats["sizes"]["height"]) * rng.uniform(0.97, 1.12))
    img = _anatomy(rng, cfg.size)
    normal_share = stats["normal_share"] if cfg.normal_share is None else cfg.normal_share
    true: list[tuple[int, np.ndarray]] = []
    if rng.uniform() >= normal_share:
        classes = stats["classes"]
        share = np.array([classes[str(c)]["image_share"] for c in FINDING_CLASSES])
        if cfg.balanced_min_box:
            present = sorted(rng.choice(FINDING_CLASSES, size=int(rng.integers(1, 4)), replace=False).tolist())
        else:
            present = [c for c in FINDING_CLASSES if rng.uniform() < share[c]]
            present = present or [int(rng.choice(FINDING_CLASSES, p=share / share.sum()))]
        min_side = max(cfg.balanced_min_box, 0.02)
        for c in present:
            n = 1 + min(rng.poisson(max(classes[str(c)]["boxes_per_image"] - 1, 0)), 2)
            true += [(c, _draw_box(rng, classes[str(c)], min_side)) for _ in range(n)]
        for c, box in true:
            _paint(img, rng, c, box)
    img = cv2.GaussianBlur(img, (0, 0), 0.8) + rng.normal(0, cfg.noise, img.shape)
    png = np.clip(img, 0, 255).astype(np.uint8)
    meta = {"image_id": image_id, "dim0": height, "dim1": width}
    square, orig = (1.0, 1.0), (width, height)
    reads = _read(rng, true, stats, cfg.stray_boxes, models) if true else []
    reader_rows = [
        [image_id, CLASS_NAMES[c], c, rad, *to_original(_sorted_box(b), square, orig)[0]] for rad, c, b in reads
    ]
    if not true:
        rads = _readers(rng, stats, abnormal=False)
        reader_rows = [[image_id, CLASS_NAMES[NO_FINDING], NO_FINDING, rad, *[np.nan] * 4] for rad in rads]
    truth = [[image_id, CLASS_NAMES[c], *to_original(b, square, orig)[0]] for c, b in true]
    truth = truth or [[image_id, CLASS_NAMES[NO_FINDING], *[np.nan] * 4]]
    return meta, png, reader_rows, truth


MIN_SIZE = 16  # pixels: below this the anatomy's blur and the smallest boxes have nothing to draw on


def check(cfg: SynthConfig, where: str = "SynthConfig") -> None:
    """Raise :class:`DataError` (naming ``where``: the YAML file or the command) at the first bad field."""
    problems = [
        (cfg.size >= MIN_SIZE, f"size must be at least {MIN_SIZE} pixels, got {cfg.size}"),
        (cfg.n_train >= 1, f"n_train must be at least 1, got {cfg.n_train}"),
        (cfg.n_test >= 1, f"n_test must be at least 1, got {cfg.n_test}"),
        (cfg.normal_share is None or 0 <= cfg.normal_share <= 1, f"normal_share must be in [0, 1], got {cfg.normal_share}"),
        (cfg.stray_boxes >= 0, f"stray_boxes must be >= 0, got {cfg.stray_boxes}"),
        (cfg.noise >= 0, f"noise must be >= 0, got {cfg.noise}"),
        (0 <= cfg.balanced_min_box < 1, f"balanced_min_box must be in [0, 1), got {cfg.balanced_min_box}"),
    ]
    for ok, message in problems:
        if not ok:
            raise DataError(where, message)


def generate(cfg: SynthConfig, where: str = "SynthConfig") -> Path:
    """Write the synthetic benchmark to ``cfg.out``; returns the folder. A bad field is a
    :class:`DataError` naming ``where`` (see :func:`check`) before anything is written."""
    check(cfg, where)
    stats = load_stats(cfg.stats)
    models = reader_models(stats)
    out = Path(cfg.out)
    train_cols = ["image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS]
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        metas, rows = [], []
        for i in tqdm(range(n), desc=f"synth {split}", leave=False):
            meta, png, reader_rows, truth = _image(cfg, stats, split, i, models)
            with atomic_path(out / split / f"{meta['image_id']}.png") as tmp:
                ok, buf = cv2.imencode(".png", png)
                tmp.write_bytes(buf.tobytes())
            metas.append(meta)
            rows += reader_rows if split == "train" else truth
        write_table(pd.DataFrame(metas), out / f"{split}_meta.csv")
        if split == "train":
            write_table(pd.DataFrame(rows, columns=train_cols).round(1), out / "train.csv")
        else:
            write_table(pd.DataFrame(rows, columns=["image_id", "class_name", *BOX_COLUMNS]).round(1), out / "test_labels.csv")
            sample = pd.DataFrame({"image_id": [m["image_id"] for m in metas], "PredictionString": EMPTY_PREDICTION})
            write_table(sample, out / "sample_submission.csv")
    save(cfg, out / "synth.yaml")  # how this data set was made
    return out
