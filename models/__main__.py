"""Run one verb of one model adapter: ``python -m models MODEL VERB --fold K ...`` (what the Makefile calls).

``python -m models list [--kind detector|classifier]`` prints the model table's names.

Verbs: ``prepare``, ``train``, ``predict`` (one fold) and ``merge`` (all folds: ``oof.csv`` =
every fold's out-of-fold table, ``test.csv`` = the folds' test tables fused with WBF).
Profiles are ``models/<MODEL>/<PROFILE>.yaml`` (or a path); ``--set key=value`` overrides a field.

Every input is checked before anything is written: the profile's keys and ranges (``cxr.config``),
the fold (it must be in the fold file), the device (``device: cuda`` needs a usable GPU; ``gpus:``
no more than the visible cards). A refused run leaves no folder behind, and a fold folder whose run
never saved a checkpoint does not block the next run (:func:`check_run_config`).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import yaml

from cxr.args import Parser, non_negative_int
from cxr.config import from_dict, load, read_yaml, save, to_dict
from cxr.data import DataFolder, read_folds
from cxr.io import DataError, one_line_errors
from cxr.predictions import read_predictions, write_predictions
from cxr.wbf import FOLD_MERGE, WBF, fuse_group
from models import MODELS, kind, names
from models import adapter as import_adapter
from models.common import fold_dir, job_device

HERE = Path(__file__).parent


def fold_fusion(run: Path, model: str) -> WBF:
    """The WBF settings ``merge`` fused ``model``'s folds with (saved beside its test.csv)."""
    path = run / model / "fold_fusion.yaml"
    return load(WBF, path) if path.is_file() else FOLD_MERGE


def merge(model: str, data: DataFolder, folds: pd.DataFrame, run: Path, fusion: WBF = FOLD_MERGE) -> tuple[Path, Path]:
    """All folds of ``model`` -> ``RUN/MODEL/oof.csv`` (out-of-fold) and ``RUN/MODEL/test.csv``.

    Detections: the folds' test tables are fused with WBF (``fusion``, saved as
    ``fold_fusion.yaml`` so predict-images fuses new images the same way). Probabilities (the
    classifier): the folds' test probabilities are averaged, and an OOF ROC AUC report is written.
    """
    ks = sorted(folds["fold"].unique())
    missing = [k for k in ks if not (fold_dir(run, model, k) / "oof.csv").exists()]
    if missing:
        raise DataError(run / model, f"no predictions for fold(s) {missing}: run make oof MODEL={model}")
    if kind(model) == "classifier":
        from models.classifier.report import merge_probabilities

        return merge_probabilities([fold_dir(run, model, k) for k in ks], data, folds, run / model)
    oof = pd.concat([read_predictions(fold_dir(run, model, k) / "oof.csv") for k in ks], ignore_index=True)
    test = fuse_group([read_predictions(fold_dir(run, model, k) / "test.csv") for k in ks], data.test_sizes, fusion)
    save(fusion, run / model / "fold_fusion.yaml")
    return (
        write_predictions(oof, run / model / "oof.csv", data.train_sizes),
        write_predictions(test, run / model / "test.csv", data.test_sizes),
    )


def parse_overrides(pairs: list[str], where: str = "--set") -> dict:
    """``["epochs=5", "imgsz=512"]`` -> ``{"epochs": 5, "imgsz": 512}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DataError(where, f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = read_yaml(value)
        except yaml.YAMLError as e:
            raise DataError(where, f"value of {key!r} is not valid YAML: {value!r} ({e.__class__.__name__})") from None
    return out


def has_progress(out: Path) -> bool:
    """Whether a fold folder holds training progress: a checkpoint or final weights (any ``.pt``/``.pth``:
    ``last.pt``, ``train/weights/last.pt``, ``train/model_*.pth``, ``weights.pt[h]``)."""
    return any(p.suffix in (".pt", ".pth") for p in out.rglob("*") if p.is_file())


# Keys that say where a job runs, not what it trains: a fold may resume on another machine or card count
# (the LR rule keeps the nominal batch across card counts, models.common.scale_for_gpus).
WHERE_IT_RUNS = frozenset({"device", "gpus", "workers"})


def check_run_config(cfg: object, out: Path) -> None:
    """A fold folder trained with another config is never silently reused: stop, naming what differs.

    ``config.yaml`` is written by the adapter's ``train`` once training starts; a killed run resumes
    only with the same settings, and a finished one is not re-labelled as if trained with the new
    ones. A run that failed before its first checkpoint left nothing worth keeping: its folder (whose
    prepared labels may follow the old config) is removed, so it never blocks the next run.
    """
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    old = read_yaml(saved.read_text()) or {}
    new = read_yaml(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    diff = [k for k in dict.fromkeys([*old, *new])
            if k not in WHERE_IT_RUNS and old.get(k, "<unset>") != new.get(k, "<unset>")]
    if not diff:
        return
    if not has_progress(out):
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once
            print(f"{out}: removing a run that stopped before its first checkpoint (another config: {', '.join(diff)})")
            shutil.rmtree(out)
        return
    changes = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff)
    raise DataError(saved, f"this fold was trained with another config ({changes}): use another NAME/--run-dir "
                           f"for these settings, or delete {out} to retrain it")


def check_fold(folds: pd.DataFrame, fold: int, where: str) -> None:
    ks = sorted(int(k) for k in folds["fold"].unique())
    if fold not in ks:
        raise DataError(where, f"fold {fold} is not in this fold file (its folds: {', '.join(map(str, ks))})")


def check_launcher(cfg: object) -> None:
    """Under torchrun the job's GPU count is torchrun's: ``gpus`` must say the same (it is part of the
    run's config, and the schedule depends on it)."""
    world = os.environ.get("WORLD_SIZE")
    if world is not None and "RANK" in os.environ and getattr(cfg, "gpus", 1) != int(world):
        raise DataError("gpus", f"torchrun started {world} processes but gpus is {getattr(cfg, 'gpus', 1)}: "
                                f"add --set gpus={world}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        lp = Parser(prog="python -m models list", description="print the model table's names")
        lp.add_argument("--kind", choices=["detector", "classifier"])
        print(*names(lp.parse_args(argv[1:]).kind))
        return
    p = Parser(prog="python -m models", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("verb", choices=["prepare", "train", "predict", "merge"])
    p.add_argument("--data", required=True, help="folder in Kaggle's resized-PNG layout")
    p.add_argument("--folds", required=True, help="fold file (image_id,fold)")
    p.add_argument("--fold", type=non_negative_int, default=0)
    p.add_argument("--profile", default="demo", help="demo, full, or a YAML path")
    p.add_argument("--run-dir", default="runs/demo", help="run root; outputs go to RUN_DIR/MODEL/foldK")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override profile fields")
    p.add_argument("--fold-fusion", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"merge: WBF of the folds' test tables (iou_thr, skip_box_thr, conf_type; default {FOLD_MERGE})")
    a = p.parse_args(argv)
    with one_line_errors():
        adapter = import_adapter(a.model)
        profile = Path(a.profile) if a.profile.endswith(".yaml") else HERE / a.model / f"{a.profile}.yaml"
        overrides = parse_overrides(a.set)
        cfg = load(adapter.Config, profile, overrides)
        data, folds, run = DataFolder(a.data), read_folds(a.folds), Path(a.run_dir)
        if a.verb == "merge":
            fusion = from_dict(WBF, {**to_dict(FOLD_MERGE), **parse_overrides(a.fold_fusion, "--fold-fusion")},
                               "--fold-fusion")
            print(*merge(a.model, data, folds, run, fusion))
            return
        check_fold(folds, a.fold, a.folds)
        if a.verb in ("train", "predict"):
            check_launcher(cfg)
            job_device(cfg, training=a.verb == "train")
        out = fold_dir(run, a.model, a.fold)
        if a.verb == "train":
            check_run_config(cfg, out)
        print(getattr(adapter, a.verb)(cfg, data, folds, a.fold, out))


if __name__ == "__main__":
    main()
