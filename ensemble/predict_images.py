"""``python -m ensemble.predict_images``: the tuned ensemble on a folder of new studies.

    python -m ensemble.predict_images --src SRC --run-dir runs/NAME --out OUT (--data DATA | --size N)
        [--meta META] [--folds FOLDS] [--threshold 0.3] [--batch 32] [--workers 4]

Every DICOM/PNG/JPEG under SRC is read with the ingestion of ``cxr prepare`` (cxr.images: VOI
LUT, MONOCHROME1, JPEG 2000), squashed ONCE to the size the models were trained on (DATA's PNG
size, or ``--size``) and given to every fold model of every model, exactly as ``make submission``
treats the test set (one code path):

    per model of weight > 0 in runs/NAME/ensemble/params.json (+ the classifier when the gate is on), per fold:
        the fold's config.yaml -> the adapter's load_infer -> models.common.predict_checkpoints (its TTA views and checkpoints)
    folds  -> one table per model, as ``python -m models MODEL merge`` (WBF; mean of p_abnormal)
    models -> ensemble.ensemble.apply(params, ...)   (the tuned WBF and gate)

OUT receives:

    predictions.csv          the prediction format, ORIGINAL pixels (cxr.predictions)
    submission.csv           Kaggle's format, one row per image
    findings.csv             image_id, p_abnormal, class_id, class_name, score, box, note: every finding
                             with score >= --threshold; an image without one has one row: No finding
                             (score = 1 - p_abnormal) when that reaches the threshold, else a row without
                             class that says so (never "No finding" at score 0); then run, models,
                             profile, trained_on: what made the predictions
    overlays/<image_id>.png  the findings drawn at 1024 px (class colour, name, score)
    thumbs/<image_id>.jpg    and index.html: offline thumbnail grid sorted by p_abnormal, under a table
                             naming the run, its models, weights, fusion and gate, profiles and
                             training data (a red warning when that is cxr synth's synthetic data)
    run.json                 the same as a record
    failed.csv               file, reason: images that could not be read (listed, skipped, not fatal)

Original sizes are each file's own, or ``--meta`` (Kaggle meta CSV: image_id, dim0, dim1) for an
already-squashed PNG set such as Kaggle's; images are then processed in the meta file's row order
(else by image_id). ``p_abnormal`` is 1 - the ensemble's No-finding score (with the gate on: the
classifier's fold-averaged probability). Work streams in batches of ``--batch`` images, decoded
ahead by ``--workers`` processes, so memory stays flat; finished batches are kept in OUT/.parts and
a re-run with the same run and settings redoes none of them.

CPU kernels round differently with the batch size, in the last float digits. With ``--batch`` a
multiple of every model's predict batch and the meta file in sample_submission order (as ``cxr
synth`` writes it), each model sees the very batches ``make submission`` gave it, and DATA/test
reproduces the submission digit for digit (tests/test_predict_images.py).

An empty SRC, a run without tuned parameters or a model missing a fold is one line and exit 2.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from cxr.args import Parser, int_at_least, non_negative_int, plain_name, positive_int, probability
from cxr.config import load
from cxr.data import DataFolder, read_folds
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.images import fit, read_image, scan_images, squash, writing
from cxr.images import load as load_image
from cxr.io import DataError, one_line_errors, read_table, sha256, write_json, write_table
from cxr.fusion import fuse_readers
from cxr.labels import read_labels, read_sizes
from cxr.predictions import write_predictions
from cxr.submission import write_submission
from cxr.wbf import FOLD_MERGE, WBF, fuse_group
from ensemble.ensemble import Params, apply, params_from_dict
from ensemble.overlays import display_size, draw, findings_text, side_by_side, thumbnail, write_image, write_index
from ensemble.provenance import ensemble_rows, load_params, profile_summary, training_data
import models as model_table
from models.__main__ import fold_fusion
from models.common import fold_infers, predict_checkpoints
from models.members import parse_member

INFO_COLUMNS = ["image_id", "file", "width", "height"]  # one row per predicted image in OUT/.parts
FINDINGS_COLUMNS = ["image_id", "p_abnormal", "class_id", "class_name", "score", *BOX_COLUMNS, "note"]
RUN_COLUMNS = ["run", "models", "profile", "trained_on"]  # findings.csv's last columns: what made the predictions


# ---------------------------------------------------------------------------- the trained ensemble


@dataclass
class Member:
    """One model of the ensemble: its trained folds as ``infer`` functions (see models/common.py)."""

    name: str
    folds: list[Callable]  # none for a detector of weight 0 in the tuned fusion (not loaded, not run)
    tta: bool | tuple[str | float, ...]
    batch: int  # the batch its own predict uses, so each model sees the batches make submission gave it
    fusion: WBF = FOLD_MERGE  # how merge fused its folds (RUN/MODEL/fold_fusion.yaml)
    views: dict = field(default_factory=dict)  # its predict's TTA settings: tta_fusion, imgsz, stride


@dataclass
class Ensemble:
    params: Params
    detectors: list[Member]
    classifier: Member | None  # None when the tuned gate is off (make submission then reads no classifier)


def load_ensemble(run: Path, classifier: str, fold_ids: Sequence[int] | None = None) -> Ensemble:
    """The tuned parameters and every fold model they need; a missing piece is a DataError naming it.

    ``fold_ids``: the folds every model must have (the fold file's); default: every fold any of
    the models has, so a model with fewer folds than the others is caught.
    """
    path = run / "ensemble" / "params.json"
    if not path.is_file():
        raise DataError(path, f"no tuned ensemble parameters: run make ensemble NAME={run.name} first")
    try:
        params = params_from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"not a tuned-parameter file ({type(e).__name__}: {e})") from None
    gate = params.gate.rule != "none"
    if gate and params.classifier and classifier != "none":
        classifier = params.classifier  # the member the gate was tuned with (a variant or borrowed one too)
    if gate and classifier == "none":
        raise DataError(path, f"the tuned gate {params.gate.rule!r} needs the classifier; --classifier none drops it")
    # a detector of weight 0 is left out of the fusion (ensemble.fuse): it is neither checked, loaded nor run
    unused = {m for m, w in zip(params.fusion.models, params.fusion.weights) if w == 0}
    kinds = {**{m: "detector" for m in params.fusion.models if m not in unused},
             **({classifier: "classifier"} if gate else {})}
    for m, kind in kinds.items():
        family = _family(m)
        if family not in model_table.MODELS or model_table.kind(family) != kind:
            raise DataError(path, f"{m!r} is not a {kind} of the model table {model_table.names(kind)}: a model trained "
                                  "elsewhere (--extra) has no folds to run on new images; tune without it")
    names = list(kinds)
    found = {m: _fold_ids(parse_member(m).folder(run)) for m in names}
    expected = sorted({int(k) for k in fold_ids}) if fold_ids is not None else sorted(set().union(*found.values()))
    if not expected:
        raise DataError(run, f"no trained folds for {names}: run make ensemble NAME={run.name} first")
    for m in names:
        missing = sorted(set(expected) - found[m])
        if missing:
            raise DataError(parse_member(m).folder(run), f"model {m!r} has no fold(s) {missing} of folds {expected}: "
                                                         f"run make oof MODEL={m}")
    detectors = [Member(m, [], False, 1) if m in unused else _load_member(run, m, "detector", expected)
                 for m in params.fusion.models]
    return Ensemble(params, detectors, _load_member(run, classifier, "classifier", expected) if gate else None)


def _family(name: str) -> str:
    """The model-table family of a member name (``yolo@s640`` -> yolo), or the name itself (an EXTRA folder)."""
    try:
        return parse_member(name).family
    except DataError:
        return name


def _fold_ids(model_dir: Path) -> set[int]:
    if not model_dir.is_dir():
        return set()
    return {int(d.name[4:]) for d in model_dir.glob("fold*") if d.is_dir() and d.name[4:].isdigit()}


def _load_member(run: Path, model: str, kind: str, fold_ids: list[int]) -> Member:
    """Load every fold of member ``model`` (a family of the model table, models/__init__.py, a variant
    ``yolo@s640`` or a borrowed ``demo:detectron``) from its ``fold<k>`` folders with the resolved config
    saved there at training time and the prediction settings its OOF tables were made with (predict.yaml)."""
    member = parse_member(model)
    adapter = model_table.adapter(member.family)
    folds, cfg = [], None
    for k in fold_ids:
        out = member.folder(run) / f"fold{k}"
        predicted = yaml.safe_load((out / "predict.yaml").read_text()) if (out / "predict.yaml").is_file() else None
        only = set(getattr(adapter, "PREDICT_ONLY", ()))
        # where the folds trained does not bind where they predict: a full profile's device: cuda becomes auto,
        # so new studies are read on a CPU-only workstation too (more slowly), not refused
        cfg = load(adapter.Config, out / "config.yaml",
                   overrides={**{key: v for key, v in (predicted or {}).items() if key in only}, "device": "auto"})
        try:
            # a detector fold: its checkpoints (with checkpoint_views, its snapshots too), as its predict used them
            folds.append(_classifier_infer(adapter, cfg, out) if kind == "classifier" else
                         fold_infers(adapter.load_infer, cfg, out))
        except FileNotFoundError as e:
            raise DataError(out, f"fold {k} of {model!r} is not trained ({e})") from None
    # the batch each adapter's predict passes on (yolo: predict_batch; the others: batch)
    views = {} if kind == "classifier" else {
        "tta_fusion": cfg.tta_fusion, "imgsz": cfg.imgsz,
        "stride": adapter.stride(cfg) if hasattr(adapter, "stride") else 32}  # the same views as its own predict
    return Member(model, folds, cfg.tta, int(getattr(cfg, "predict_batch", cfg.batch)),
                  fold_fusion(member.folder(run).parent, member.folder_name), views)


def _classifier_infer(adapter: ModuleType, cfg, out: Path) -> Callable[[list[Path]], np.ndarray]:
    """The classifier fold as ``paths -> p_abnormal``: its ``load_infer`` (the weights its ``checkpoint``
    names, flip TTA as configured) over the images read ``cfg.batch`` at a time."""
    infer = adapter.load_infer(cfg, out)

    def by_path(paths: list[Path]) -> np.ndarray:
        parts = [infer([read_image(p) for p in paths[i:i + cfg.batch]]) for i in range(0, len(paths), cfg.batch)]
        return np.concatenate(parts) if parts else np.zeros(0)

    return by_path


def predict_view(ens: Ensemble, view: DataFolder, ids: list[str]) -> pd.DataFrame:
    """The ensemble's predictions (original pixels) for ``ids`` of ``view``'s test split."""
    sizes = view.test_sizes
    tables = []
    for m in ens.detectors:
        if not m.folds:  # weight 0: fuse leaves its table out
            tables.append(pd.DataFrame(columns=PREDICTION_COLUMNS))
            continue
        per_fold = [predict_checkpoints(infers, view, "test", ids, m.batch, tta=m.tta, **m.views) for infers in m.folds]
        # the fold fusion of models/__main__.py merge, with the settings that merge saved
        tables.append(fuse_group(per_fold, sizes, m.fusion))
    p_abnormal = None
    if ens.classifier is not None:
        paths = [view.image("test", i) for i in ids]
        # mirrors models/classifier/report.py merge_probabilities: the folds' probabilities averaged
        p_abnormal = pd.concat([pd.Series(infer(paths), index=ids) for infer in ens.classifier.folds], axis=1).mean(axis=1)
    return apply(ens.params, tables, sizes, p_abnormal)


# ---------------------------------------------------------------------------- decoding, streamed


@dataclass
class Decoded:
    """One source file: the squashed model input, the display image, the original size, or the error."""

    image_id: str
    file: str
    width: int = 0
    height: int = 0
    image: np.ndarray | None = None  # size x size, what the models read
    view: np.ndarray | None = None  # original aspect ratio, overlay px on the long side
    error: str = ""


def decode(job: tuple[str, str, int, int, tuple[int, int] | None]) -> Decoded:
    """Read and squash one file (runs in a worker process); a failure is returned, not raised."""
    image_id, file, size, overlay_px, original = job
    try:
        # as prepare reads it; a JPEG 2000 DICOM may decode at a reduced resolution covering both outputs
        pixels = load_image(file, max(size, overlay_px))
        if pixels.image.ndim != 2:
            raise DataError(file, f"not a single 2-D image (shape {pixels.image.shape})")
        w, h = original or (pixels.width, pixels.height)
        view = fit(pixels, *display_size(w, h, overlay_px))
        return Decoded(image_id, file, int(w), int(h), squash(pixels, size), view)
    except DataError as e:
        message = str(e)
        return Decoded(image_id, file, error=message[len(e.path) + 2:] if message.startswith(f"{e.path}: ") else message)
    except Exception as e:  # a decoder's own error type: still one line for this file, the rest goes on
        return Decoded(image_id, file, error=f"{type(e).__name__}: {e}")


def _single_thread() -> None:
    cv2.setNumThreads(1)  # the workers are the parallelism


def stream(jobs: list, batch: int, pool: Executor | None) -> Iterator[list[Decoded]]:
    """Decoded batches in order; the next batch decodes in ``pool`` while the caller runs the models
    on this one, and no more than two batches are ever held."""
    chunks = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    if pool is None:
        yield from ([decode(j) for j in chunk] for chunk in chunks)
        return

    def submit(chunk: list) -> list[Future]:
        return [pool.submit(decode, j) for j in chunk]

    pending = submit(chunks[0]) if chunks else []
    for k in range(len(chunks)):
        current, pending = pending, (submit(chunks[k + 1]) if k + 1 < len(chunks) else [])
        yield [f.result() for f in current]


def write_view(root: Path, batch: list[Decoded]) -> DataFolder:
    """The batch as a data folder (test/<id>.png + test_meta.csv) that predict_split reads as it reads
    the test set: the squashed images round-trip losslessly through PNG.

    predict_split only reads images from a data folder, so each model fold re-reads these files;
    uncompressed they cost ~7 ms per read at 1024 px (~20 ms to write). A per-batch function over
    in-memory images in models/common.py would remove the round trip.
    """
    (root / "test").mkdir(parents=True, exist_ok=True)
    for d in batch:
        if not cv2.imwrite(str(root / "test" / f"{d.image_id}.png"), d.image, [cv2.IMWRITE_PNG_COMPRESSION, 0]):
            raise DataError(root / "test", f"cannot write the squashed image of {d.image_id}")
    meta = pd.DataFrame({"image_id": [d.image_id for d in batch], "dim0": [d.height for d in batch],
                         "dim1": [d.width for d in batch]})
    write_table(meta, root / "test_meta.csv")
    return DataFolder(root)


# ---------------------------------------------------------------------------- finished batches


class Parts:
    """Finished batches in ``OUT/.parts``: ``part-K.csv`` (predictions), then ``part-K.ids.csv``
    (image_id, file, width, height) which marks the batch done. Another ``key`` (run, weights,
    settings) discards them."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        key_file = folder / "key.json"
        if folder.exists() and (not key_file.exists() or json.loads(key_file.read_text()) != key):
            shutil.rmtree(folder)
        write_json(key, key_file)
        self.done = sorted(folder.glob("part-*.ids.csv"))
        numbers = [int(p.name.split(".")[0][5:]) for p in folder.glob("part-*.csv")]
        self.next = max(numbers, default=-1) + 1

    def info(self) -> pd.DataFrame:
        tables = [read_table(p, dtype={"image_id": str}) for p in self.done]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=INFO_COLUMNS)

    def predictions(self) -> pd.DataFrame:
        tables = [read_table(p.with_name(p.name.replace(".ids.csv", ".csv")), dtype={"image_id": str}) for p in self.done]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=PREDICTION_COLUMNS)

    def add(self, preds: pd.DataFrame, info: pd.DataFrame) -> None:
        name = f"part-{self.next:06d}"
        write_table(preds, self.folder / f"{name}.csv")
        self.done.append(write_table(info, self.folder / f"{name}.ids.csv"))
        self.next += 1


def _key(run: Path, size: int, meta: str | None, threshold: float, overlay_px: int, classifier: str) -> dict:
    """What finished batches depend on: the parameters (by content: submit rewrites the file), the
    fold models (by file stamp) and the settings."""
    files = [*sorted(run.glob("*/fold*/weights.*")), *sorted(run.glob("*/fold*/config.yaml"))]
    stamp = hashlib.sha1("".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    return {"run": str(run.resolve()), "params": json.loads((run / "ensemble" / "params.json").read_text()),
            "models": stamp, "size": size, "meta": str(Path(meta).resolve()) if meta else None,
            "threshold": threshold, "overlay_px": overlay_px, "classifier": classifier}


# ---------------------------------------------------------------------------- outputs


def p_abnormal(preds: pd.DataFrame, ids: Sequence[str]) -> pd.Series:
    """1 - each image's No-finding score (1 when it has no No-finding row)."""
    normal = preds[preds["class_id"] == NO_FINDING].groupby("image_id")["score"].max()
    return (1.0 - normal.reindex(list(ids)).fillna(0.0)).rename("p_abnormal")


def findings_table(preds: pd.DataFrame, ids: Sequence[str], threshold: float) -> pd.DataFrame:
    """Every finding with ``score >= threshold`` (highest first per image); an image with none gets one
    row, so every image is listed once at least: No finding (score ``1 - p_abnormal``, box 0 0 1 1) when
    that score reaches the threshold too, else a row without class or box whose note says what the
    image has (its P(abnormal) and best box), since "No finding" at a score below the threshold
    would contradict the image's own P(abnormal)."""
    p = p_abnormal(preds, ids)
    hits = preds[(preds["class_id"] != NO_FINDING) & (preds["score"] >= threshold)]
    hits = hits[hits["image_id"].isin(set(ids))][PREDICTION_COLUMNS].assign(note="")
    empty = sorted(set(ids) - set(hits["image_id"]))
    p_normal = 1.0 - p.loc[empty].to_numpy()
    normal = (p_normal >= threshold) & (p_normal > 0)
    rows = pd.DataFrame({"image_id": empty, "class_id": NO_FINDING, "score": p_normal})
    rows[BOX_COLUMNS] = NO_FINDING_BOX
    best = preds[preds["class_id"] != NO_FINDING].sort_values("score", ascending=False, kind="stable")
    best = best.drop_duplicates("image_id").set_index("image_id")
    notes = []
    for image_id, q, is_normal in zip(empty, p.loc[empty], normal):
        top = (f"best box {CLASS_NAMES[int(best.loc[image_id, 'class_id'])]} {best.loc[image_id, 'score']:.2f}"
               if image_id in best.index else "no box at all")
        notes.append(f"no finding box scored >= {threshold:g} ({top})" if is_normal else
                     f"P(abnormal) {q:.2f} but no finding box scored >= {threshold:g} ({top})")
    rows["note"] = notes
    rows = rows.astype({"class_id": "Int64", "score": float})
    rows.loc[~normal, ["class_id", "score", *BOX_COLUMNS]] = pd.NA
    table = pd.concat([hits.astype({"class_id": "Int64"}), rows], ignore_index=True)
    table.insert(1, "p_abnormal", table["image_id"].map(p))
    table.insert(3, "class_name", [CLASS_NAMES[int(c)] if not pd.isna(c) else "" for c in table["class_id"]])
    return table.sort_values(["image_id", "score"], ascending=[True, False], kind="stable",
                             na_position="last")[FINDINGS_COLUMNS].reset_index(drop=True)


def describe_run(run: Path, data: Path | None, classifier: str | None) -> tuple[list[tuple[str, str]], str, dict]:
    """(what-ran lines for the page, the red warning or '', findings.csv's run columns) of ``run``;
    never raises: what cannot be read is said to be unknown."""
    params = load_params(run)
    gated = params is not None and params.gate.rule != "none"
    trained = training_data(run, data)
    rows = ensemble_rows(params, run, classifier if gated else None, trained)
    models = [] if params is None else [*params.fusion.models, *([classifier] if gated and classifier else [])]
    if params is None:
        ensemble = "unknown (no readable RUN/ensemble/params.json)"
    else:
        f = params.fusion
        ensemble = (" + ".join(f"{m} x{w:g}" for m, w in zip(f.models, f.weights))
                    + f", WBF iou_thr {f.iou_thr:g} {f.conf_type}, gate {params.gate.rule}"
                    + (f" ({classifier})" if gated and classifier else ""))
    columns = {"run": str(run.resolve()), "models": ensemble, "profile": profile_summary(run, models) or "unknown",
               "trained_on": trained.describe()}
    return rows, trained.warning(), columns


def write_pictures(batch: list[Decoded], preds: pd.DataFrame, out: Path, threshold: float, mark: str = "",
                   truth: pd.DataFrame | None = None) -> None:
    """Overlay and thumbnail of each image; ``mark`` ends every banner (e.g. that the models are demo ones).
    An image that ``truth`` covers gets its ground truth drawn beside the predictions."""
    by_image = dict(tuple(preds.groupby("image_id")))
    empty = pd.DataFrame(columns=PREDICTION_COLUMNS)
    true_by_image = dict(tuple(truth.groupby("image_id"))) if truth is not None else {}
    p = p_abnormal(preds, [d.image_id for d in batch])
    for d in batch:
        title = f"{d.image_id}  P(abnormal) {p[d.image_id]:.2f}{mark}"
        overlay = draw(d.view, by_image.get(d.image_id, empty), (d.width, d.height), threshold, title)
        if d.image_id in true_by_image:
            rows = true_by_image[d.image_id]
            normal = (rows["class_id"] == NO_FINDING).all()
            overlay = side_by_side(overlay, draw(d.view, rows, (d.width, d.height), threshold,
                                                 f"ground truth{': No finding' if normal else ''}", scores=False))
        write_image(overlay, out / "overlays" / f"{d.image_id}.png")
        write_image(thumbnail(overlay), out / "thumbs" / f"{d.image_id}.jpg")


def data_image_size(data: Path) -> int:
    """The square size of a data folder's PNGs: what its models were trained on."""
    for split in ("test", "train"):
        for png in sorted((data / split).glob("*.png"))[:1]:
            image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            if image is None or image.shape[0] != image.shape[1]:
                shape = None if image is None else image.shape
                raise DataError(png, f"cannot take the model input size from it (shape {shape})")
            return int(image.shape[0])
    raise DataError(data, "no PNG in test/ or train/ to take the model input size from: give --size")


def predict_folder(
    src: Path,
    run: Path,
    out: Path,
    size: int,
    meta: str | None = None,
    folds: str | None = None,
    threshold: float = 0.3,
    batch: int = 32,
    workers: int = 0,
    overlay_px: int = 1024,
    classifier: str = "classifier",
    data: Path | None = None,
    labels: str | None = None,
) -> dict:
    """Run the tuned ensemble of ``run`` on every image under ``src``; write OUT (see module docstring).

    Returns a summary: images predicted, skipped as already done, failed, findings above threshold, the
    best finding score (what THRESHOLD would have to be for one finding to show), the training-data
    warning. ``labels`` (Kaggle train.csv or PhysioNet annotations): ground truth drawn beside the
    predictions of the images it covers (Kaggle's readers fused as for training, cxr.fusion.DEFAULT).
    Files that cannot be used (unreadable, dangling links, unsafe names) are listed in
    OUT/failed.csv and skipped. A second run on the same OUT while this one runs stops at once.
    ``data``: the folder the models were trained on, when known (the page names it, and warns when
    it is the synthetic benchmark).
    """
    if not src.is_dir():
        raise DataError(src, "not a folder")
    if out.resolve().is_relative_to(src.resolve()):
        raise DataError(out, f"must not lie inside SRC {src} (its overlays would be read as new images)")
    truth = ground_truth(labels) if labels else None  # a bad file stops here, before any work
    with writing(out):
        return _predict_folder(src, run, out, size, meta, folds, threshold, batch, workers, overlay_px, classifier, data,
                               truth, labels)


def ground_truth(labels: str) -> pd.DataFrame:
    """The boxes to draw as ground truth: PhysioNet's consensus as it is, Kaggle's readers fused."""
    table = read_labels(labels)
    return fuse_readers(table) if table["rad_id"].nunique() > 1 else table


def _predict_folder(src: Path, run: Path, out: Path, size: int, meta: str | None, folds: str | None, threshold: float,
                    batch: int, workers: int, overlay_px: int, classifier: str, data: Path | None = None,
                    truth: pd.DataFrame | None = None, labels: str | None = None) -> dict:
    files, unusable = scan_images(src)
    if not files and not unusable:
        raise DataError(src, "no DICOM/PNG/JPEG files found")
    failed = [{"file": f, "reason": reason} for f, reason in unusable]
    if not files:
        write_table(pd.DataFrame(failed, columns=["file", "reason"]), out / "failed.csv")
        raise DataError(out / "failed.csv", f"none of the {len(unusable)} image file(s) under {src} can be used")
    sizes = read_sizes(meta).set_index("image_id") if meta else None
    fold_ids = read_folds(folds)["fold"].unique().tolist() if folds else None
    ens = load_ensemble(run, classifier, fold_ids)  # before decoding anything: a bad run fails in seconds
    # the banner of every overlay says so too: an overlay is often looked at without the page
    mark = "  (DEMO MODELS: synthetic training data)" if training_data(run, data).synthetic else ""
    parts = Parts(out / ".parts", {**_key(run, size, meta, threshold, overlay_px, classifier), "mark": mark,
                                   "labels": sha256(labels) if labels else None})
    done = set(parts.info()["image_id"])
    order = list(files)
    if sizes is not None:  # the meta file's row order: a test set then batches exactly as in make submission
        rank = {image_id: k for k, image_id in enumerate(sizes.index)}
        order.sort(key=lambda image_id: rank.get(image_id, len(rank)))
    jobs = []
    for image_id in order:
        path = files[image_id]
        if image_id in done:
            continue
        if sizes is not None and image_id not in sizes.index:
            failed.append({"file": str(path), "reason": f"image_id {image_id!r} has no original size in {meta}"})
            continue
        original = tuple(sizes.loc[image_id, ["width", "height"]].astype(int)) if sizes is not None else None
        jobs.append((image_id, str(path), size, overlay_px, original))
    bar = tqdm(total=len(files), initial=len(files) - len(jobs), unit="img", desc="predict", dynamic_ncols=True)
    # spawn, not fork: a child forked from this process (whose OpenCV/torch thread pools have run)
    # can hang in its first OpenCV call
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_single_thread) if workers > 0 else None
    try:
        with tempfile.TemporaryDirectory(prefix="predict-images-") as tmp:
            for k, decoded in enumerate(stream(jobs, batch, pool)):
                good = [d for d in decoded if not d.error]
                for d in decoded:
                    if d.error:
                        failed.append({"file": d.file, "reason": d.error})
                        bar.write(f"skipped {d.file}: {d.error}", file=sys.stderr)
                if good:
                    view = write_view(Path(tmp) / f"batch{k}", good)
                    preds = predict_view(ens, view, [d.image_id for d in good])
                    write_pictures(good, preds, out, threshold, mark, truth)
                    info = pd.DataFrame([(d.image_id, d.file, d.width, d.height) for d in good], columns=INFO_COLUMNS)
                    parts.add(preds, info)
                    shutil.rmtree(view.root)
                bar.update(len(decoded))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return _write_outputs(parts, files, failed, out, run, threshold, len(done & set(files)), data, classifier, truth)


def _write_outputs(parts: Parts, files: dict[str, Path], failed: list[dict], out: Path, run: Path, threshold: float,
                   skipped: int, data: Path | None = None, classifier: str | None = "classifier",
                   truth: pd.DataFrame | None = None) -> dict:
    info = parts.info()
    info = info[info["image_id"].isin(set(files))].sort_values("image_id").reset_index(drop=True)
    ids = info["image_id"].tolist()
    preds = parts.predictions()
    preds = preds[preds["image_id"].isin(set(ids))]
    preds = preds.sort_values(["image_id", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)
    write_table(pd.DataFrame(failed, columns=["file", "reason"]), out / "failed.csv")
    if not ids:
        raise DataError(out / "failed.csv", f"none of the {len(files)} image(s) could be read")
    sizes = info[["image_id", "width", "height"]]
    write_predictions(preds, out / "predictions.csv", sizes)
    write_submission(preds, ids, out / "submission.csv", sizes=sizes)
    about, warning, run_columns = describe_run(run, data, classifier)
    findings = findings_table(preds, ids, threshold).assign(**run_columns)
    write_table(findings, out / "findings.csv")
    write_json({**run_columns, "warning": warning, "about": dict(about), "threshold": threshold}, out / "run.json")
    p = p_abnormal(preds, ids)
    by_image = dict(tuple(preds.groupby("image_id")))
    empty = pd.DataFrame(columns=PREDICTION_COLUMNS)
    cards = pd.DataFrame({
        "image_id": ids, "p_abnormal": p.loc[ids].to_numpy(),
        "findings": [findings_text(by_image.get(i, empty), threshold) for i in ids],
        "overlay": [f"overlays/{i}.png" for i in ids], "thumb": [f"thumbs/{i}.jpg" for i in ids],
    })
    n_found = int((findings["class_id"].notna() & (findings["class_id"] != NO_FINDING)).sum())
    best = best_finding(preds)
    nothing = "" if n_found else no_finding_note(best, threshold)
    covered = sorted(set(ids) & set(truth["image_id"])) if truth is not None else []
    write_index(cards, out / "index.html", f"{len(ids)} images: ensemble of run {run.name}",
                f"Findings with score >= {threshold:g}, sorted by P(abnormal); {len(failed)} file(s) failed "
                f"(failed.csv); click a picture for its overlay. findings.csv and run.json say the same."
                + (f" Ground truth (LABELS) drawn beside the predictions of {len(covered)} image(s)." if truth is not None
                   else "") + (f" {nothing}" if nothing else ""),
                about=about, warning=warning)
    return {"images": len(ids), "skipped_done": skipped, "failed": len(failed), "findings": n_found,
            "best_finding_score": None if best is None else round(best[0], 4), "ground_truth_images": len(covered),
            "no_findings": nothing, "warning": warning, "out": str(out)}


def best_finding(preds: pd.DataFrame) -> tuple[float, str, str] | None:
    """(score, class name, image id) of the most confident finding box, or None without one."""
    findings = preds[preds["class_id"] != NO_FINDING]
    if findings.empty:
        return None
    top = findings.loc[findings["score"].idxmax()]
    return float(top["score"]), CLASS_NAMES[int(top["class_id"])], str(top["image_id"])


def no_finding_note(best: tuple[float, str, str] | None, threshold: float) -> str:
    """Why every overlay is blank: no finding reaches THRESHOLD, and the best score (to lower it to)."""
    if best is None:
        return "No finding box at all was predicted on these images."
    score, name, image_id = best
    return (f"No finding reaches THRESHOLD={threshold:g}: the best is {name} {score:.3f} on {image_id} "
            f"(THRESHOLD={max(0.0, score - 0.0005):.3f} or lower would show it).")


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m ensemble.predict_images", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder of DICOM/PNG/JPEG images (searched recursively; id = file stem)")
    p.add_argument("--run-dir", required=True, help="the trained run: runs/NAME (with ensemble/params.json)")
    p.add_argument("--out", required=True, help="output folder (not inside SRC)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--data", help="the DATA folder the models were trained on: its PNG size is the input size")
    size.add_argument("--size", type=positive_int, help="the square PNG size the models were trained on (e.g. 1024)")
    p.add_argument("--meta", help="original sizes (Kaggle meta CSV) when SRC holds already-squashed PNGs")
    p.add_argument("--folds", help="fold file: every model must have these folds (default: the folds found)")
    classifiers = model_table.names("classifier")
    p.add_argument("--classifier", type=plain_name, default=classifiers[0] if classifiers else "none",
                   help="the gate's classifier (its run folder), as for python -m ensemble")
    p.add_argument("--threshold", type=probability, default=0.3, help="score from which a finding is listed and drawn")
    p.add_argument("--batch", type=positive_int, default=32, help="images per batch (a multiple of the models' predict batch)")
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="decoding processes (0: in process)")
    p.add_argument("--overlay-px", type=int_at_least(64), default=1024, help="long side of the overlay pictures")
    p.add_argument("--labels", help="ground truth to draw beside the predictions (Kaggle train.csv or PhysioNet "
                                    "annotations) for the images it covers")
    a = p.parse_args(argv)  # every value checked by its type: one line and exit 2 before anything is read
    with one_line_errors():
        size_px = a.size if a.size is not None else data_image_size(Path(a.data))
        summary = predict_folder(Path(a.src), Path(a.run_dir), Path(a.out), size_px, a.meta, a.folds, a.threshold,
                                 a.batch, a.workers, a.overlay_px, a.classifier, Path(a.data) if a.data else None,
                                 a.labels)
    if summary["failed"]:
        print(f"warning: {summary['failed']} file(s) could not be used: {Path(a.out) / 'failed.csv'}", file=sys.stderr)
    if summary["warning"]:  # the page and every overlay say so too, but the console is what is read first
        print(f"warning: {summary['warning']}", file=sys.stderr)
    if summary["no_findings"]:
        print(summary["no_findings"], file=sys.stderr)
    print(json.dumps(summary))
    print(f"open {Path(a.out) / 'index.html'}")


if __name__ == "__main__":
    main()
