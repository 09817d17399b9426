"""Blend finished submissions from any source: group, fuse with WBF, gate with a 2-class file, check, score.

    python -m ensemble.blend --data DATA --subs a.csv b.csv [--weights 2 1] [--groups m m] \\
        [--gate probs.csv --gate-column target --gate-means abnormal --gate-rule soft] \\
        [--labels annotations_test.csv] --out submissions/NAME.csv
    python -m ensemble.blend --config ensemble/blend.yaml [--subs ...]      # command line wins over the YAML

Inputs are Kaggle submissions (``image_id,PredictionString`` in original pixels; an empty
string means no box) or tables in this repo's prediction format (``runs/NAME/MODEL/foldK/test.csv``).
Every submission must list each id of the sample submission once; a prediction table may
leave images out (no row = no box). Any id outside the sample submission is an error.

Fusion, in two levels (the 2nd-place team's recipe, see ``ensemble/blend.yaml``):

1. each group (the folds of one model, its TTA views, ...) is fused with ``group_fusion``
   (or the group's own settings), members weighted by their ``weight``;
2. the group results are fused with ``fusion``, weighted by the groups' ``weight``.

A submission without a group is a group of its own. A group of one table is that table,
unchanged (WBF of a single table would only merge its own overlapping boxes), and a
weight of 0 leaves an input or group out of the fusion (it is still scored). The one code
path is :func:`fuse_group`, which ``python -m models MODEL merge`` can share for its folds.

Gate: :func:`ensemble.ensemble.gate` with a probability file (``image_id`` plus one column,
P(abnormal) or P(No finding) as ``--gate-means`` says). ``soft`` replaces the No-finding rows
with ``14 P(No finding) 0 0 1 1`` on every image; ``hard`` also drops boxes where
P(No finding) > high and scales them by P(abnormal) where low <= P(No finding) <= high.

With ``--labels`` (PhysioNet ``annotations_test.csv`` or a synthetic ``test_labels.csv``),
mAP@0.4 and per-class AP of every input, every group, the fused and the gated result are
printed and written to ``REPORT_DIR/blend.csv``. A report only: nothing is tuned on them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import yaml

from cxr.args import PLAIN_NAME, Parser, iou, is_plain_name, probability, skip_threshold
from cxr.args import weight as fusion_weight
from cxr.config import from_dict, save
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS, SUBMISSION_COLUMNS
from cxr.io import DataError, csv_row, one_line_errors, read_table, show, show_values, write_table
from cxr.labels import read_labels, read_sizes
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import NORMALIZED, normalized_boxes, validate
from cxr.submission import submission_boxes, write_submission
from cxr.wbf import CONF_TYPES, WBF, fuse_group
from ensemble.ensemble import GateParams, gate


# ----------------------------------------------------------------------------- settings


@dataclass
class Input:
    path: str
    weight: float = 1.0  # inside its group (or among groups, for a submission without one)
    group: str = ""  # "" = a group of its own


@dataclass
class GroupConfig:
    name: str
    weight: float = 1.0  # of the group's fused result in the final fusion
    fusion: WBF | None = None  # None = BlendConfig.group_fusion


@dataclass
class GateConfig:
    path: str = ""  # "" = no gate
    column: str = ""  # "" = the file's one column besides image_id
    means: Literal["abnormal", "normal"] = "abnormal"  # the column is P(abnormal) or P(No finding)
    rule: Literal["soft", "hard"] = "soft"
    low: float = 0.0  # hard rule: P(No finding) below low keeps boxes as they are
    high: float = 1.0  # hard rule: P(No finding) above high drops every box


@dataclass
class BlendConfig:
    submissions: list[Input] = field(default_factory=list)
    groups: list[GroupConfig] = field(default_factory=list)
    group_fusion: WBF = field(default_factory=WBF)
    fusion: WBF = field(default_factory=WBF)
    gate: GateConfig = field(default_factory=GateConfig)
    sample: str = ""  # Kaggle sample_submission.csv: the test ids and their order
    sizes: str = ""  # original sizes (test_meta.csv, or Kaggle's test.csv with width/height)
    labels: str = ""  # optional test labels, for the report only


def check_config(cfg: BlendConfig, where: str) -> None:
    """Value checks the types cannot express; a DataError naming ``where`` and the field."""
    problems = []
    if not cfg.submissions:
        problems.append("no submissions to blend (--subs or submissions:)")
    if not cfg.sample or not cfg.sizes:
        problems.append("sample and sizes are required (--data DATA, --sample/--sizes, or sample:/sizes:)")
    for name, w in [("fusion", cfg.fusion), ("group_fusion", cfg.group_fusion)] + [
        (f"groups[{g.name}].fusion", g.fusion) for g in cfg.groups if g.fusion is not None
    ]:
        if not 0 < w.iou_thr <= 1:
            problems.append(f"{name}.iou_thr={w.iou_thr} not in (0, 1]")
        if not 0 <= w.skip_box_thr < 1:
            problems.append(f"{name}.skip_box_thr={w.skip_box_thr} not in [0, 1)")
    for i in cfg.submissions:
        if not (i.weight >= 0 and np.isfinite(i.weight)):
            problems.append(f"weight {i.weight} of {i.path} is not a number >= 0")
    names = [g.name for g in cfg.groups]
    members = {i.group for i in cfg.submissions}
    problems += [f"group {n!r} listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"group {n!r} has no submission" for n in names if n not in members]
    problems += [f"weight {g.weight} of group {g.name!r} is not a number >= 0" for g in cfg.groups if not g.weight >= 0]
    gc = cfg.gate
    if gc.path and not (0 <= gc.low <= gc.high <= 1):
        problems.append(f"gate thresholds need 0 <= low <= high <= 1, got low={gc.low} high={gc.high}")
    if problems:
        raise DataError(where, "; ".join(problems))


# ----------------------------------------------------------------------------- inputs


def read_sample(path: str | Path) -> list[str]:
    """The test ids, in the sample submission's order (the output keeps it)."""
    df = read_table(path, dtype={"image_id": str}, keep_default_na=False)
    if "image_id" not in df.columns:
        raise DataError(path, f"not a sample submission: no image_id column; found {list(df.columns)}")
    _no_duplicates(df["image_id"], path)
    return df["image_id"].tolist()


def read_input(path: str | Path, test_ids: Sequence[str], sizes: pd.DataFrame) -> pd.DataFrame:
    """A Kaggle submission or a prediction table -> the prediction format, checked against the test ids.

    Submission: columns exactly ``image_id,PredictionString``; every test id once; each group
    ``class score x_min y_min x_max y_max`` in original pixels (score in [0, 1], box inside
    the image, No finding as ``14 p 0 0 1 1``); an empty string is an image with no box.
    Prediction table: :func:`cxr.predictions.validate`; images may be absent (no box).
    Errors name the file, the CSV line and the value.
    """
    header = read_table(path, nrows=0)
    columns = list(header.columns)
    if set(PREDICTION_COLUMNS) <= set(columns):
        df = read_table(path, dtype={"image_id": str})
        _known_ids(df["image_id"].astype(str), test_ids, path, rows=np.arange(len(df)))
        return validate(df, path, sizes)
    if columns != SUBMISSION_COLUMNS:
        raise DataError(path, f"not a submission: columns must be {SUBMISSION_COLUMNS} (or the prediction format "
                              f"{PREDICTION_COLUMNS}), got {columns}")
    df = read_table(path, dtype={"image_id": str, "PredictionString": str}, keep_default_na=False)
    _known_ids(df["image_id"], test_ids, path, rows=np.arange(len(df)))
    _no_duplicates(df["image_id"], path)
    missing = sorted(set(test_ids) - set(df["image_id"]))
    if missing:
        raise DataError(path, f"{len(missing)} test image(s) missing, e.g. {missing[:3]}")
    preds, lines = submission_boxes(df, path)
    _check_values(preds, lines, sizes, path)
    return validate(preds, path, sizes)  # canonical dtypes; every check already passed above


def _check_values(preds: pd.DataFrame, lines: np.ndarray, sizes: pd.DataFrame, path: str | Path) -> None:
    """The prediction-format checks, reported at the submission's CSV line (one line holds many boxes)."""
    known = sizes.set_index("image_id")
    cls = preds["class_id"].to_numpy(dtype=int)
    score = preds["score"].to_numpy(dtype=float)
    b = preds[BOX_COLUMNS].to_numpy(dtype=float).reshape(-1, 4)
    w = preds["image_id"].map(known["width"]).to_numpy(dtype=float)
    h = preds["image_id"].map(known["height"]).to_numpy(dtype=float)
    finding = cls != NO_FINDING
    checks = [
        (~((score >= 0) & (score <= 1)), "score not in [0, 1]"),
        (~np.isfinite(b).all(axis=1), "box is not four finite numbers"),
        (finding & ~((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])), "box needs x_min < x_max and y_min < y_max"),
        (finding & ((b[:, 0] < 0) | (b[:, 1] < 0)), "box has a negative coordinate"),
        (~finding & ~(b == np.array(NO_FINDING_BOX)).all(axis=1), "No finding must be '14 p 0 0 1 1'"),
        (finding & ((b[:, 2] > w + 1) | (b[:, 3] > h + 1)), "box lies outside the original image"),
    ]
    for bad, message in checks:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            r = preds.iloc[k]
            where = f"{r.image_id} ({w[k]:.0f}x{h[k]:.0f})" if "outside" in message else r.image_id
            raise DataError(path, f"{message}: {where}: {show_values([cls[k], score[k], *b[k]])}", int(lines[k]))
    n = normalized_boxes(cls, b)
    if n:
        raise DataError(path, f"every finding box ({n}) lies in [0, 1]: {NORMALIZED}")


def read_probabilities(g: GateConfig, test_ids: Sequence[str]) -> pd.Series:
    """The gate file -> P(abnormal) per test id; every test id once, values in [0, 1]."""
    df = read_table(g.path, dtype={"image_id": str}, keep_default_na=False)
    if "image_id" not in df.columns:
        raise DataError(g.path, f"no image_id column; found {list(df.columns)}")
    others = [c for c in df.columns if c != "image_id"]
    column = g.column or (others[0] if len(others) == 1 else "")
    if not column or column not in df.columns:
        raise DataError(g.path, f"say which column holds the probability (--gate-column): one of {others}")
    _known_ids(df["image_id"], test_ids, g.path, rows=np.arange(len(df)))
    _no_duplicates(df["image_id"], g.path)
    missing = sorted(set(test_ids) - set(df["image_id"]))
    if missing:
        raise DataError(g.path, f"no probability for {len(missing)} test image(s), e.g. {missing[:3]}")
    p = pd.to_numeric(df[column].replace("", np.nan), errors="coerce").to_numpy(dtype=float)
    bad = ~((p >= 0) & (p <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value, image_id = show(df[column].iloc[i]), df["image_id"].iloc[i]
        raise DataError(g.path, f"{column}={value} of {image_id} is not a probability in [0, 1]", csv_row(i))
    p_abnormal = p if g.means == "abnormal" else 1.0 - p
    return pd.Series(p_abnormal, index=df["image_id"].to_numpy(), name="p_abnormal")


def _known_ids(ids: pd.Series, test_ids: Sequence[str], path: str | Path, rows: np.ndarray) -> None:
    unknown = ~ids.isin(set(test_ids)).to_numpy()
    if unknown.any():
        k = int(np.flatnonzero(unknown)[0])
        raise DataError(path, f"image_id {show(ids.iloc[k])} is not in the sample submission", csv_row(int(rows[k])))


def _no_duplicates(ids: pd.Series, path: str | Path) -> None:
    dup = ids.duplicated().to_numpy()
    if dup.any():
        k = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((ids == ids.iloc[k]).to_numpy())[0])
        raise DataError(path, f"image_id {show(ids.iloc[k])} appears again (first on row {csv_row(first)})", csv_row(k))


# ----------------------------------------------------------------------------- fusion


@dataclass
class Group:
    """Tables to fuse first (folds, TTA views), their weights inside the group, and the group's settings."""

    name: str
    tables: list[pd.DataFrame]
    weights: list[float]
    wbf: WBF
    weight: float = 1.0


def fuse_groups(groups: Sequence[Group], sizes: pd.DataFrame, fusion: WBF) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Fuse each group with its own settings, then the groups with ``fusion``; returns (blend, per-group results)."""
    fused = [fuse_group(g.tables, sizes, g.wbf, g.weights) if any(w > 0 for w in g.weights) else None for g in groups]
    live = [(f, g.weight) for f, g in zip(fused, groups) if f is not None]
    if not live:
        raise ValueError("every submission has weight 0: nothing to blend")
    return fuse_group([f for f, _ in live], sizes, fusion, [w for _, w in live]), fused


def build_groups(cfg: BlendConfig, tables: dict[str, pd.DataFrame]) -> list[Group]:
    """Inputs -> groups in order of first appearance; an input without a group is a group of its own."""
    settings = {g.name: g for g in cfg.groups}
    groups: dict[str, Group] = {}
    for i, item in enumerate(cfg.submissions):
        key = item.group or f"#{i} {item.path}"
        if key not in groups:
            s = settings.get(item.group)
            wbf = s.fusion if s is not None and s.fusion is not None else cfg.group_fusion
            name = item.group or item.path
            groups[key] = Group(name, [], [], wbf, s.weight if s is not None else (1.0 if item.group else item.weight))
        groups[key].tables.append(tables[item.path])
        groups[key].weights.append(item.weight if item.group else 1.0)
    return list(groups.values())


def apply_gate(preds: pd.DataFrame, p_abnormal: pd.Series, g: GateConfig, test_ids: Sequence[str]) -> pd.DataFrame:
    """:func:`ensemble.ensemble.gate` on every test image, including images without any row."""
    # gate() writes the new No-finding row only for images present in ``preds``; a placeholder
    # No-finding row (replaced by the gate) brings in the images every input left empty.
    empty = sorted(set(test_ids) - set(preds["image_id"]))
    if empty:
        holder = pd.DataFrame({"image_id": empty, "class_id": NO_FINDING, "score": 0.0})
        holder[BOX_COLUMNS] = NO_FINDING_BOX
        preds = pd.concat([preds, holder[PREDICTION_COLUMNS]], ignore_index=True)
    return gate(preds, p_abnormal, GateParams(g.rule, g.low, g.high)).reset_index(drop=True)


# ----------------------------------------------------------------------------- report


def score_table(
    results: list[tuple[str, str, float, pd.DataFrame]], gt: pd.DataFrame, ids: Sequence[str]
) -> pd.DataFrame:
    """One row per (name, kind, weight, predictions): mAP@0.4 and the AP of each class."""
    rows = []
    for name, kind, weight, preds in results:
        m = mean_average_precision(gt, preds, ids)
        rows.append({"name": name, "kind": kind, "weight": weight, "map": m["map"],
                     **{CLASS_NAMES[int(c)]: ap for c, ap in m["ap"].items()}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- command line


def _config(a: argparse.Namespace) -> tuple[BlendConfig, str]:
    """YAML (if any), then the command line on top; returns the config and where it came from."""
    data: dict[str, Any] = {}
    where = "command line"
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise DataError(path, "config file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise DataError(path, "top level must be a mapping")
        where = str(path)
    if a.subs:
        data["submissions"] = [{"path": s} for s in a.subs]
    subs = data.get("submissions") or []
    for flag, key, values in (("--weights", "weight", a.weights), ("--groups", "group", a.groups)):
        if values is not None:
            if len(values) != len(subs):
                raise DataError(flag, f"{len(values)} value(s) for {len(subs)} submission(s)")
            for s, v in zip(subs, values):
                if isinstance(s, dict):
                    s[key] = v if key == "weight" else ("" if v == "-" else v)
    for name, w in a.group_weights or []:
        groups = data.setdefault("groups", [])
        entry = next((g for g in groups if isinstance(g, dict) and g.get("name") == name), None)
        if entry is None:
            groups.append(entry := {"name": name})
        entry["weight"] = w
    for section, prefix in (("fusion", ""), ("group_fusion", "group_")):
        for key in ("iou_thr", "skip_box_thr", "conf_type"):
            value = getattr(a, prefix + key)
            if value is not None:
                data.setdefault(section, {})[key] = value
    for key in ("path", "column", "means", "rule", "low", "high"):
        value = getattr(a, "gate" if key == "path" else f"gate_{key}")
        if value is not None:
            data.setdefault("gate", {})[key] = value
    for key in ("sample", "sizes", "labels"):
        if getattr(a, key) is not None:
            data[key] = getattr(a, key)
    if a.data:  # fallback only: a YAML or explicit --sample/--sizes win
        data.setdefault("sample", str(Path(a.data) / "sample_submission.csv"))
        data.setdefault("sizes", str(Path(a.data) / "test_meta.csv"))
    cfg = from_dict(BlendConfig, data, where)
    check_config(cfg, where)
    return cfg, where


def _group_weight(text: str) -> tuple[str, float]:
    """``--group-weights NAME=W``: a group name and its weight (:func:`cxr.args.weight`)."""
    name, sep, w = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=WEIGHT")
    return name, fusion_weight(w)


def _submission_path(text: str) -> str:
    """``--out``: a ``.csv`` whose name is a plain name, since it also names ``reports/<name>/``."""
    path = Path(text)
    if path.suffix != ".csv" or not is_plain_name(path.stem):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path to NAME.csv ({PLAIN_NAME})")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ensemble blend", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="blend YAML (ensemble/blend.yaml documents every key); flags below override it")
    p.add_argument("--subs", nargs="+", help="submissions (Kaggle CSV) or prediction tables to blend")
    p.add_argument("--weights", nargs="+", type=fusion_weight, help="one weight (>= 0) per submission (inside its group)")
    p.add_argument("--groups", nargs="+", help="one group name per submission ('-' = its own group)")
    p.add_argument("--group-weights", nargs="+", type=_group_weight, metavar="NAME=W",
                   help="group weight in the final fusion (default 1)")
    p.add_argument("--iou-thr", type=iou, help="final fusion IoU in (0, 1] (default 0.4)")
    p.add_argument("--skip-box-thr", type=skip_threshold, help="final fusion: drop boxes scored below this, in [0, 1) (default 0)")
    p.add_argument("--conf-type", choices=CONF_TYPES, help="final fusion score (default avg)")
    p.add_argument("--group-iou-thr", type=iou, help="fusion inside groups (default 0.4)")
    p.add_argument("--group-skip-box-thr", type=skip_threshold)
    p.add_argument("--group-conf-type", choices=CONF_TYPES)
    p.add_argument("--gate", help="probability file: image_id plus one probability column")
    p.add_argument("--gate-column", help="the probability column (needed when the file has several)")
    p.add_argument("--gate-means", choices=["abnormal", "normal"],
                   help="abnormal: the column is P(abnormal); normal: P(No finding)")
    p.add_argument("--gate-rule", choices=["soft", "hard"], help="soft (default) | hard")
    p.add_argument("--gate-low", type=probability, help="hard: P(No finding) below this keeps boxes as they are")
    p.add_argument("--gate-high", type=probability, help="hard: P(No finding) above this drops every box")
    p.add_argument("--data", help="data folder: DATA/sample_submission.csv and DATA/test_meta.csv, unless given")
    p.add_argument("--sample", help="Kaggle sample_submission.csv (the test ids)")
    p.add_argument("--sizes", help="original sizes: test_meta.csv or Kaggle's test.csv")
    p.add_argument("--labels", help="test labels (PhysioNet annotations_test.csv): report only, never tuned on")
    p.add_argument("--out", type=_submission_path, default="submissions/blend.csv",
                   help="the checked submission, NAME.csv (NAME: a plain name)")
    p.add_argument("--report-dir", help="resolved config and score table (default reports/<out name>)")
    return p


def run(cfg: BlendConfig, out: Path, report_dir: Path) -> pd.DataFrame | None:
    """Blend as ``cfg`` says, write the checked submission to ``out``; returns the score table (with labels)."""
    test_ids = read_sample(cfg.sample)
    sizes = read_sizes(cfg.sizes)
    missing = sorted(set(test_ids) - set(sizes["image_id"]))
    if missing:
        raise DataError(cfg.sizes, f"no size for {len(missing)} test image(s), e.g. {missing[:3]}")
    sizes = sizes[sizes["image_id"].isin(set(test_ids))].reset_index(drop=True)
    tables: dict[str, pd.DataFrame] = {}
    for item in cfg.submissions:
        if item.path not in tables:  # the same file twice is read once
            tables[item.path] = read_input(item.path, test_ids, sizes)
    p_abnormal = read_probabilities(cfg.gate, test_ids) if cfg.gate.path else None
    gt = None
    if cfg.labels:
        gt = ground_truth(read_labels(cfg.labels, sizes))
        unlabeled = sorted(set(test_ids) - set(gt["image_id"]))
        if unlabeled:
            raise DataError(cfg.labels, f"{len(unlabeled)} test image(s) have no labels, e.g. {unlabeled[:3]}")

    groups = build_groups(cfg, tables)
    try:
        fused, per_group = fuse_groups(groups, sizes, cfg.fusion)
    except ValueError as e:  # every weight 0
        raise DataError("weights", str(e)) from None
    final = apply_gate(fused, p_abnormal, cfg.gate, test_ids) if p_abnormal is not None else fused
    print(f"blended {len(cfg.submissions)} input(s) in {len(groups)} group(s)"
          f"{f', gate {cfg.gate.rule}' if p_abnormal is not None else ''}: {len(final)} rows")

    write_submission(final, test_ids, out, cfg.sample, sizes)  # only a checked submission ever lands at ``out``
    print(f"wrote {out}: {len(test_ids)} images, checked")
    save(cfg, report_dir / "blend.yaml")

    if gt is None:
        return None
    results = [(item.path, "input", item.weight, tables[item.path]) for item in cfg.submissions]
    results += [(f"group {g.name}", "group", g.weight, f)
                for g, f in zip(groups, per_group) if len(g.tables) > 1 and f is not None]
    results.append(("fused", "fused", float("nan"), fused))
    if p_abnormal is not None:
        results.append((f"gated ({cfg.gate.rule})", "gated", float("nan"), final))
    table = score_table(results, gt, test_ids)
    write_table(table, report_dir / "blend.csv")
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 80):
        print(table[["name", "kind", "weight", "map"]].to_string(index=False, float_format="{:.4f}".format))
        per_class = table.drop(columns=["kind", "weight", "map"]).set_index("name").T
        per_class.columns = [Path(n).name for n in per_class.columns]  # short headers; full names above
        print("AP per class:\n" + per_class.to_string(float_format="{:.3f}".format))
    print(f"wrote {report_dir / 'blend.csv'} (report only: nothing was tuned on {cfg.labels})")
    return table


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with one_line_errors():
        cfg, _ = _config(a)
        out = Path(a.out)
        run(cfg, out, Path(a.report_dir) if a.report_dir else Path("reports") / out.stem)


if __name__ == "__main__":
    main()
