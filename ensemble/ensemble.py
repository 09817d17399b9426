"""The ensemble: WBF across models, tuned on out-of-fold predictions, then the classifier gate.

Reads the shared prediction format (``runs/<NAME>/<model>/{oof,test}.csv``, or any folder with
``oof.csv`` and ``test.csv`` in the prediction format or the Kaggle submission format: a model
trained elsewhere) and the classifier's ``image_id, p_abnormal`` tables; writes tuned parameters
(one folder per model set, :func:`params_path`) and submissions.

Fusion: :func:`cxr.wbf.fuse_predictions` with per-model weights, ``iou_thr``,
``skip_box_thr`` and ``conf_type`` (ensemble-boxes' ``avg``, ``max``, ``box_and_model_avg``
and ``absent_model_aware_avg``, the score-summing variants the top teams used), chosen by
the competition metric on OOF: a grid over iou/skip/conf, then a coordinate search over
model weights (0, 1, 2, 3). Weight 0 leaves a member out of the fusion entirely (:func:`fuse`:
as if its table were not given); a candidate with every weight 0 is skipped. The parameters
keep every member with its weight, 0 included, so test time reads the same tables.
Every candidate is printed; ties keep the earlier (simpler) candidate: a member is left out
only when that scores strictly higher.

Weak members: one whose OOF predictions hold no finding box, or whose pooled OOF mAP is below
the prior-box floor (:mod:`cxr.baseline`), is named before the search (:func:`weak_members`;
``params.warnings``, shown by the report).

Gate (``p_normal = 1 - p_abnormal`` from the classifier):

* ``soft`` (2nd place): the detectors' own No-finding rows are replaced by
  ``14 p_normal 0 0 1 1`` on every image, boxes untouched;
* ``hard``: as soft, and additionally every finding box is dropped where p_normal > ``high``,
  kept as is where p_normal < ``low``, and scaled by ``1 - p_normal`` in between;
  ``low``/``high`` tuned on OOF.

The rule with the higher OOF mAP is kept (``none`` if neither helps).

Cost: each fusion candidate is fused once (the four conf types share one clustering) and its rows
matched once (:mod:`ensemble.scoring`); gate candidates and fold subsets only re-rank those rows.
Candidates run in ``jobs`` processes, with progress and ETA.

Honest figures: the tuned mAP is measured on the OOF predictions that chose the parameters, so
it is optimistic. With folds, the same search also runs once per fold k on the other folds, and
the parameters it picks are scored on fold k: the nested OOF mAP (mean over folds), beside the
fold mean of each single model, which needs no tuning.
"""
from __future__ import annotations

import itertools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxr.dataset import NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.io import DataError, read_table
from cxr.predictions import read_predictions, read_probabilities, validate
from cxr.submission import read_submission
from cxr.wbf import CONF_TYPES, Prepared, fuse_arrays_each, fuse_predictions, prepare
from ensemble.scoring import Scored, Truth, gated, score_arrays, score_rows


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
    oof_map: dict[str, float] = field(default_factory=dict)  # in-sample: scored on the OOF that tuned it
    # mean over folds of fold k's mAP, the ensemble tuned on the other folds (single models: untuned)
    nested_map: dict[str, float] = field(default_factory=dict)
    nested_folds: dict[str, list[float]] = field(default_factory=dict)  # the same, fold by fold
    warnings: list[str] = field(default_factory=list)  # weak members (:func:`weak_members`), for the report
    classifier: str | None = None  # the gate's classifier member (classifier, classifier@v, demo:classifier)


def set_name(models: Sequence[str], classifier: str | None) -> str:
    """Folder name of one model set's tuned parameters: sorted model names, ``+classifier`` when gated. A
    borrowed member's ``run:`` is written ``run~`` (a ``:`` would make the report's links read as a URL scheme)."""
    return "-".join(sorted(m.replace(":", "~") for m in models)) + (f"+{classifier.replace(':', '~')}" if classifier else "")


def params_path(run: Path, models: Sequence[str], classifier: str | None) -> Path:
    """``RUN/ensemble/<set>/params.json``: changing the model set tunes anew, other sets are kept."""
    return Path(run) / "ensemble" / set_name(models, classifier) / "params.json"


def load_model_tables(
    run: Path,
    models: Sequence[str],
    split: str,
    image_ids: Sequence[str],
    sources: dict[str, Path] | None = None,
    sizes: pd.DataFrame | None = None,
) -> list[pd.DataFrame]:
    """Each model's ``oof.csv`` or ``test.csv``; a model with no row for some image is an error (no silent holes).

    A model is read from ``run/<model>/`` unless ``sources`` names its folder (a model trained
    elsewhere: the prediction format, or a Kaggle submission in original pixels such as a public
    notebook's OOF and test files, where an empty PredictionString is an image with no box).
    Detectors write a No-finding row for every image they saw, so a missing image means a missing
    fold or an interrupted prediction.
    An outside model's table must also hold no other image (a wrong split or another fold file),
    and its boxes are checked against ``sizes`` (catches resized pixels).
    """
    sources = sources or {}
    wanted = set(image_ids)
    tables = []
    for m in models:
        outside = m in sources
        path = (Path(sources[m]) if outside else Path(run) / m) / f"{split}.csv"
        if not path.exists():
            hint = "give a folder with oof.csv and test.csv" if outside else f"run make oof MODEL={m}"
            raise DataError(path, f"model {m!r} has no {split} predictions: {hint}")
        table = None
        if "PredictionString" in read_table(path, nrows=0).columns:  # a line per image (an empty string: no box)
            covered = set(read_table(path, dtype={"image_id": str}, keep_default_na=False)["image_id"])
        else:  # a row per box: an image without a row has no prediction at all
            table = read_predictions(path)
            covered = set(table["image_id"])
        missing = sorted(wanted - covered)
        if missing:
            raise DataError(path, f"model {m!r} has no prediction for {len(missing)} {split} image(s), e.g. {missing[:3]}")
        if outside:
            extra = sorted(covered - wanted)
            if extra:
                where = "in the fold file" if split == "oof" else "among the test images"
                raise DataError(path, f"model {m!r} predicts {len(extra)} {split} image(s) not {where}, e.g. {extra[:3]}")
        check = sizes if outside else None  # boxes in resized pixels: checked only where they come from elsewhere
        if table is None:
            table = read_submission(path, check)
        elif check is not None:
            table = validate(table, path, check)
        tables.append(table[table["image_id"].isin(wanted)].reset_index(drop=True))
    return tables


def load_probabilities(path: Path, image_ids: Sequence[str]) -> pd.Series:
    """The classifier's ``p_abnormal`` per image (:func:`cxr.predictions.read_probabilities`: checked, every id present)."""
    return read_probabilities(path, image_ids)


def kept_members(weights: Sequence[float]) -> list[int]:
    """Indices of the members that take part in the fusion (weight > 0); ValueError when none does."""
    kept = [i for i, w in enumerate(weights) if w > 0]
    if not kept:
        raise ValueError(f"every member has weight 0 ({list(weights)}): nothing to fuse")
    return kept


def fuse(tables: list[pd.DataFrame], sizes: pd.DataFrame, p: FusionParams) -> pd.DataFrame:
    """WBF of ``tables`` (one per ``p.models``) with ``p``; a member of weight 0 is left out, as if not given.

    Leaving it out, rather than fusing its boxes at weight 0, matters: a zero-weight box still joins
    clusters and counts in the ``avg`` rescaling (and can start a cluster of score 0).
    One member left with ``avg`` and no skip is its own table: a table is not fused with itself.
    """
    if len(p.weights) != len(tables):
        raise ValueError(f"{len(p.weights)} weights for {len(tables)} tables")
    kept = kept_members(p.weights)
    if len(kept) == 1 and p.conf_type == "avg" and p.skip_box_thr == 0:
        return tables[kept[0]]
    return fuse_predictions([tables[i] for i in kept], sizes, [p.weights[i] for i in kept], p.iou_thr,
                            p.skip_box_thr, p.conf_type)


def prepared_members(prep: Prepared, kept: Sequence[int]) -> Prepared:
    """``prep`` (from :func:`cxr.wbf.prepare`) restricted to the tables ``kept`` (ascending): what ``prepare``
    of those tables alone gives, except that the image list stays whole (indices keep their meaning).

    Rows keep their order and the table indices are renumbered in order, so WBF walks the boxes
    exactly as it would for the kept tables alone (same ties, same float sums).
    """
    index = np.full(prep.n_tables, -1, dtype=np.int64)
    index[list(kept)] = np.arange(len(kept))
    rows = index[prep.model] >= 0
    nf = index[prep.nf_model] >= 0
    return Prepared(prep.image_ids, prep.scale, len(kept), prep.group[rows], index[prep.model[rows]], prep.score[rows],
                    prep.boxes[rows], prep.nf_image[nf], index[prep.nf_model[nf]], prep.nf_score[nf])


def gate(preds: pd.DataFrame, p_abnormal: pd.Series, g: GateParams) -> pd.DataFrame:
    """Apply the gate rule ``g`` with the classifier's probabilities (see module docstring).

    ``p_abnormal`` is indexed by image_id and covers every image of ``preds``. Returns the finding
    rows (gated) in their order, then one No-finding row per image of ``preds``, sorted by id.
    """
    if g.rule == "none":
        return preds
    probability = p_abnormal.to_numpy(dtype=float)
    boxes = preds[preds["class_id"] != NO_FINDING].copy()
    ids = np.sort(pd.unique(preds["image_id"].astype(str)).astype(object))
    where = p_abnormal.index.get_indexer(ids)
    if (where < 0).any():
        raise ValueError(f"no p_abnormal for {int((where < 0).sum())} image(s), e.g. {list(ids[where < 0][:3])}")
    if g.rule == "hard":
        p_normal = 1.0 - probability[p_abnormal.index.get_indexer(boxes["image_id"])]
        between = (p_normal >= g.low) & (p_normal <= g.high)
        score = boxes["score"].to_numpy(dtype=float)
        boxes["score"] = np.where(between, score * (1.0 - p_normal), score)
        boxes = boxes[p_normal <= g.high]
    normal = pd.DataFrame({"image_id": ids, "class_id": NO_FINDING, "score": 1.0 - probability[where]})
    normal[["x_min", "y_min", "x_max", "y_max"]] = NO_FINDING_BOX
    return pd.concat([boxes, normal[PREDICTION_COLUMNS]], ignore_index=True)


_STATE: dict = {}  # what the worker processes fuse and score (set by _init, inherited by fork)


def _init(state: dict) -> None:
    global _STATE
    _STATE = state


def _fused_scored(fps: list[FusionParams]) -> list[Scored]:
    """Fusion candidates that differ only in ``conf_type``, clustered once (:func:`cxr.wbf.fuse_arrays_each`)
    from the prepared arrays, and matched: what :func:`fuse` + :func:`ensemble.scoring.score_rows` give
    (members of weight 0 left out, one member left passed through for ``avg``)."""
    st = _STATE
    fp = fps[0]
    kept = tuple(kept_members(fp.weights))
    through = [len(kept) == 1 and f.conf_type == "avg" and f.skip_box_thr == 0 for f in fps]
    out: list[Scored | None] = [None] * len(fps)
    if any(through):  # fuse() passes one table through; cached per process: several weights lead here
        single = st.setdefault("single", {})
        if kept[0] not in single:
            single[kept[0]] = score_rows(st["truth"], st["tables"][kept[0]])
        out = [single[kept[0]] if t else None for t in through]
    rest = [f for f, t in zip(fps, through) if not t]
    if rest:
        # not cached: a masked copy costs little beside WBF, and on the full data each copy holds every box
        whole = len(kept) == st["prepared"].n_tables
        prep = st["prepared"] if whole else prepared_members(st["prepared"], kept)
        fused = fuse_arrays_each(prep, [fp.weights[i] for i in kept], fp.iou_thr, fp.skip_box_thr,
                                 [f.conf_type for f in rest])
        scored = iter(score_arrays(st["truth"], st["truth_index"][image], cls, score, boxes)
                      for image, cls, score, boxes in fused)
        out = [s if s is not None else next(scored) for s in out]
    return out


def _fusion_maps(fps: list[FusionParams]) -> list[np.ndarray]:
    """mAP of fusion candidates (same weights, iou and skip) on every image subset of the search."""
    return [np.array([s.map(m) for m in _STATE["masks"]]) for s in _fused_scored(fps)]


def _gate_maps(fp: FusionParams, gates: list[GateParams]) -> list[np.ndarray]:
    """mAP of every gate candidate on one fusion candidate (fused and matched once): [(gates, subsets)]."""
    s = _fused_scored([fp])[0]
    p = _STATE["p_abnormal"]
    return [np.array([[gs.map(m) for m in _STATE["masks"]] for gs in (gated(s, p, g.rule, g.low, g.high) for g in gates)])]


def _key(fp: FusionParams) -> tuple:
    return tuple(fp.weights), fp.iou_thr, fp.skip_box_thr, fp.conf_type


def _describe(fp: FusionParams) -> str:
    return f"w={fp.weights} iou={fp.iou_thr} skip={fp.skip_box_thr} conf={fp.conf_type}"


class _Runner:
    """Runs candidates in ``jobs`` processes (in this one when 1), caches results, prints progress with ETA."""

    def __init__(self, state: dict, jobs: int, planned: int, log: Callable[[str], None]):
        self.jobs, self.planned, self.log, self.done, self.start = jobs, planned, log, 0, time.perf_counter()
        self.cache: dict[tuple, np.ndarray] = {}  # by fusion parameters: a candidate twice is fused once
        if jobs > 1:
            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_init, initargs=(state,))
        else:
            self.pool = None
            _init(state)

    def _progress(self, stage: str, text: str, value: float) -> None:
        self.done += 1
        self.planned = max(self.planned, self.done)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.planned - self.done)
        self.log(f"  [{self.done}/{self.planned}] {stage:6s} {text} -> mAP {value:.4f}  ({elapsed:.0f} s, ETA {eta:.0f} s)")

    def run(self, jobs: list[tuple[list[tuple], str, Callable, tuple, list[str]]], later: int = 0) -> None:
        """``jobs``: (cache keys, stage, function, args, texts); the function returns one result per key.
        Runs the jobs with an uncached key, fills the cache. ``later``: results expected after these (ETA)."""
        jobs = [j for j in jobs if any(k not in self.cache for k in j[0])]
        self.planned = self.done + sum(len(j[0]) for j in jobs) + later

        def store(job, results) -> None:
            keys, stage, _, _, texts = job
            for key, result, text in zip(keys, results, texts):
                self.cache[key] = result
                self._progress(stage, text, float(np.ravel(result)[0]))

        if self.pool is None:
            for job in jobs:
                store(job, job[2](*job[3]))
        else:
            futures = {self.pool.submit(job[2], *job[3]): job for job in jobs}
            for f in as_completed(futures):
                store(futures[f], f.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def tune(
    tables: list[pd.DataFrame],
    models: list[str],
    gt: pd.DataFrame,
    image_ids: list[str],
    sizes: pd.DataFrame,
    p_abnormal: pd.Series | None,
    iou_grid: Sequence[float] = (0.4, 0.5, 0.6),
    skip_grid: Sequence[float] = (0.0, 0.01),
    weight_grid: Sequence[float] = (0.0, 1.0, 2.0, 3.0),
    gate_grid: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0),
    folds: pd.DataFrame | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[Params, pd.DataFrame]:
    """Choose fusion and gate parameters by OOF mAP@0.4; returns them and the table of every candidate.

    ``folds`` (``image_id, fold``) adds the nested OOF figures: the same search per fold on the
    other folds, scored on the fold. ``jobs`` processes fuse candidates side by side.
    """
    truth = Truth(gt, image_ids)
    everything = truth.mask(image_ids)
    held = []
    if folds is not None:
        f = folds[folds["image_id"].isin(set(image_ids))]
        held = [truth.mask(f.loc[f["fold"] == k, "image_id"]) for k in sorted(f["fold"].unique())]
        if len(held) < 2:
            held = []
    # subsets: 0 = every image; 1..K = all but fold k (where path k tunes); K+1..2K = fold k (where it is scored)
    masks = [everything] + [everything & ~h for h in held] + held
    n_paths = 1 + len(held)
    prepared = prepare(tables, sizes)
    outside = prepared.image_ids[truth.ids.get_indexer(prepared.image_ids) < 0]
    if len(outside):
        raise ValueError(f"{len(outside)} predicted image(s) are not among the scored images, e.g. {list(outside[:3])}")
    state = {"tables": tables, "prepared": prepared, "truth": truth, "truth_index": truth.ids.get_indexer(prepared.image_ids),
             "masks": masks,
             "p_abnormal": None if p_abnormal is None else p_abnormal.reindex(truth.ids).to_numpy(dtype=float)}
    several = len(models) > 1
    grid = list(itertools.product(iou_grid, skip_grid, CONF_TYPES)) if several else []
    gates = [GateParams("soft")] + [GateParams("hard", lo, hi) for lo, hi in itertools.product(gate_grid, gate_grid) if lo < hi]
    weight_runs = len(models) * (len(weight_grid) - 1) if several else 0  # one weight per model is the current one
    gate_runs = max(1, jobs) if p_abnormal is not None else 0
    runner = _Runner(state, max(1, jobs), 1 + len(grid) + weight_runs + gate_runs, log)
    rows: list[dict] = []

    def fusion_calls(stage: str, fps: list[FusionParams], later: int) -> list[np.ndarray]:
        """mAP per subset of each candidate; one job per (weights, iou, skip): conf types share the clusters."""
        by_clusters: dict[tuple, list[FusionParams]] = {}
        for fp in fps:
            group = by_clusters.setdefault(_key(fp)[:3], [])
            if _key(fp) not in runner.cache and all(_key(fp) != _key(g) for g in group):
                group.append(fp)
        runner.run([([_key(fp) for fp in g], stage, _fusion_maps, (g,), [_describe(fp) for fp in g])
                    for g in by_clusters.values() if g], later)
        return [runner.cache[_key(fp)] for fp in fps]

    try:
        default = FusionParams(list(models), [1.0] * len(models))
        candidates = [default] + [FusionParams(list(models), [1.0] * len(models), iou, skip, conf) for iou, skip, conf in grid]
        results = fusion_calls("fusion", candidates, weight_runs + gate_runs)
        rows += [{"stage": "fusion", **asdict(fp), **asdict(GateParams()), "map": r[0]} for fp, r in zip(candidates, results)]
        best = [default] * n_paths  # path 0 tunes on every image, path k on all but fold k
        best_map = [results[0][p] for p in range(n_paths)]
        for fp, r in zip(candidates[1:], results[1:]):
            for p in range(n_paths):
                if r[p] > best_map[p]:
                    best[p], best_map[p] = fp, r[p]
        for i in range(len(models) if several else 0):  # coordinate search over model weights, each path its own
            proposals = [[FusionParams(list(models), [w if j == i else v for j, v in enumerate(b.weights)],
                                       b.iou_thr, b.skip_box_thr, b.conf_type) for w in weight_grid] for b in best]
            proposals = [[fp for fp in ps if any(v > 0 for v in fp.weights)] for ps in proposals]  # none left: skipped
            later = (len(models) - 1 - i) * (len(weight_grid) - 1) + gate_runs
            flat = fusion_calls("weight", [fp for ps in proposals for fp in ps], later)
            ends = np.cumsum([0, *map(len, proposals)])
            results = [flat[ends[p]:ends[p + 1]] for p in range(n_paths)]
            rows += [{"stage": "weight", **asdict(fp), **asdict(GateParams()), "map": r[0]} for fp, r in zip(proposals[0], results[0])]
            for p in range(n_paths):
                for fp, r in zip(proposals[p], results[p]):
                    # a tie that leaves member i out is taken: the smaller ensemble is the simpler one (a member
                    # of No-finding rows only, which moves no figure, is dropped rather than kept at weight 1)
                    drops = fp.weights[i] == 0 and best[p].weights[i] != 0
                    if r[p] > best_map[p] or (drops and r[p] == best_map[p]):
                        best[p], best_map[p] = fp, r[p]
        fused_maps = [runner.cache[_key(b)] for b in best]  # each path's chosen fusion, on every subset
        chosen_gate = [GateParams()] * n_paths
        gated_maps = list(fused_maps)
        if p_abnormal is not None:
            distinct = {_key(b): b for b in best}
            # each process takes a share of the gate rules (and fuses the candidate once for them)
            shares = [list(range(i, len(gates), runner.jobs)) for i in range(min(runner.jobs, len(gates)))]
            runner.run([([("gate", *k, i)], "gate", _gate_maps, (fp, [gates[j] for j in share]),
                         [f"{len(share)} gate rules on {_describe(fp)}"])
                        for k, fp in distinct.items() for i, share in enumerate(shares)])
            per_fusion = {}
            for k in distinct:
                rows_of = {j: runner.cache[("gate", *k, i)][n] for i, share in enumerate(shares) for n, j in enumerate(share)}
                per_fusion[k] = [rows_of[j] for j in range(len(gates))]
            rows += [{"stage": "gate", **asdict(best[0]), **asdict(g), "map": r[0]} for g, r in zip(gates, per_fusion[_key(best[0])])]
            for p in range(n_paths):
                top = best_map[p]
                for g, r in zip(gates, per_fusion[_key(best[p])]):
                    if r[p] > top:
                        chosen_gate[p], top, gated_maps[p] = g, r[p], r
    finally:
        runner.close()
    params = Params(best[0], chosen_gate[0])
    singles = {m: score_rows(truth, t) for m, t in zip(models, tables)}
    # "ensemble_gated" only where a gate was searched: without a classifier it would repeat "ensemble"
    searched = p_abnormal is not None
    params.oof_map = {**{m: s.map() for m, s in singles.items()}, "ensemble": float(best_map[0]),
                      **({"ensemble_gated": float(gated_maps[0][0])} if searched else {})}
    if held:
        k_of = range(len(held))
        params.nested_folds = {**{m: [s.map(h) for h in held] for m, s in singles.items()},
                               "ensemble": [float(fused_maps[1 + k][n_paths + k]) for k in k_of]}
        if searched:
            params.nested_folds["ensemble_gated"] = [float(gated_maps[1 + k][n_paths + k]) for k in k_of]
        params.nested_map = {name: float(np.mean(v)) for name, v in params.nested_folds.items()}
        log(f"nested OOF mAP (tuned without fold k, scored on fold k; mean of {len(held)} folds): "
            + ", ".join(f"{k} {v:.4f}" for k, v in params.nested_map.items()))
    return params, pd.DataFrame(rows)


def apply(params: Params, tables: list[pd.DataFrame], sizes: pd.DataFrame, p_abnormal: pd.Series | None) -> pd.DataFrame:
    """The test-time path: ``tables`` (one per ``params.fusion.models``, same order, a member of weight 0
    included: :func:`fuse` leaves it out) fused, then gated."""
    preds = fuse(tables, sizes, params.fusion)
    if params.gate.rule != "none":
        if p_abnormal is None:
            raise ValueError(f"gate {params.gate.rule!r} needs the classifier's probabilities")
        preds = gate(preds, p_abnormal, params.gate)
    return preds.reset_index(drop=True)


def params_from_dict(d: dict) -> Params:
    """:class:`Params` from its JSON (``params.json``); files written before nested OOF or warnings load too."""
    return Params(FusionParams(**d["fusion"]), GateParams(**d["gate"]), d.get("oof_map", {}),
                  d.get("nested_map", {}), d.get("nested_folds", {}), list(d.get("warnings", [])), d.get("classifier"))


def weak_members(models: Sequence[str], tables: Sequence[pd.DataFrame], gt: pd.DataFrame, image_ids: Sequence[str],
                 prior: pd.DataFrame) -> list[str]:
    """One warning line per member the tuner may leave out (weight 0): its OOF table holds no finding box
    (class_id != 14), or its pooled OOF mAP is below the prior-box floor's (``prior``: the prior boxes'
    OOF predictions, :func:`cxr.baseline.oof_prior`). Such a member usually means a failed training or
    prediction, which a weight of 0 would otherwise hide."""
    truth = Truth(gt, list(image_ids))
    floor = score_rows(truth, prior[prior["image_id"].isin(set(truth.ids))]).map()
    lines = []
    for m, t in zip(models, tables):
        value = score_rows(truth, t).map()
        figures = f"(OOF mAP {value:.4f}, prior-box floor {floor:.4f})"
        if not (t["class_id"] != NO_FINDING).any():
            lines.append(f"warning: member {m} has no finding boxes in its OOF predictions {figures}: "
                         "the tuner may give it weight 0")
        elif value < floor:
            lines.append(f"warning: member {m} is below the prior-box floor {figures}: the tuner may give it weight 0")
    return lines
