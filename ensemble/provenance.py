"""What a run's ensemble was trained on and with: the data folder (synthetic or not), each model's
profile, folds and fold fusion. Read by the run report and by predict-images, which both name it.

Synthetic data: ``cxr synth`` writes ``synth.yaml`` ("how this data set was made") into every data
set it generates, and nothing else writes that file, so a data folder holding it is the synthetic
benchmark. The fold folders do not record their data folder, so ``ensemble submit`` records it
(:func:`record_data`, ``RUN/ensemble/data.json``); a caller that knows the data folder (predict-images
``--data``) checks it directly.

Profiles: a member's ``member.yaml`` (models/members.py) names its profile and the settings it adds.
For a run older than that file, each member's saved ``config.yaml`` (the resolved config, not the
profile's name) is compared with ``models/<family>/{demo,full}.yaml``: the profile with the fewest keys
set to another value is named, with the keys that differ (``--set`` overrides). Keys a profile
leaves at the adapter's default are not compared (reading the defaults would import the frameworks).

Members are named as in ``MODELS``: ``yolo``, a variant ``yolo@s640``, or one borrowed from another run,
``demo:detectron`` (read from ``runs/demo/detectron``: the run it really comes from is named).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cxr.io import DataError, write_json
from ensemble.ensemble import Params, params_from_dict
from models.members import Member, parse_member, read_record

PROFILES = ("demo", "full")
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SYNTH_MARKER = "synth.yaml"  # written by cxr.synth.generate into every synthetic data set
DATA_RECORD = "data.json"  # RUN/ensemble/data.json, written by ensemble submit


@dataclass
class TrainingData:
    """The data folder a run was trained on, as far as it is known."""

    path: str | None  # None: not recorded and not given
    synthetic: bool | None  # None: unknown
    synth: dict = field(default_factory=dict)  # synth.yaml's settings when synthetic

    def describe(self) -> str:
        if self.path is None:
            return "unknown (no data folder recorded for this run: ensemble submit records it)"
        if self.synthetic:
            s = self.synth
            return (f"{self.path}: SYNTHETIC benchmark written by cxr synth ({s.get('n_train', '?')} train images at "
                    f"{s.get('size', '?')} px, seed {s.get('seed', '?')})")
        return f"{self.path}" + ("" if self.synthetic is False else " (could not check whether it is synthetic)")

    def warning(self) -> str:
        """A line for a red banner when the models learned from synthetic images, else ''."""
        if not self.synthetic:
            return ""
        return (f"These models were trained on SYNTHETIC demo images ({self.path}, made by cxr synth), not on "
                "radiographs: their findings and P(abnormal) on real images mean nothing.")


def data_of(root: str | os.PathLike) -> TrainingData:
    """The data folder ``root`` as training data: synthetic when it holds cxr synth's ``synth.yaml``."""
    root = Path(root)
    marker = root / SYNTH_MARKER
    if not marker.is_file():
        return TrainingData(str(root.resolve()), False if root.is_dir() else None)
    try:
        settings = yaml.safe_load(marker.read_text()) or {}
    except (OSError, yaml.YAMLError):
        settings = {}
    return TrainingData(str(root.resolve()), True, settings if isinstance(settings, dict) else {})


def record_data(run: Path, data_root: str | os.PathLike) -> Path:
    """``RUN/ensemble/data.json``: the data folder the run's models were trained and tuned on."""
    d = data_of(data_root)
    return write_json({"path": d.path, "synthetic": d.synthetic, "synth": d.synth}, Path(run) / "ensemble" / DATA_RECORD)


def training_data(run: Path, data_root: str | os.PathLike | None = None) -> TrainingData:
    """What the run was trained on: ``data_root`` when given (checked now), else the record of
    ``ensemble submit``. Either one saying synthetic makes it synthetic (a run tuned on the demo
    data and pointed at a real folder later is still a demo run)."""
    recorded = None
    path = Path(run) / "ensemble" / DATA_RECORD
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            recorded = TrainingData(d.get("path"), d.get("synthetic"), d.get("synth") or {})
        except (OSError, ValueError, AttributeError):
            recorded = None
    given = data_of(data_root) if data_root is not None else None
    if given is not None and recorded is not None and recorded.synthetic and not given.synthetic:
        return recorded
    return given or recorded or TrainingData(None, None)


@dataclass
class ModelInfo:
    """One model of a run: its folds, the profile its saved config matches best and how it differs."""

    name: str
    folds: list[int]
    profile: str  # "demo", "full", "custom" (no profile file close), or "unknown" (no config.yaml)
    changes: dict[str, tuple[object, object]]  # key -> (profile's value, trained value)
    fold_fusion: dict  # how merge fused its folds' test tables (fold_fusion.yaml), {} when absent
    best_on_fold: list[int] = field(default_factory=list)  # folds predicted with checkpoint: best
    folder: str = ""  # where its folds are: another run's folder for a borrowed member

    def describe(self) -> str:
        """'demo profile (epochs 12 -> 1, workers 2 -> 0), 3 folds' (+ a warning when OOF came from the best
        epoch of the fold it predicts)."""
        changed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in self.changes.items())
        folds = f"{len(self.folds)} fold{'s' if len(self.folds) != 1 else ''}"
        optimistic = (f"; OPTIMISTIC OOF: fold(s) {', '.join(map(str, self.best_on_fold))} predicted with the epoch "
                      f"that scored best on that same fold (checkpoint: best)" if self.best_on_fold else "")
        where = f" of {self.folder}" if self.folder and ":" in self.name else ""  # a borrowed member's real run
        if self.profile in ("unknown", "custom"):
            return f"{self.profile} profile, {folds}{where}{optimistic}"
        return f"{self.profile} profile{f' ({changed})' if changed else ''}, {folds}{where}{optimistic}"


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _member(model: str) -> Member:
    try:
        return parse_member(model)
    except DataError:  # an EXTRA folder's name: no family, read as it is
        return Member(model)


def model_info(run: Path, model: str) -> ModelInfo:
    """Folds, profile and fold fusion of member ``model`` of ``run`` (read from its files; never raises)."""
    member = _member(model)
    folder = member.folder(run)
    folds = sorted(int(d.name[4:]) for d in folder.glob("fold*") if d.is_dir() and d.name[4:].isdigit())
    saved = next((_read_yaml(folder / f"fold{k}" / "config.yaml") for k in folds
                  if (folder / f"fold{k}" / "config.yaml").is_file()), {})
    fusion = _read_yaml(folder / "fold_fusion.yaml")
    best_on_fold = [k for k in folds if _read_yaml(folder / f"fold{k}" / "predict.yaml").get("checkpoint") == "best"]
    try:
        record = read_record(folder)
    except DataError:
        record = None
    if record is not None and record.profile in PROFILES and saved:
        profile = _read_yaml(MODELS_DIR / member.family / f"{record.profile}.yaml")
        changes = {k: (profile.get(k, "<default>"), v) for k, v in record.set.items()}
        info = ModelInfo(model, folds, record.profile, changes, fusion)
    else:
        info = _model_info(folder, member.family, folds, saved, fusion, model)
    return replace(info, best_on_fold=best_on_fold, folder=str(folder))


def _model_info(folder: Path, family: str, folds: list[int], saved: dict, fusion: dict, model: str) -> ModelInfo:
    if not saved:
        return ModelInfo(model, folds, "unknown", {}, fusion)
    best: tuple[int, str, dict] | None = None
    for name in PROFILES:
        profile = _read_yaml(MODELS_DIR / family / f"{name}.yaml")
        if not profile:
            continue
        changes = {k: (v, saved.get(k)) for k, v in profile.items() if k in saved and saved.get(k) != v}
        if best is None or len(changes) < best[0]:
            best = (len(changes), name, changes)
    if best is None or best[0] > max(3, len(saved) // 3):  # far from both: call it what it is
        return ModelInfo(model, folds, "custom", {}, fusion)
    return ModelInfo(model, folds, best[1], best[2], fusion)


def profile_summary(run: Path, models: list[str]) -> str:
    """'yolo: demo; effdet: demo with epochs, workers changed' (one line, for a CSV column)."""
    parts = []
    for m in models:
        mi = model_info(run, m)
        parts.append(f"{m}: {mi.profile}" + (f" with {', '.join(mi.changes)} changed" if mi.changes else ""))
    return "; ".join(parts)


def ensemble_rows(params: Params | None, run: Path | None, classifier: str | None,
                  data: TrainingData | None) -> list[tuple[str, str]]:
    """(what, value) lines naming a tuned ensemble: run, training data, fused models and weights,
    fusion and gate parameters, each model's profile, folds and fold fusion. Never raises on a
    run with missing pieces (it says what is unknown)."""
    rows = [("run", str(Path(run).resolve()) if run is not None else "-")]
    if data is not None:
        rows.append(("training data", data.describe()))
    if params is None:
        return rows + [("ensemble", "no readable tuned parameters (RUN/ensemble/params.json)")]
    f, g = params.fusion, params.gate
    gated = g.rule != "none"
    rows.append(("fused models (weight)", ", ".join(f"{m} {w:g}" for m, w in zip(f.models, f.weights))))
    rows.append(("fusion (WBF)", f"iou_thr {f.iou_thr:g}, skip_box_thr {f.skip_box_thr:g}, conf_type {f.conf_type}"))
    rows.append(("classifier gate", {
        "none": "off" + (" (the classifier did not help on OOF)" if classifier else ""),
        "soft": f"soft: No finding = 1 - P(abnormal) of {classifier}, boxes untouched",
        "hard": f"hard: p_normal = 1 - P(abnormal) of {classifier}; boxes dropped where p_normal > {g.high:g}, "
                f"scaled by 1 - p_normal where {g.low:g} <= p_normal <= {g.high:g}, kept below; No finding = p_normal",
    }.get(g.rule, g.rule)))
    if run is not None:
        for m in [*f.models, *([classifier] if gated and classifier else [])]:
            mi = model_info(run, m)
            how = (f"; folds fused on test by WBF iou_thr {mi.fold_fusion.get('iou_thr')}, "
                   f"{mi.fold_fusion.get('conf_type')}" if mi.fold_fusion else "")
            rows.append((f"model {m}", mi.describe() + how))
    return rows


def load_params(run: Path) -> Params | None:
    """``RUN/ensemble/params.json`` as :class:`Params`, None when missing or not a parameter file."""
    try:
        return params_from_dict(json.loads((Path(run) / "ensemble" / "params.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
