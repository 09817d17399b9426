"""The run report of one model set: ``index.html`` (opens offline) + ``index.md``, figures and tables.

What it shows, all on the out-of-fold (OOF) predictions of the training images and the
competition metric (mAP@0.4, :mod:`ensemble.scoring` = :mod:`cxr.metric`):

* the chosen ensemble: models, weights (0: left out by the tuner), fusion and gate parameters, each
  model's profile and folds, the training data (a red banner when it is the synthetic benchmark),
  the tuner's warnings about weak members (``params.warnings``), the best candidates;
* mAP@0.4 per model (and ensemble, prior-box floor, and with the gate on the ensemble with the gate
  beside it without), three ways, explained in the page: pooled (every fold's predictions ranked
  together), fold mean (each fold scored alone, then averaged) and the honest fold mean (nested for
  the tuned ensembles); per fold; per-class AP pooled and per fold. With the gate off there is no
  gated row, curve or title anywhere: the submitted predictions are the ensemble's;
* the test mAP@0.4 of the submission (and of the ensemble without the gate, when on), where the
  data folder has ``test_labels.csv``: scored as ``cxr evaluate`` does, labelled as test, never tuned on;
* the classifier's OOF ROC AUC (P(abnormal) against "the image has a finding"), pooled and per fold;
* precision-recall curves with their AP, a confusion matrix at IoU 0.4 (class vs class, plus
  missed ground truth and spurious predictions) at a stated score threshold;
* OOF images with the ground truth beside the submitted ensemble's boxes, test images with the
  submission's boxes (one colour per class, :mod:`ensemble.overlays`, shared with predict-images);
* each model's training curves per fold, read from the framework's own log in every fold folder.

Files: ``index.html``, ``index.md``, ``summary.json`` (name -> pooled OOF mAP), ``nested.json``,
``scores.csv``, ``per_class_ap.csv``, ``confusion.csv``, ``classifier_auc.csv`` (with a classifier),
``search.csv`` and the PNGs.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import cv2
import matplotlib
from sklearn.metrics import roc_auc_score

matplotlib.use("Agg")  # files only; no display, no font downloads
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr.boxes import iou_matrix  # noqa: E402
from cxr.data import DataFolder  # noqa: E402
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, IOU_THRESHOLD, NO_FINDING, NUM_CLASSES  # noqa: E402
from cxr.images import read_image  # noqa: E402
from cxr.io import DataError, atomic_path, read_table, write_json, write_table  # noqa: E402
from cxr.labels import read_labels  # noqa: E402
from cxr.metric import ground_truth, mean_average_precision  # noqa: E402
from cxr.submission import read_submission  # noqa: E402
from ensemble.ensemble import Params  # noqa: E402
from ensemble.overlays import about_table, display_size, draw, legend, page, side_by_side, write_image  # noqa: E402
from ensemble.provenance import TrainingData, ensemble_rows  # noqa: E402
from ensemble.runs import ablation_html, read_ablation  # noqa: E402
from ensemble.scoring import Scored, Truth, score_rows  # noqa: E402

ENSEMBLES = ("ensemble", "ensemble_gated")  # the rows whose parameters were tuned on these OOF predictions
TEST_COLUMN = "test mAP@0.4 (test labels, never tuned on)"
MODEL_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
CURVE_FILES = ("metrics.csv", "train/results.csv", "train/metrics.json", "results.csv", "metrics.json")
METRIC_NAMES = {"val_map": "mAP@0.4 (val_map)", "metrics/mAP50(B)": "mAP@0.5, ultralytics' (metrics/mAP50(B))",
                "val_auc": "ROC AUC (val_auc)"}


@dataclass
class RunInfo:
    """Where the predictions come from; everything optional (a bare call still writes a report)."""

    name: str = ""  # the report's NAME
    set_name: str = ""  # the model set (RUN/ensemble/<set>/)
    run: Path | None = None  # runs/NAME: fold folders (profiles, curves)
    models: list[str] = field(default_factory=list)  # the fused detectors, in params order
    classifier: str | None = None  # the gate's classifier (None: no gate)
    data: TrainingData | None = None
    submission: str = ""  # the submission file this report goes with
    folds: pd.DataFrame | None = None  # image_id, fold


def write_report(
    out: Path,
    results: dict[str, pd.DataFrame],
    gt: pd.DataFrame,
    image_ids: list[str],
    data: DataFolder,
    test_preds: pd.DataFrame,
    search: pd.DataFrame,
    params: Params | None = None,
    n_images: int = 4,
    info: RunInfo | None = None,
    latest: Path | None = None,
    n_oof: int = 6,
    p_abnormal: pd.Series | None = None,
    test_map: dict[str, float] | None = None,
) -> dict:
    """Write the report of ``results`` (name -> OOF predictions: models, ``ensemble``,
    ``ensemble_gated`` when the gate is on, ``prior_boxes``) into ``out``; returns ``summary.json``
    (name -> pooled OOF mAP).

    ``params``: the tuned ensemble (nested figures, parameters, warnings shown); when its gate is off
    an ``ensemble_gated`` entry is dropped (it would be the ensemble under another name).
    ``p_abnormal``: the classifier's OOF P(abnormal) by image_id (its ROC AUC table).
    ``test_map``: test mAP@0.4 by result name (:func:`submission_test_map`), shown as test figures.
    ``latest``: also write ``latest/index.html`` and ``latest/index.md`` (the same page, its
    pictures read from ``out``) and copies of the JSON/CSV files there: the report of the set last submitted.
    """
    info = info or RunInfo()
    test_map = dict(test_map or {})
    if params is not None and params.gate.rule == "none":
        results = {k: v for k, v in results.items() if k != "ensemble_gated"}
        test_map.pop("ensemble_gated", None)
    out.mkdir(parents=True, exist_ok=True)
    truth = Truth(gt, image_ids)  # the competition metric, fast (ensemble/scoring.py equals cxr.metric)
    scored = {name: score_rows(truth, preds) for name, preds in results.items()}
    fold_ids = _fold_ids(info.folds, image_ids)
    masks = {k: truth.mask(ids) for k, ids in fold_ids.items()}
    scores = _scores(scored, masks, params, test_map)
    summary = {name: s.map() for name, s in scored.items()}
    write_json(summary, out / "summary.json")
    if params is not None and params.nested_map:
        shown = [k for k in params.nested_map if k in results or k not in ENSEMBLES]  # gate off: no gated figure
        write_json({"nested_map": {k: params.nested_map[k] for k in shown},
                    "nested_folds": {k: v for k, v in params.nested_folds.items() if k in shown}}, out / "nested.json")
    write_table(scores, out / "scores.csv")
    auc = classifier_auc(p_abnormal, gt, image_ids, fold_ids) if p_abnormal is not None else None
    if auc is not None:
        write_table(auc, out / "classifier_auc.csv")
    else:
        (out / "classifier_auc.csv").unlink(missing_ok=True)
    ap = _per_class(scored, masks, truth)
    write_table(ap.reset_index(), out / "per_class_ap.csv")
    search.to_csv(out / "search.csv", index=False)

    main = next((n for n in ("ensemble_gated", "ensemble") if n in scored), next(iter(scored)))  # what was submitted
    threshold = best_f1_threshold(scored[main])
    matrix = confusion(gt[gt["image_id"].isin(set(image_ids))], results[main], threshold)
    write_table(matrix.rename_axis("ground truth").reset_index(), out / "confusion.csv")
    # the ungated ensemble's curves sit under the gated ones where both are there: only the submitted one drawn
    curves_of = [n for n in scored if not (n == "ensemble" and main == "ensemble_gated")]
    figures = {
        "pr": _plot_pr(scored, truth, curves_of, out / "pr_curves.png", main),
        "confusion": _plot_confusion(matrix, threshold, main, out / "confusion.png"),
    }
    oof = _draw_oof_images(data, gt, results[main], image_ids, threshold, out, n_oof)
    tests = _draw_test_images(data, test_preds, out, n_images)
    curves = {m: plot_training_curves(info.run, m, out / f"curves_{m}.png") if info.run else (None, "no run folder given")
              for m in [*info.models, *([info.classifier] if info.classifier else [])]}
    context = {"out": out, "results": results, "scores": scores, "ap": ap, "params": params, "info": info,
               "threshold": threshold, "main": main, "matrix": matrix, "figures": figures, "oof": oof, "tests": tests,
               "curves": curves, "search": search, "folds": fold_ids, "n_images": len(image_ids), "auc": auc,
               "test_map": test_map}
    _write_pages(out, "", context)
    if latest is not None:
        prefix = f"{out.relative_to(latest).as_posix()}/" if out.is_relative_to(latest) else f"{out.resolve().as_uri()}/"
        _write_pages(latest, prefix, context)
        for name in ("summary.json", "nested.json", "scores.csv", "per_class_ap.csv", "confusion.csv",
                     "classifier_auc.csv", "search.csv"):
            if (out / name).is_file():
                with atomic_path(latest / name) as tmp:
                    tmp.write_bytes((out / name).read_bytes())
            else:  # another set's file must not pass for this one's
                (latest / name).unlink(missing_ok=True)
    return summary


# ---------------------------------------------------------------------------- figures (numbers)


def _fold_ids(folds: pd.DataFrame | None, image_ids: list[str]) -> dict[int, list[str]]:
    if folds is None:
        return {}
    f = folds[folds["image_id"].isin(set(image_ids))]
    return {int(k): g["image_id"].tolist() for k, g in f.groupby("fold")}


def _scores(scored: dict[str, Scored], masks: dict[int, np.ndarray], params: Params | None,
            test_map: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per predictions: pooled mAP, fold mean, the honest fold mean (nested for the tuned
    ensembles), and each fold's mAP (in-sample for the ensembles; ``nested_k`` beside it); with
    ``test_map``, its ``test_map`` column (NaN for the predictions not scored on test)."""
    rows = []
    nested = params.nested_folds if params is not None else {}
    for name, s in scored.items():
        per_fold = {k: s.map(m) for k, m in masks.items()}
        mean = float(np.mean(list(per_fold.values()))) if per_fold else math.nan
        tuned = name in ENSEMBLES
        honest = nested.get(name) if tuned else list(per_fold.values())
        row = {"predictions": name, "tuned_on_these_images": tuned, "pooled_map": s.map(), "fold_mean_map": mean,
               "honest_fold_mean_map": float(np.mean(honest)) if honest and len(honest) == len(per_fold) else math.nan}
        if test_map:
            row["test_map"] = float(test_map.get(name, math.nan))
        row.update({f"fold{k}_map": v for k, v in per_fold.items()})
        if tuned and nested.get(name) and len(nested[name]) == len(per_fold):
            row.update({f"fold{k}_nested_map": v for k, v in zip(per_fold, nested[name])})
        rows.append(row)
    return pd.DataFrame(rows)


def _per_class(scored: dict[str, Scored], masks: dict[int, np.ndarray], truth: Truth) -> pd.DataFrame:
    """AP per class (rows) for each predictions (pooled) and each predictions x fold (``name@foldK``)."""
    table = {"gt_boxes": {CLASS_NAMES[c]: int(truth.counts[c].sum()) for c in range(NUM_CLASSES)}}
    for name, s in scored.items():
        table[name] = {CLASS_NAMES[int(c)]: v for c, v in s.ap().items()}
        for k, m in masks.items():
            table[f"{name}@fold{k}"] = {CLASS_NAMES[int(c)]: v for c, v in s.ap(m).items()}
    ap = pd.DataFrame(table)
    ap.index.name = "class"
    return ap


def classifier_auc(p_abnormal: pd.Series, gt: pd.DataFrame, image_ids: list[str],
                   folds: dict[int, list[str]]) -> pd.DataFrame:
    """The classifier's OOF ROC AUC: ``p_abnormal`` (by image_id) against "the image has a finding"
    (a ground-truth box of class 0-13), over every image (pooled: the fold models' scores ranked
    together) and per fold, then the fold mean. NaN where the images hold one label only."""
    abnormal = set(gt.loc[gt["class_id"] != NO_FINDING, "image_id"])
    rows = []
    for name, ids in [("all folds, pooled", list(image_ids)), *[(f"fold {k}", v) for k, v in folds.items()]]:
        y = np.array([i in abnormal for i in ids], dtype=bool)
        p = p_abnormal.reindex(ids).to_numpy(dtype=float)
        ok = 0 < y.sum() < len(y) and not np.isnan(p).any()
        rows.append({"images": name, "n_images": len(ids), "abnormal": int(y.sum()),
                     "roc_auc": float(roc_auc_score(y, p)) if ok else math.nan})
    if folds:
        per_fold = [r["roc_auc"] for r in rows[1:]]
        rows.append({"images": "fold mean", "n_images": len(image_ids), "abnormal": rows[0]["abnormal"],
                     "roc_auc": float(np.mean(per_fold))})
    return pd.DataFrame(rows)


def submission_test_map(labels: Path, submission: Path) -> float:
    """mAP@0.4 of a written submission against test labels (``DATA/test_labels.csv``), scored as
    ``cxr evaluate --labels LABELS --submission FILE`` (``make evaluate``) scores it: the metric of
    :mod:`cxr.metric` over every labelled image. For the report only: never used for tuning.
    A submitted image without labels is a :class:`DataError` (evaluate refuses it too)."""
    gt = ground_truth(read_labels(labels))
    labelled = sorted(set(gt["image_id"]))
    listed = read_table(submission, dtype={"image_id": str}, keep_default_na=False)["image_id"]
    unlabelled = sorted(set(listed) - set(labelled))
    if unlabelled:
        raise DataError(labels, f"{len(unlabelled)} image(s) of {submission} have no test labels, "
                                f"e.g. {unlabelled[:3]}")
    return float(mean_average_precision(gt, read_submission(submission), labelled)["map"])


def best_f1_threshold(s: Scored) -> float:
    """The score at which the findings (classes 0-13, pooled) reach their best F1: the threshold the
    confusion matrix and the OOF pictures use. 0.5 when there is no finding to find or no box."""
    n_gt = int(s.truth.counts[:NO_FINDING].sum())
    rows = np.flatnonzero(s.cls != NO_FINDING)
    if n_gt == 0 or len(rows) == 0:
        return 0.5
    order = rows[np.argsort(-s.score[rows], kind="stable")]
    tp = np.cumsum(s.tp[order])
    f1 = 2 * tp / (np.arange(1, len(order) + 1) + n_gt)
    return float(s.score[order][int(np.argmax(f1))])


def confusion(gt: pd.DataFrame, preds: pd.DataFrame, threshold: float, iou_thr: float = IOU_THRESHOLD) -> pd.DataFrame:
    """Counts of ground-truth boxes (rows: class, plus ``spurious`` = predictions that found none)
    against predictions with ``score >= threshold`` (columns: class, plus ``missed``).

    Per image, predictions in score order first take a box of their own class as the metric does
    (the best-IoU box, if IoU > ``iou_thr`` and free): the diagonal is the true positives at this
    threshold. Predictions left over then take the best-IoU free box of another class (a confusion);
    what is still left is missed (ground truth) or spurious (predictions).
    """
    labels = [*CLASS_NAMES, "spurious"]
    m = np.zeros((NUM_CLASSES + 1, NUM_CLASSES + 1), dtype=np.int64)
    preds = preds[preds["score"] >= threshold]
    g_by = {k: (g["class_id"].to_numpy(dtype=int), g[BOX_COLUMNS].to_numpy(dtype=float)) for k, g in gt.groupby("image_id")}
    p_by = {k: p.sort_values("score", ascending=False, kind="stable") for k, p in preds.groupby("image_id")}
    for image_id in set(g_by) | set(p_by):
        gc, gb = g_by.get(image_id, (np.zeros(0, dtype=int), np.zeros((0, 4))))
        p = p_by.get(image_id)
        pc = p["class_id"].to_numpy(dtype=int) if p is not None else np.zeros(0, dtype=int)
        pb = p[BOX_COLUMNS].to_numpy(dtype=float) if p is not None else np.zeros((0, 4))
        iou = iou_matrix(pb, gb) if len(pb) and len(gb) else np.zeros((len(pb), len(gb)))
        taken = np.zeros(len(gc), dtype=bool)
        used = np.zeros(len(pc), dtype=bool)
        for i in range(len(pc)):  # as the metric: the best box of its class, if free
            same = np.flatnonzero(gc == pc[i])
            if len(same):
                j = same[int(np.argmax(iou[i, same]))]
                if iou[i, j] > iou_thr and not taken[j]:
                    taken[j] = used[i] = True
                    m[gc[j], pc[i]] += 1
        for i in np.flatnonzero(~used):  # then a free box of another class
            free = np.flatnonzero(~taken)
            if len(free):
                j = free[int(np.argmax(iou[i, free]))]
                if iou[i, j] > iou_thr:
                    taken[j] = used[i] = True
                    m[gc[j], pc[i]] += 1
        np.add.at(m[:, NUM_CLASSES], gc[~taken], 1)
        np.add.at(m[NUM_CLASSES], pc[~used], 1)
    return pd.DataFrame(m, index=labels, columns=[*CLASS_NAMES, "missed"])


# ---------------------------------------------------------------------------- plots


def _save(fig: plt.Figure, path: Path, dpi: int = 90) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def _pr_curve(s: Scored, c: int) -> tuple[np.ndarray, np.ndarray]:
    rows = s.order[c]
    n_gt = max(int(s.truth.counts[c].sum()), 1)
    tp = np.cumsum(s.tp[rows])
    return tp / n_gt, tp / np.arange(1, len(rows) + 1)


def _plot_pr(scored: dict[str, Scored], truth: Truth, names: list[str], path: Path, main: str = "") -> Path:
    """One panel per class: precision against recall of each predictions, AP in the legend; ``main`` drawn thicker."""
    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5), sharex=True, sharey=True)
    colours = {n: MODEL_COLOURS[i % len(MODEL_COLOURS)] for i, n in enumerate(names)}
    aps = {n: scored[n].ap() for n in names}
    for c, ax in zip(range(NUM_CLASSES), axes.ravel()):
        n_gt = int(truth.counts[c].sum())
        for n in names:
            ap = aps[n][str(c)]
            if ap is None:
                continue
            recall, precision = _pr_curve(scored[n], c)
            style = {"lw": 2.2} if n == main else {"lw": 1.2, "ls": "--" if n == "prior_boxes" else "-"}
            ax.plot(recall, precision, color=colours[n], label=f"{n} AP {ap:.3f}", **style)
        ax.set_title(f"{CLASS_NAMES[c]} ({n_gt} GT)", fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if n_gt:
            ax.legend(fontsize=7, loc="upper right", framealpha=0.8, handlelength=1.5)
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=9, color="#888")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.suptitle("Precision-recall on the OOF predictions (pooled over folds), AP@0.4 per predictions", fontsize=12)
    fig.tight_layout()
    return _save(fig, path, dpi=80)


def _plot_confusion(matrix: pd.DataFrame, threshold: float, name: str, path: Path) -> Path:
    counts = matrix.to_numpy()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # colour: share of the row
    fig, ax = plt.subplots(figsize=(12, 10))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(counts.shape[1]), matrix.columns, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(counts.shape[0]), matrix.index, fontsize=9)
    ax.axhline(counts.shape[0] - 1.5, color="#b00020", lw=1)
    ax.axvline(counts.shape[1] - 1.5, color="#b00020", lw=1)
    ax.set_xlabel(f"predicted ({name}, score >= {threshold:.3f})")
    ax.set_ylabel("ground truth (fused readers)")
    ax.set_title(f"Confusion at IoU {IOU_THRESHOLD}: counts; colour = share of the row", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def read_curves(fold: Path) -> tuple[pd.DataFrame | None, str]:
    """The training log of one fold folder as a table (one row per epoch or iteration) and the file
    it came from; ``(None, why)`` when there is none or it cannot be read.

    Reads ``metrics.csv`` (every model: models/curves.py), or from older runs ``train/results.csv``
    (ultralytics) and ``train/metrics.json`` (detectron2: JSON lines). Column names are stripped
    (older ultralytics pads them) and non-numeric columns dropped, so a renamed or added column
    changes only which lines are drawn.
    """
    for name in CURVE_FILES:
        path = fold / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                table = pd.DataFrame([r for r in rows if isinstance(r, dict)])
            else:
                table = pd.read_csv(path)
        except (OSError, ValueError) as e:
            return None, f"{path} unreadable ({type(e).__name__})"
        table.columns = [str(c).strip() for c in table.columns]
        table = table.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
        if table.empty:
            return None, f"{path} holds no numbers"
        return table, name
    events = sorted(fold.rglob("events.out.tfevents*"))
    if events:
        return None, f"only TensorBoard files ({events[0].relative_to(fold)}): tensorboard --logdir {fold}"
    return None, f"no curve file ({', '.join(CURVE_FILES[:3])}) in {fold}"


def _curve_series(table: pd.DataFrame) -> tuple[str, dict[str, pd.Series], tuple[str, pd.Series] | None]:
    """(x label, loss series by name, (metric name, series) or None) of one log table."""
    x = next((c for c in ("epoch", "iteration", "iter", "step") if c in table.columns), None)
    index = table[x] if x else pd.Series(np.arange(1, len(table) + 1), index=table.index)
    if x == "epoch" and "iteration" not in table.columns and index.min() == 0:
        index = index + 1  # ultralytics counts from 1, some logs from 0: show epochs from 1
    t = table.set_axis(index.to_numpy(), axis=0)
    losses: dict[str, pd.Series] = {}
    for name, exact, prefix in (("train loss", ("train_loss", "total_loss", "loss"), "train/"),
                                ("validation loss", ("val_loss",), "val/")):
        col = next((c for c in exact if c in t.columns), None)
        if col:
            losses[name] = t[col]
        else:
            parts = [c for c in t.columns if c.startswith(prefix) and "loss" in c]
            if parts:
                losses[name] = t[parts].sum(axis=1, min_count=1)
    metric_cols = ["val_map", "metrics/mAP50(B)", "val_auc"] + [c for c in t.columns if "map" in c.lower() or "auc" in c.lower()]
    metric = next((c for c in metric_cols if c in t.columns), None)
    return x or "row", {k: v.dropna() for k, v in losses.items()}, (metric, t[metric].dropna()) if metric else None


def plot_training_curves(run: Path, model: str, path: Path) -> tuple[Path | None, str]:
    """Loss and validation metric per fold of ``run/model`` in one PNG; (None, what is missing) when no
    fold has a readable log. The text names the files read and the folds without one."""
    folds = sorted((d for d in (run / model).glob("fold*") if d.is_dir() and d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    if not folds:
        return None, f"no fold folder in {run / model}"
    logs, missing = {}, []
    for d in folds:
        table, source = read_curves(d)
        if table is None:
            missing.append(f"{d.name}: {source}")
        else:
            logs[d.name] = (table, source)
    if not logs:
        return None, "; ".join(missing)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    metric_names, xlabel = set(), "epoch"
    for i, (fold, (table, _)) in enumerate(logs.items()):
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        xlabel, losses, metric = _curve_series(table)
        for name, series in losses.items():
            if len(series):
                train = name == "train loss"
                left.plot(series.index, series.to_numpy(), color=colour, ls="-" if train else "--",
                          marker=("o" if train else "s") if len(series) < 30 else None, ms=4, label=f"{fold} {name}")
        if metric is not None and len(metric[1]):
            metric_names.add(METRIC_NAMES.get(metric[0], metric[0]))
            right.plot(metric[1].index, metric[1].to_numpy(), color=colour, marker="o" if len(metric[1]) < 30 else None,
                       ms=3, label=f"{fold} {metric[0]}")
    left.set(title=f"{model}: loss (solid train, dashed validation)", xlabel=xlabel)
    right.set(title=f"{model}: validation {', '.join(sorted(metric_names)) or '(no metric logged)'}", xlabel=xlabel)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    sources = sorted({source for _, source in logs.values()})
    note = f"from {', '.join(sources)} in each fold folder" + (f"; missing: {'; '.join(missing)}" if missing else "")
    return _save(fig, path), note


# ---------------------------------------------------------------------------- pictures


def _view(path: Path, original_wh: tuple[int, int], long_side: int) -> np.ndarray:
    """A (squashed) PNG shown at its original aspect ratio, ``long_side`` px on its longer side."""
    image = read_image(path)
    return cv2.resize(image, display_size(*original_wh, long_side), interpolation=cv2.INTER_LINEAR)


def _pick_oof(gt: pd.DataFrame, preds: pd.DataFrame, image_ids: list[str], threshold: float, n: int) -> list[tuple[str, str]]:
    """(image_id, why) for up to ``n`` OOF images: half with the most ground-truth findings, the rest
    those whose most confident finding box above the threshold matches no ground truth box at all."""
    ids = set(image_ids)
    findings = gt[(gt["class_id"] != NO_FINDING) & gt["image_id"].isin(ids)]
    counts = findings.groupby("image_id").size().sort_values(ascending=False, kind="stable")
    picks = [(i, f"{c} ground-truth finding(s)") for i, c in counts.head((n + 1) // 2).items()]
    boxes = preds[(preds["class_id"] != NO_FINDING) & (preds["score"] >= threshold) & preds["image_id"].isin(ids)]
    g_by = {k: g[BOX_COLUMNS].to_numpy(dtype=float) for k, g in findings.groupby("image_id")}
    for r in boxes.sort_values("score", ascending=False, kind="stable").itertuples(index=False):
        if len(picks) >= n:
            break
        if r.image_id in {p[0] for p in picks}:
            continue
        g = g_by.get(r.image_id)
        box = np.array([[getattr(r, c) for c in BOX_COLUMNS]], dtype=float)
        if g is None or iou_matrix(box, g).max() <= IOU_THRESHOLD:
            picks.append((r.image_id, f"a spurious {CLASS_NAMES[int(r.class_id)]} box at {r.score:.2f}"))
    return picks


def _draw_oof_images(data: DataFolder, gt: pd.DataFrame, preds: pd.DataFrame, image_ids: list[str], threshold: float,
                     out: Path, n: int, per_image: int = 12, long_side: int = 512) -> list[tuple[Path, str]]:
    """Ground truth (left) beside the predictions above ``threshold`` (right, the top ``per_image``)."""
    sizes = data.train_sizes.set_index("image_id")
    drawn = []
    for image_id, why in _pick_oof(gt, preds, image_ids, threshold, n):
        wh = tuple(int(v) for v in sizes.loc[image_id, ["width", "height"]])
        view = _view(data.image("train", image_id), wh, long_side)
        g = gt[gt["image_id"] == image_id]
        p = preds[(preds["image_id"] == image_id) & (preds["class_id"] != NO_FINDING)]
        p = p[p["score"] >= threshold]
        shown = f"top {per_image} of {len(p)}" if len(p) > per_image else str(len(p))
        p = p.nlargest(per_image, "score")
        n_true = int((g["class_id"] != NO_FINDING).sum())
        left = draw(view, g, wh, 0.0, f"ground truth: {n_true} finding(s)" if n_true else "ground truth: No finding",
                    scores=False)
        right = draw(view, p, wh, threshold, f"predicted, score >= {threshold:.3f}: {shown} box(es)")
        path = write_image(side_by_side(left, right), out / f"oof_{image_id[:16]}.png")
        drawn.append((path, f"{image_id}: {why}"))
    return drawn


def _draw_test_images(data: DataFolder, preds: pd.DataFrame, out: Path, n: int, per_image: int = 5,
                      long_side: int = 512) -> list[tuple[Path, str]]:
    """The ``n`` test images with the most confident findings, their top boxes drawn."""
    boxes = preds[preds["class_id"] != NO_FINDING].sort_values("score", ascending=False, kind="stable")
    ranked = boxes.groupby("image_id", sort=False)["score"].max().sort_values(ascending=False, kind="stable")
    sizes = data.test_sizes.set_index("image_id")
    drawn = []
    for image_id in list(ranked.index[:n]):
        wh = tuple(int(v) for v in sizes.loc[image_id, ["width", "height"]])
        top = boxes[boxes["image_id"] == image_id].head(per_image)
        image = draw(_view(data.image("test", image_id), wh, long_side), top, wh, 0.0, f"test {image_id[:12]}")
        drawn.append((write_image(image, out / f"test_{image_id[:16]}.png"), f"{image_id}: top {len(top)} box(es)"))
    return drawn


# ---------------------------------------------------------------------------- pages


def _f(v: object, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def _html_table(df: pd.DataFrame, digits: int = 4, left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(df.columns))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(_f(v, digits))}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(df: pd.DataFrame, digits: int = 4) -> list[str]:
    return ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns),
            *["| " + " | ".join(_f(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]]


def _ensemble_rows(params: Params | None, info: RunInfo, search: pd.DataFrame) -> list[tuple[str, str]]:
    rows = ensemble_rows(params, info.run, info.classifier, info.data)
    rows[0] = ("run", f"{info.name} ({info.run.resolve()})" if info.name and info.run else rows[0][1])
    rows.insert(1, ("model set", info.set_name or "-"))
    rows.append(("search", f"{len(search)} candidates scored on the OOF predictions (search.csv)"))
    if info.submission:
        rows.append(("submission", info.submission))
    return rows


def _explain(scores: pd.DataFrame, params: Params | None = None) -> list[str]:
    """The paragraphs that say what each mAP column is, with this run's numbers (the gate's effect too)."""
    by = scores.set_index("predictions")
    gated = "ensemble_gated" in by.index
    tuned, its = ("the ensemble and the ensemble with the gate were", "their") if gated else ("the ensemble was", "its")
    text = [
        ("<b>Pooled OOF mAP</b>: every training image's out-of-fold predictions scored in one go, so each class's "
        "boxes from all fold models are ranked in one list. <b>Fold mean</b>: each fold's images scored alone "
        "(one fold model's ranking, the classes with ground truth in that fold), then the mean over folds. The two "
        "measure different things, and the gap between them is not optimism: pooling ranks together fold models "
        "whose scores are not calibrated to each other (a confident false positive of one fold model outranks "
        "true positives of another); a fold's mean leaves out the rare classes absent from the fold; and AP's "
        "precision envelope (a running maximum) comes out higher on a fold's smaller, noisier ranking. So the fold "
        "mean is usually the higher one, for every row alike."),
        (f"<b>In-sample</b> (optimistic): {tuned} tuned on these OOF predictions, so "
        f"{its} pooled and fold-mean figures are measured on the images that chose {its} parameters. <b>Honest "
        "fold mean</b>: for the ensembles the nested figure: for each fold k the same search ran on the other "
        "folds only and its choice was scored on fold k; for single models and the prior boxes, which are not "
        "tuned on OOF, it is their fold mean. Compare models and ensembles in this column."),
    ]
    for name in ENSEMBLES:
        if name in by.index and not math.isnan(by.loc[name, "honest_fold_mean_map"]):
            inside, nested = by.loc[name, "fold_mean_map"], by.loc[name, "honest_fold_mean_map"]
            best = by.loc[[n for n in by.index if n not in ENSEMBLES and n != "prior_boxes"], "honest_fold_mean_map"]
            line = (f"{name}: fold mean {inside:.4f} in-sample vs {nested:.4f} nested, so tuning on the scored "
                    f"images adds {inside - nested:+.4f}")
            if len(best.dropna()):
                line += f"; the best single model's fold mean is {best.max():.4f} ({best.idxmax()})"
            text.append(line + ".")
    if gated and "ensemble" in by.index:
        rule = params.gate.rule if params is not None else "chosen"
        numbers = by.select_dtypes("number")
        diff = numbers.loc["ensemble_gated"] - numbers.loc["ensemble"]
        line = (f"<b>The gate</b> ({rule}), against the same ensemble without it: pooled OOF mAP "
                f"{by.loc['ensemble', 'pooled_map']:.4f} -> {by.loc['ensemble_gated', 'pooled_map']:.4f} "
                f"({diff['pooled_map']:+.4f}, in-sample)")
        if not math.isnan(diff["honest_fold_mean_map"]):
            line += (f", nested fold mean {by.loc['ensemble', 'honest_fold_mean_map']:.4f} -> "
                     f"{by.loc['ensemble_gated', 'honest_fold_mean_map']:.4f} ({diff['honest_fold_mean_map']:+.4f})")
        if "test_map" in by.columns and not math.isnan(diff["test_map"]):
            line += f", test {diff['test_map']:+.4f}"
        text.append(line + ".")
    if "test_map" in by.columns:
        text.append("<b>Test mAP@0.4</b>: the submission (and, with the gate on, the ensemble without it, written "
                    "and checked the same way) scored against the data folder's test_labels.csv as cxr evaluate "
                    "scores it (make evaluate). Nothing was tuned on the test labels: the gate, weights and "
                    "fusion were chosen on OOF alone.")
    return text


def _notes(params: Params | None) -> list[str]:
    """The tuner's warnings about weak members and the members it left out (weight 0)."""
    if params is None:
        return []
    notes = list(params.warnings)
    out = [m for m, w in zip(params.fusion.models, params.fusion.weights) if w == 0]
    if out:
        notes.append(f"left out by the tuner (weight 0): {', '.join(out)}: kept in params.json with weight 0, "
                     "no part of the fusion")
    return notes


def _labels(names: pd.Series, params: Params | None, main: str) -> pd.Series:
    """Row names of the main table: the ensembles say with or without the gate and which was submitted."""
    rule = params.gate.rule if params is not None else ""
    if main == "ensemble_gated":
        shown = {"ensemble": "ensemble, without the gate",
                 "ensemble_gated": f"ensemble_gated, with the {rule} gate (submitted)"}
    else:
        shown = {"ensemble": "ensemble (submitted)"}
    return names.map(lambda n: shown.get(n, n))


def _write_pages(folder: Path, prefix: str, c: dict) -> None:
    """index.html and index.md into ``folder``; pictures and files are linked as ``prefix + name``."""
    info: RunInfo = c["info"]
    params: Params | None = c["params"]
    scores: pd.DataFrame = c["scores"]

    def src(path: Path | str) -> str:
        return quote(prefix + Path(path).name, safe="/:+")

    title = f"Ensemble report: {info.name or folder.name}" + (f", model set {info.set_name}" if info.set_name else "")
    folds = c["folds"]
    subtitle = (f"{datetime.now():%Y-%m-%d %H:%M}. Out-of-fold predictions of {c['n_images']} training images"
                + (f" in {len(folds)} folds" if folds else "") + ", scored with the competition metric (mAP@0.4, "
                "cxr.metric). ")
    warning = info.data.warning() if info.data is not None else ""
    notes = _notes(params)
    has_test = "test_map" in scores.columns
    main_cols = scores[["predictions", "tuned_on_these_images", "pooled_map", "fold_mean_map", "honest_fold_mean_map",
                        *(["test_map"] if has_test else [])]].copy()
    main_cols["predictions"] = _labels(main_cols["predictions"], params, c["main"])
    main_cols["tuned_on_these_images"] = main_cols["tuned_on_these_images"].map({True: "yes: in-sample", False: "no"})
    main_cols.columns = ["predictions", "tuned on these images?", "pooled OOF mAP", "fold mean mAP",
                         "honest fold mean mAP (nested for ensembles)", *([TEST_COLUMN] if has_test else [])]
    auc: pd.DataFrame | None = c["auc"]
    if auc is not None:
        auc = auc.rename(columns={"images": "OOF images", "n_images": "images", "abnormal": "with a finding",
                                  "roc_auc": "ROC AUC"})
        auc_title = f"Classifier {info.classifier or ''}: OOF ROC AUC".replace("  ", " ")
        auc_text = ("P(abnormal) of each training image, predicted by the fold model that did not train on it, against "
                    "whether the image has a finding (a ground-truth box of class 0-13). Pooled: every fold model's "
                    "scores ranked together; per fold: each fold alone (classifier_auc.csv).")
    fold_cols = [f"fold{k}_map" for k in folds]
    per_fold = scores[["predictions", *fold_cols]].copy()
    per_fold.columns = ["predictions", *[f"fold {k} ({len(folds[k])} images)" for k in folds]]
    nested_rows = scores[scores["predictions"].isin(ENSEMBLES)]
    if fold_cols and all(f"fold{k}_nested_map" in scores.columns for k in folds):
        extra = nested_rows[["predictions", *[f"fold{k}_nested_map" for k in folds]]].copy()
        extra.columns = per_fold.columns
        extra["predictions"] = extra["predictions"] + ", nested"
        per_fold = pd.concat([per_fold, extra], ignore_index=True)
    ap: pd.DataFrame = c["ap"]
    names = list(c["results"])
    pooled_ap = ap[["gt_boxes", *names]].reset_index().rename(columns={"gt_boxes": "GT boxes"})

    sets = sorted(p.parent.name for p in folder.glob("*/index.html"))
    links = [f'<a href="{src("index.md")}">index.md</a>', f'<a href="{src("scores.csv")}">scores.csv</a>',
             f'<a href="{src("per_class_ap.csv")}">per_class_ap.csv</a>', f'<a href="{src("confusion.csv")}">confusion.csv</a>',
             f'<a href="{src("search.csv")}">search.csv</a>']
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="sub">{html.escape(subtitle)}Files: {" · ".join(links)}</p>']
    if warning:
        body.append(f'<div class="warn">{html.escape(warning)} The scores below are scores on synthetic images.</div>')
    if notes:
        body.append('<div class="caution"><b>Weak ensemble members</b><ul>'
                    + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul></div>")
    if prefix and sets:
        body.append('<p class="sub">This is the model set last submitted under this name. Every set: '
                    + ", ".join(f'<a href="{quote(s, safe="+")}/index.html">{html.escape(s)}</a>' for s in sets) + ".</p>")
    body += ["<h2>The chosen ensemble</h2>", about_table(_ensemble_rows(params, info, c["search"]))]
    search: pd.DataFrame = c["search"]
    if len(search) and "map" in search.columns:
        cols = [k for k in ("stage", "weights", "iou_thr", "skip_box_thr", "conf_type", "rule", "low", "high", "map")
                if k in search.columns]
        top = search.sort_values("map", ascending=False, kind="stable").head(8)[cols]
        body += ["<details><summary>The 8 best candidates of the search (pooled OOF mAP, in-sample)</summary>",
                 _html_table(top.astype({"weights": str}) if "weights" in cols else top, 4, left=2), "</details>"]
    body += ["<h2>OOF mAP@0.4" + (" (and test)" if has_test else "") + "</h2>", _html_table(main_cols, 4, left=2)]
    body += [f"<p>{t}</p>" for t in _explain(scores, params)]
    if fold_cols:
        body += ["<h3>Per fold (each fold's images scored alone)</h3>", _html_table(per_fold, 4)]
    if auc is not None:
        body += [f"<h2>{html.escape(auc_title)}</h2>", f"<p>{html.escape(auc_text)}</p>", _html_table(auc, 4)]
    body += ["<h2>Per-class AP@0.4 (pooled OOF)</h2>", _html_table(pooled_ap, 3)]
    if fold_cols:
        for n in names:
            t = ap[["gt_boxes", n, *[f"{n}@fold{k}" for k in folds]]].reset_index()
            t.columns = ["class", "GT boxes", "pooled", *[f"fold {k}" for k in folds]]
            body += [f"<details><summary>{html.escape(n)}: per-class AP per fold</summary>", _html_table(t, 3), "</details>"]
    body += ["<h2>Precision-recall</h2>", f'<img class="fig" src="{src(c["figures"]["pr"])}" alt="PR curves">']
    body += ["<h2>Confusion matrix</h2>",
             (f"<p>{html.escape(c['main'])} predictions with score &gt;= {c['threshold']:.3f} (the score of its best F1 over "
             f"the 14 findings, pooled OOF) against the fused ground truth at IoU {IOU_THRESHOLD}. A prediction first "
             "takes a box of its own class as the metric does (the diagonal: true positives at this threshold), then "
             "a free box of another class (a confusion). <b>missed</b>: ground truth no prediction took; "
             "<b>spurious</b>: predictions that overlap no free ground truth box (confusion.csv).</p>"),
             f'<img class="fig" src="{src(c["figures"]["confusion"])}" alt="confusion matrix">']
    body += ["<h2>OOF images: ground truth (left) and predictions (right)</h2>", legend()]
    if c["oof"]:
        for path, why in c["oof"]:
            body += [f'<p class="muted">{html.escape(why)}</p>', f'<img class="fig" src="{src(path)}" alt="{html.escape(why)}">']
    else:
        body.append("<p>No OOF image with a finding to show.</p>")
    body += ["<h2>Test images: the submission's most confident findings (top 5 boxes)</h2>"]
    tests = "".join(f'<img class="fig" src="{src(p)}" alt="{html.escape(why)}" title="{html.escape(why)}">'
                    for p, why in c["tests"])
    body.append(f'<div class="row">{tests}</div>' if tests else "<p>No finding box in the submission.</p>")
    body += ["<h2>Training curves</h2>"]
    for m, (path, note) in c["curves"].items():
        if path is None:
            body.append(f"<p><b>{html.escape(m)}</b>: no curves: {html.escape(note)}</p>")
        else:
            body += [f'<p class="muted"><b>{html.escape(m)}</b>, {html.escape(note)}</p>',
                     f'<img class="fig" src="{src(path)}" alt="{html.escape(m)} training curves">']
    ablation = read_ablation(info.run) if info.run else {}
    if ablation:
        body += ablation_html(info.run.name, ablation)
    with atomic_path(folder / "index.html") as tmp:
        tmp.write_text(page(title, "\n".join(body), ".row { display: flex; flex-wrap: wrap; gap: 10px; }\n"
                            ".caution { background: #fff4e0; border: 2px solid #c77700; color: #6b4100; "
                            "padding: 8px 12px; margin: 8px 0; } .caution ul { margin: 4px 0 0; }"), encoding="utf-8")

    md = [f"# {title}", "", subtitle + "The full report with figures is `index.html` (opens offline).", ""]
    if warning:
        md += [f"**{warning}**", ""]
    if notes:
        md += ["**Weak ensemble members**", "", *[f"- {n}" for n in notes], ""]
    md += ["## The chosen ensemble", "", "| | |", "| --- | --- |",
           *[f"| {k} | {v.replace('|', '/')} |" for k, v in _ensemble_rows(params, info, c["search"])], "",
           "## OOF mAP@0.4" + (" (and test)" if has_test else ""), "", *_md_table(main_cols), ""]
    md += [*(html_text.replace("<b>", "**").replace("</b>", "**") + "\n" for html_text in _explain(scores, params))]
    if fold_cols:
        md += ["### Per fold", "", *_md_table(per_fold), ""]
    if auc is not None:
        md += [f"## {auc_title}", "", auc_text, "", *_md_table(auc), ""]
    md += ["## Per-class AP@0.4 (pooled OOF)", "", *_md_table(pooled_ap, 3), "",
           f"![PR curves]({src(c['figures']['pr'])})", f"![confusion]({src(c['figures']['confusion'])})", ""]
    if ablation and (info.run / "ablation.md").is_file():
        md += [f"## Ablation: the winners' levers on {info.run.name} (bench/levers.py; nested OOF mAP@0.4)", "",
               (info.run / "ablation.md").read_text().strip(), ""]
    with atomic_path(folder / "index.md") as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
