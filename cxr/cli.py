"""``cxr``: the shared core's command line (folds, fusion, metric, submissions, synthetic data).

Every subcommand is a thin wrapper over a library function; run ``cxr <command> -h``.
Errors in input files (and unwritable outputs) print one line naming the file, row and value,
and exit 2; nothing invalid is left at an output path.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import baseline, fusion, labels as labels_io, metric, predictions, submission, synth
from cxr.args import Parser, iou, non_negative_int, seed
from cxr.config import load
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, SUBMISSION_COLUMNS
from cxr.folds import fold_class_table, make_folds
from cxr.data import read_folds
from cxr.io import DataError, csv_row, one_line_errors, read_table, require_columns, show, warn, write_json, write_table


def _sizes(path: str | None) -> pd.DataFrame | None:
    return labels_io.read_sizes(path) if path else None


# The fold count follows the data, never the run's name: the synthetic demo data (a folder that cxr synth
# marked with synth.yaml) gets 3 folds to fit 2 CPU cores, any other data the competition's usual 5.
DEMO_FOLDS, DEFAULT_FOLDS = 3, 5


def default_folds(labels: str | Path) -> tuple[int, str]:
    """The fold count for a new fold file of ``labels`` and why: 3 for the synthetic demo data, else 5."""
    if (Path(labels).parent / "synth.yaml").is_file():
        return DEMO_FOLDS, "the synthetic demo data"
    return DEFAULT_FOLDS, "the default"


def cmd_folds(a: argparse.Namespace) -> None:
    labels = labels_io.read_train_labels(a.labels)
    n_images = labels["image_id"].nunique()
    if a.n_folds is None:
        a.n_folds, why = default_folds(a.labels)
        print(f"{a.n_folds} folds ({why}; --n-folds / N_FOLDS= chooses)")
    if not 2 <= a.n_folds <= n_images:
        raise DataError(a.labels, f"--n-folds {a.n_folds}: need 2 <= n_folds <= {n_images} (the images in the file)")
    folds = make_folds(labels, a.n_folds, a.seed)
    write_table(folds, a.out)
    print(fold_class_table(labels, folds).to_string())
    print(f"wrote {a.out}: {len(folds)} images in {a.n_folds} folds (seed {a.seed})")


def _drop_readers(labels: pd.DataFrame, text: str, path: str) -> tuple[str, ...]:
    """``--drop-readers R8,R9``: rad_ids of the file; dropping a reader it lacks (a typo) or every
    reader (an empty table) is an error, images left without a reader are counted in a warning."""
    drop = tuple(r.strip() for r in text.split(",") if r.strip())
    readers = sorted(set(labels["rad_id"]))
    unknown = [r for r in drop if r not in readers]
    if unknown:
        raise DataError(path, f"--drop-readers {','.join(unknown)}: no such rad_id in the file; its readers: {readers}")
    if set(readers) <= set(drop):
        raise DataError(path, f"--drop-readers {','.join(drop)} drops every reader of the file: nothing left to fuse")
    lost = labels["image_id"].nunique() - labels.loc[~labels["rad_id"].isin(drop), "image_id"].nunique()
    if lost:
        warn(f"{path}: {lost} image(s) read only by --drop-readers {','.join(drop)} are left out of the fused labels")
    return drop


def cmd_fuse(a: argparse.Namespace) -> None:
    labels = labels_io.read_train_labels(a.labels)
    drop = _drop_readers(labels, a.drop_readers, a.labels)
    if a.count:
        configs = {m: fusion.FusionConfig(mode=m, iou_thr=a.iou_thr, drop_readers=drop) for m in ("keep_all", "nms", "wbf")}
        table = fusion.count_boxes(labels, configs)
        table.loc["total"] = table.sum()
        print(table.to_string())
    if a.out:
        cfg = fusion.FusionConfig(mode=a.mode, iou_thr=a.iou_thr, drop_readers=drop)
        write_table(fusion.fuse_readers(labels, cfg), a.out)
        print(f"wrote {a.out} ({cfg})")


def _load_predictions(path: str) -> tuple[pd.DataFrame, list[str] | None]:
    """A submission (PredictionString) or a prediction table; a submission also gives its image list.

    Boxes Kaggle's scorer accepts but our format does not (negative or outside coordinates, a
    No-finding box other than 0 0 1 1) are scored as written, with a warning.
    """
    header = read_table(path, nrows=0)
    if list(header.columns) == SUBMISSION_COLUMNS:
        preds = submission.read_submission(path, warn=warn)  # a repeated image_id is an error
        ids = read_table(path, dtype={"image_id": str})["image_id"].tolist()
        return preds, ids
    return predictions.validate(read_table(path, dtype={"image_id": str}), path, warn=warn), None


def cmd_evaluate(a: argparse.Namespace) -> None:
    """Score like Kaggle: every labelled image counts; one the submission lacks has no prediction (missed).

    ``--folds`` (optionally ``--fold K``) or ``--subset`` (a submission's own image list) pick the images.
    What would move the score without a word is warned about, with counts: scored images a
    submission does not list or a prediction table has no row for (a table of one fold scored
    against every label), and boxes all in [0, 1] (normalized coordinates).
    Prints :func:`evaluation_table` (class names, 4 decimals), or with ``--json`` the metric's dict.
    """
    if a.fold is not None and not a.folds:
        raise DataError("--fold", "needs --folds (the fold file that says which images are in the fold)")
    if a.subset and a.folds:
        raise DataError("--subset", "give --subset or --folds, not both")
    labels = labels_io.read_labels(a.labels, _sizes(a.sizes))
    gt = metric.ground_truth(labels)
    labelled = sorted(set(gt["image_id"]))
    preds, listed = _load_predictions(a.submission)
    n = predictions.normalized_boxes(preds["class_id"].to_numpy(), preds[BOX_COLUMNS].to_numpy())
    if n:
        warn(f"{a.submission}: every finding box ({n}) lies in [0, 1]: {predictions.NORMALIZED} "
             "(scored as pixels, like Kaggle: they match almost nothing)")
    if a.folds:
        folds = read_folds(a.folds)
        if a.fold is not None:
            if a.fold not in set(folds["fold"]):
                raise DataError(a.folds, f"fold {a.fold} not in the fold file (folds {sorted(set(folds['fold']))})")
            folds = folds[folds["fold"] == a.fold]
        ids = folds["image_id"].tolist()
        preds = preds[preds["image_id"].isin(set(ids))]  # the fold file picks a subset on purpose
    elif a.subset:
        if listed is None:
            raise DataError(a.submission,
                            "--subset needs a submission (a prediction table lists no empty images); use --folds")
        ids = listed
    else:
        ids = labelled
    scope = "fold" if a.folds else "labelled"
    if listed is not None:
        lacking = set(ids) - set(listed)
        if lacking:
            warn(f"{a.submission} lacks {len(lacking)} of {len(set(ids))} {scope} images: "
                 "scored as missed (Kaggle refuses such a file); --subset scores only the listed images")
    else:  # a table has no row for an image without boxes, but a detector's table has one for every image it saw
        lacking = set(ids) - set(preds["image_id"])
        if lacking:
            hint = "" if a.fold is not None else (
                "; a table of some folds' images: --folds FILE [--fold K] scores only those")
            warn(f"{a.submission} has rows for {len(set(ids)) - len(lacking)} of {len(set(ids))} {scope} images: "
                 f"the other {len(lacking)} are scored as missed (no box){hint}")
    missing = sorted(set(ids) - set(gt["image_id"]))
    if missing:
        raise DataError(a.labels, f"{len(missing)} scored image(s) have no labels, e.g. {missing[:3]}")
    unknown = sorted(set(preds["image_id"]) - set(ids))
    if unknown:
        raise DataError(a.submission, f"{len(unknown)} predicted image(s) are not in the labels, e.g. {unknown[:3]}")
    result = metric.mean_average_precision(gt, preds, ids)
    if a.coco:
        result.update(metric.coco_ap(gt, preds, ids))
    if a.json:
        print(json.dumps(result))
        return
    scored = set(ids)
    print(evaluation_table(result, gt[gt["image_id"].isin(scored)], preds[preds["image_id"].isin(scored)], len(scored)))


def evaluation_table(result: dict, gt: pd.DataFrame, preds: pd.DataFrame, n_images: int) -> str:
    """``cxr evaluate``'s table: per class its name, AP@0.4 (4 decimals; '-' without ground truth), the
    ground-truth and predicted boxes; then the mAP line (and COCO AP when computed)."""
    n_gt = gt["class_id"].value_counts()
    n_pred = preds["class_id"].value_counts()
    lines = [f"{'class':<20} {'AP@0.4':>7} {'GT boxes':>9} {'predicted':>10}"]
    for c, name in enumerate(CLASS_NAMES):
        ap = result["ap"][str(c)]
        lines.append(f"{name:<20} {'-' if ap is None else f'{ap:.4f}':>7} {int(n_gt.get(c, 0)):>9} {int(n_pred.get(c, 0)):>10}")
    present = sum(v is not None for v in result["ap"].values())
    lines.append(f"{'mAP@0.4':<20} {result['map']:>7.4f}   mean over the {present} classes with ground truth; "
                 f"{n_images} images")
    if "coco_ap" in result:
        lines.append(f"{'COCO AP .50:.95':<20} {result['coco_ap']:>7.4f}   AP50 {result['coco_ap50']:.4f} (reference only)")
    return "\n".join(lines)


def _exit_on_problems(problems: list[str]) -> None:
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)


def cmd_check_submission(a: argparse.Namespace) -> None:
    """Exit 1 with every problem of the submission; a file that cannot be read at all (either one) is
    bad input like anywhere else: one line, exit 2."""
    read_table(a.submission, nrows=0)
    _exit_on_problems(submission.check_submission(a.submission, a.sample, _sizes(a.sizes)))
    print(f"{a.submission}: valid")


def cmd_submission(a: argparse.Namespace) -> None:
    sizes = _sizes(a.sizes)
    preds = predictions.read_predictions(a.predictions, sizes)
    sample = read_table(a.sample, dtype={"image_id": str})
    require_columns(sample, SUBMISSION_COLUMNS[:1], a.sample)
    ids = sample["image_id"].tolist()
    unknown = sorted(set(preds["image_id"]) - set(ids))
    if unknown:
        i = int(np.flatnonzero(preds["image_id"].isin(unknown).to_numpy())[0])
        raise DataError(a.predictions, f"image_id {show(preds['image_id'].iloc[i])} is not in {a.sample} "
                                       f"({len(unknown)} such image(s))", csv_row(i))
    submission.write_submission(preds, ids, a.out, a.sample, sizes)  # checked before it lands at --out
    print(f"wrote {a.out}: {len(ids)} images, {len(preds)} boxes")


def cmd_baseline(a: argparse.Namespace) -> None:
    train_sizes = labels_io.read_sizes(a.train_sizes)
    fused = fusion.fuse_readers(labels_io.read_train_labels(a.labels, train_sizes))
    if a.folds:  # out of fold: every training image predicted by the prior of the other folds
        folds = read_folds(a.folds)
        preds, sizes = baseline.oof_prior(fused, train_sizes, folds), train_sizes
    else:
        sizes = labels_io.read_sizes(a.sizes)
        preds = baseline.predict_prior(baseline.fit_prior(fused, train_sizes), sizes["image_id"].tolist(), sizes)
    predictions.write_predictions(preds, a.out, sizes)
    print(f"wrote {a.out}: prior boxes for {preds['image_id'].nunique()} images")


def cmd_synth(a: argparse.Namespace) -> None:
    overrides = {k: v for k, v in vars(a).items() if k in ("out", "n_train", "n_test", "size", "seed") and v is not None}
    cfg = load(synth.SynthConfig, a.config, overrides) if a.config else synth.SynthConfig(**overrides)
    out = synth.generate(cfg, where=a.config or "cxr synth")
    print(f"wrote {out}: {cfg.n_train} train + {cfg.n_test} test images at {cfg.size}px")


def cmd_stats(a: argparse.Namespace) -> None:
    if a.readers:
        print(synth.reader_table(synth.load_stats(a.out)))
        return
    if not (a.labels and a.sizes):
        raise DataError("cxr stats", "give --labels and --sizes (or --readers to print the readers of --out)")
    sizes = labels_io.read_sizes(a.sizes)
    stats = synth.compute_stats(labels_io.read_train_labels(a.labels, sizes), sizes)
    write_json(stats, a.out)
    print(f"wrote {a.out}")


def _report_failures(result, out: Path) -> None:
    for row in result.failed.head(10).itertuples():
        print(f"failed: {row.file}: {row.reason}", file=sys.stderr)
    if len(result.failed) > 10:
        print(f"failed: ... and {len(result.failed) - 10} more", file=sys.stderr)


def cmd_prepare(a: argparse.Namespace) -> None:
    from cxr.images import FAILED_NAME, META_NAME, prepare_png_set

    result = prepare_png_set(a.src, a.out, a.size, a.workers, exact=a.exact)
    rate = result.converted / result.seconds if result.seconds else 0.0
    print(f"{a.out}: {len(result.meta)} images at {a.size}px ({result.converted} converted now, {rate:.1f} images/s), "
          f"original sizes in {Path(a.out) / META_NAME}")
    if len(result.failed):
        _report_failures(result, Path(a.out))
        raise DataError(Path(a.out) / FAILED_NAME, f"{len(result.failed)} file(s) failed and were skipped (file, reason)")


EXACT_HELP = ("decode JPEG 2000 DICOMs at full resolution (default: at the lowest stored resolution that covers "
              "--size, ~3x faster, within 1.5 grey levels mean)")


def cmd_data(a: argparse.Namespace) -> None:
    from cxr.kaggle import build

    summary, results = build(a.src, a.out, a.size, a.labels, a.sample, a.workers, exact=a.exact)
    for split, r in results.items():
        rate = r.converted / r.seconds if r.seconds else 0.0
        print(f"{split}: {len(r.meta)} images ({r.converted} converted now, {rate:.1f} images/s)")
    for key, value in summary.items():
        print(f"  {key}: {', '.join(value) if isinstance(value, list) else value}")
    print(f"{a.out}: valid DATA folder; next: make folds DATA={a.out} NAME=<name>")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cxr", description=__doc__.splitlines()[0])  # one-line errors, exit 2 (subcommands too)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("folds", help="write image_id,fold (grouped by image, stratified over classes)")
    s.add_argument("--labels", required=True, help="Kaggle train.csv")
    s.add_argument("--n-folds", type=int, default=None,
                   help=f"default: {DEMO_FOLDS} for the synthetic demo data (synth.yaml beside the labels), else {DEFAULT_FOLDS}")
    s.add_argument("--seed", type=seed, default=42, help="0..2**32-1")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_folds)

    s = sub.add_parser("fuse", help="fuse readers' boxes (keep_all / nms / wbf); --count prints boxes per mode")
    s.add_argument("--labels", required=True)
    s.add_argument("--mode", choices=["keep_all", "nms", "wbf"], default=fusion.DEFAULT.mode)
    s.add_argument("--iou-thr", type=iou, default=fusion.DEFAULT.iou_thr, help="in (0, 1]")
    s.add_argument("--drop-readers", default="", help="comma-separated rad_ids to ignore, e.g. R8,R9")
    s.add_argument("--count", action="store_true")
    s.add_argument("--out")
    s.set_defaults(func=cmd_fuse)

    s = sub.add_parser("evaluate", help="competition mAP@0.4: a table per class (--json: JSON)")
    s.add_argument("--labels", required=True, help="Kaggle train.csv or PhysioNet annotations_test.csv")
    s.add_argument("--submission", required=True, help="Kaggle submission or prediction table")
    s.add_argument("--sizes", help="meta CSV: also check label boxes lie inside their images")
    s.add_argument("--folds", help="score the images of this fold file (prediction tables list no empty images)")
    s.add_argument("--fold", type=non_negative_int, help="with --folds: only this fold")
    s.add_argument("--subset", action="store_true",
                   help="score only the images the submission lists (default: every labelled image; unlisted = missed)")
    s.add_argument("--coco", action="store_true", help="add COCO AP and AP50 (pycocotools)")
    s.add_argument("--json", action="store_true",
                   help='print {"map": ..., "ap": {"0": ..., "14": ...}} (class ids, full precision) instead of the table')
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("check-submission",
                       help="exit 0 if valid, else print each problem and exit 1 (2: a file cannot be read)")
    s.add_argument("--submission", required=True)
    s.add_argument("--sample", required=True, help="Kaggle sample_submission.csv (the test ids)")
    s.add_argument("--sizes", help="test meta CSV: also check boxes lie inside the original images")
    s.set_defaults(func=cmd_check_submission)

    s = sub.add_parser("submission", help="prediction table -> checked Kaggle submission")
    s.add_argument("--predictions", required=True)
    s.add_argument("--sample", required=True)
    s.add_argument("--sizes")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_submission)

    s = sub.add_parser("baseline", help="prior-box baseline predictions (the floor)")
    s.add_argument("--labels", required=True)
    s.add_argument("--train-sizes", required=True, help="train meta CSV")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--sizes", help="meta CSV of the (test) images to predict")
    g.add_argument("--folds", help="fold file: out-of-fold predictions for every training image")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("synth", help="generate the synthetic benchmark (Kaggle 256-px PNG layout)")
    s.add_argument("--config", help="YAML with SynthConfig fields; flags override it")
    s.add_argument("--out")
    s.add_argument("--n-train", type=int)
    s.add_argument("--n-test", type=int)
    s.add_argument("--size", type=int)
    s.add_argument("--seed", type=int)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("stats", help="summary statistics of real train labels (feeds synth)")
    s.add_argument("--labels", help="Kaggle train.csv")
    s.add_argument("--sizes", help="its original sizes (train_meta.csv or a table with width, height)")
    s.add_argument("--out", default=str(synth.STATS_PATH))
    s.add_argument("--readers", action="store_true", help="print the per-reader table of --out instead")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("data", help="Kaggle download (DICOMs) or a resized-PNG set -> checked DATA folder")
    s.add_argument("--src", required=True, help="folder with train/, test/, train.csv (+ sample_submission.csv, *_meta.csv)")
    s.add_argument("--out", required=True, help="the DATA folder to write")
    s.add_argument("--size", type=int, default=1024)
    s.add_argument("--labels", help="train.csv when it is not in SRC")
    s.add_argument("--sample", help="sample_submission.csv when it is not in SRC")
    s.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    s.add_argument("--exact", action="store_true", help=EXACT_HELP)
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("prepare", help="convert a DICOM/PNG/JPEG folder to a square PNG set + meta.csv (+ failed.csv)")
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=1024)
    s.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    s.add_argument("--exact", action="store_true", help=EXACT_HELP)
    s.set_defaults(func=cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with one_line_errors():
            args.func(args)
    except KeyboardInterrupt:  # finished work is kept (atomic outputs, prepare's journal): a re-run resumes
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
