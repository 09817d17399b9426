"""The ensemble: WBF across models, tuned on out-of-fold predictions, then the classifier gate.

Reads only the shared prediction format (``runs/<NAME>/<model>/{oof,test}.csv``) and the
classifier's ``image_id, p_abnormal`` tables; writes tuned parameters and submissions.

Fusion: :func:`cxr.wbf.fuse_predictions` with per-model weights, ``iou_thr``,
``skip_box_thr`` and ``conf_type`` (ensemble-boxes' ``avg``, ``max``, ``box_and_model_avg``
and ``absent_model_aware_avg``, the score-summing variants the top teams used), chosen by
the competition metric on OOF: a grid over iou/skip/conf, then a coordinate search over
model weights. Every candidate is printed; ties keep the earlier (simpler) candidate.

Gate (``p_normal = 1 - p_abnormal`` from the classifier):

* ``soft`` (2nd place): the detectors' own No-finding rows are replaced by
  ``14 p_normal 0 0 1 1`` on every image, boxes untouched;
* ``hard``: as soft, and additionally every finding box is dropped where p_normal > ``high``,
  kept as is where p_normal < ``low``, and scaled by ``1 - p_normal`` in between;
  ``low``/``high`` tuned on OOF.

The rule with the higher OOF mAP is kept (``none`` if neither helps).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from cxr.dataset import NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.io import DataError, read_table
from cxr.metric import mean_average_precision
from cxr.predictions import read_predictions
from cxr.wbf import fuse_predictions

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


@dataclass
class FusionParams:
    models: list[str]
    weights: list[float]
    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    conf_type: str = "avg"


@dataclass
class GateParams:
    rule: str = "none"  # none | soft | hard
    low: float = 0.0
    high: float = 1.0


@dataclass
class Params:
    fusion: FusionParams
    gate: GateParams = field(default_factory=GateParams)
    oof_map: dict[str, float] = field(default_factory=dict)


def load_model_tables(run: Path, models: Sequence[str], split: str, image_ids: Sequence[str]) -> list[pd.DataFrame]:
    """Each model's ``oof.csv`` or ``test.csv``; a model with no row for some image is an error (no silent holes).

    Detectors write a No-finding row for every image they saw, so a missing image means a
    missing fold or an interrupted prediction.
    """
    tables = []
    for m in models:
        path = run / m / f"{split}.csv"
        if not path.exists():
            raise DataError(path, f"model {m!r} has no {split} predictions: run make oof MODEL={m}")
        t = read_predictions(path)
        missing = sorted(set(image_ids) - set(t["image_id"]))
        if missing:
            raise DataError(path, f"model {m!r} has no prediction for {len(missing)} {split} image(s), e.g. {missing[:3]}")
        tables.append(t[t["image_id"].isin(set(image_ids))])
    return tables


def load_probabilities(path: Path, image_ids: Sequence[str]) -> pd.Series:
    p = read_table(path, dtype={"image_id": str}).set_index("image_id")["p_abnormal"]
    missing = sorted(set(image_ids) - set(p.index))
    if missing:
        raise DataError(path, f"no p_abnormal for {len(missing)} image(s), e.g. {missing[:3]}")
    return p


def fuse(tables: list[pd.DataFrame], sizes: pd.DataFrame, p: FusionParams) -> pd.DataFrame:
    if len(tables) == 1 and p.conf_type == "avg" and p.skip_box_thr == 0:
        return tables[0]
    return fuse_predictions(tables, sizes, p.weights, p.iou_thr, p.skip_box_thr, p.conf_type)


def gate(preds: pd.DataFrame, p_abnormal: pd.Series, g: GateParams) -> pd.DataFrame:
    """Apply the gate rule ``g`` with the classifier's probabilities (see module docstring)."""
    if g.rule == "none":
        return preds
    boxes = preds[preds["class_id"] != NO_FINDING].copy()
    p_normal = 1.0 - boxes["image_id"].map(p_abnormal).to_numpy(dtype=float)
    if g.rule == "hard":
        between = (p_normal >= g.low) & (p_normal <= g.high)
        boxes.loc[between, "score"] = boxes.loc[between, "score"] * (1.0 - p_normal[between])
        boxes = boxes[p_normal <= g.high]
    ids = sorted(set(preds["image_id"]))
    normal = pd.DataFrame({"image_id": ids, "class_id": NO_FINDING, "score": 1.0 - p_abnormal.loc[ids].to_numpy()})
    normal[["x_min", "y_min", "x_max", "y_max"]] = NO_FINDING_BOX
    return pd.concat([boxes, normal[PREDICTION_COLUMNS]], ignore_index=True)


def tune(
    tables: list[pd.DataFrame],
    models: list[str],
    gt: pd.DataFrame,
    image_ids: list[str],
    sizes: pd.DataFrame,
    p_abnormal: pd.Series | None,
    iou_grid: Sequence[float] = (0.4, 0.5, 0.6),
    skip_grid: Sequence[float] = (0.0, 0.01),
    weight_grid: Sequence[float] = (1.0, 2.0, 3.0),
    gate_grid: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0),
) -> tuple[Params, pd.DataFrame]:
    """Choose fusion and gate parameters by OOF mAP@0.4; returns them and the table of every candidate."""
    rows = []

    def score(fp: FusionParams, g: GateParams | None = None) -> float:
        g = g or GateParams()
        preds = gate(fuse(tables, sizes, fp), p_abnormal, g) if g.rule != "none" else fuse(tables, sizes, fp)
        m = mean_average_precision(gt, preds, image_ids)["map"]
        rows.append({"stage": "fusion" if g.rule == "none" else "gate", **asdict(fp), **asdict(g), "map": m})
        print(f"  {rows[-1]['stage']:6s} w={fp.weights} iou={fp.iou_thr} skip={fp.skip_box_thr} conf={fp.conf_type} "
              f"gate={g.rule}({g.low},{g.high}) -> mAP {m:.4f}", flush=True)
        return m

    single = {m: mean_average_precision(gt, t, image_ids)["map"] for m, t in zip(models, tables)}
    default = FusionParams(models, [1.0] * len(models))
    best, best_map = default, score(default)
    if len(models) > 1:
        for iou, skip, conf in itertools.product(iou_grid, skip_grid, CONF_TYPES):
            fp = FusionParams(models, [1.0] * len(models), iou, skip, conf)
            m = score(fp)
            if m > best_map:
                best, best_map = fp, m
        for i in range(len(models)):  # coordinate search over model weights
            for w in weight_grid:
                weights = list(best.weights)
                weights[i] = w
                fp = FusionParams(models, weights, best.iou_thr, best.skip_box_thr, best.conf_type)
                m = score(fp)
                if m > best_map:
                    best, best_map = fp, m
    params = Params(best, GateParams(), {**single, "ensemble": best_map, "ensemble_gated": best_map})
    if p_abnormal is not None:
        gate_best, gate_map = GateParams(), best_map
        candidates = [GateParams("soft")] + [GateParams("hard", lo, hi) for lo, hi in itertools.product(gate_grid, gate_grid) if lo < hi]
        for g in candidates:
            m = score(best, g)
            if m > gate_map:
                gate_best, gate_map = g, m
        params.gate = gate_best
        params.oof_map["ensemble_gated"] = gate_map
    return params, pd.DataFrame(rows)


def apply(params: Params, tables: list[pd.DataFrame], sizes: pd.DataFrame, p_abnormal: pd.Series | None) -> pd.DataFrame:
    preds = fuse(tables, sizes, params.fusion)
    if params.gate.rule != "none":
        if p_abnormal is None:
            raise ValueError(f"gate {params.gate.rule!r} needs the classifier's probabilities")
        preds = gate(preds, p_abnormal, params.gate)
    return preds.reset_index(drop=True)


def params_from_dict(d: dict) -> Params:
    return Params(FusionParams(**d["fusion"]), GateParams(**d["gate"]), d.get("oof_map", {}))
