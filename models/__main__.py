"""Run one verb of one model adapter: ``python -m models MODEL VERB --fold K ...`` (what the Makefile calls).

``python -m models list [--kind detector|classifier]`` prints the model table's names;
``python -m models MODEL config [--profile P] [--set K=V ...]`` prints the resolved config: every key
with its value, type and meaning, as YAML that can be saved as a profile.

Verbs: ``prepare``, ``train``, ``predict`` (one fold), ``merge`` (all folds: ``oof.csv`` =
every fold's out-of-fold table, ``test.csv`` = the folds' test tables fused with WBF, ``scores.json``)
and ``check`` (before make reuses finished folds: are they what is asked now? :func:`check`).
``--variant V`` works on the member ``MODEL@V`` (``RUN/MODEL@V/``, models/members.py); every verb runs
with the member's recorded settings (``member.yaml``) under ``--set``.
Profiles are ``models/<MODEL>/<PROFILE>.yaml`` (or a path); ``--set key=value`` overrides a field.

Every input is checked before anything is written: the profile's keys and ranges (``cxr.config``),
the fold (it must be in the fold file), the device (``device: cuda`` needs a usable GPU; ``gpus:``
no more than the visible cards). A refused run leaves no folder behind, and a fold folder whose run
never saved a checkpoint does not block the next run (:func:`check_run_config`). ``predict`` uses the
fold's saved config: only the adapter's ``PREDICT_ONLY`` keys (threshold, TTA, checkpoint) and where it
runs may differ, and what it used is recorded in ``predict.yaml`` (:func:`predict_config`).

Every verb on a fold appends what it prints (its child processes' too) to ``<fold>/log.txt``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from cxr.args import Parser, non_negative_int, plain_name
from cxr.config import describe, from_dict, load, read_yaml, save, to_dict
from cxr.data import DataFolder, read_folds, split
from cxr.io import DataError, atomic_path, one_line_errors, write_json
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import read_predictions, read_probabilities, write_predictions
from cxr.wbf import FOLD_MERGE, WBF, fuse_group
from cxr.dataset import NO_FINDING
from models import MODELS, kind, names
from models import adapter as import_adapter
from models.members import (INPUTS_FILE, SCORES_FILE, WHERE_IT_RUNS, Member, asked_key, changed_inputs, fold_inputs,
                            fold_start, mark_predicted, read_inputs, record_settings, same_as_asked, settings,
                            start_input, write_inputs)

HERE = Path(__file__).parent


def fold_fusion(run: Path, model: str) -> WBF:
    """The WBF settings ``merge`` fused ``model``'s folds with (saved beside its test.csv)."""
    path = run / model / "fold_fusion.yaml"
    return load(WBF, path) if path.is_file() else FOLD_MERGE


def merge(model: str, data: DataFolder, folds: pd.DataFrame, run: Path, fusion: WBF = FOLD_MERGE,
          member: Member | None = None) -> tuple[Path, Path]:
    """All folds of ``model`` -> ``RUN/MEMBER/oof.csv`` (out-of-fold) and ``RUN/MEMBER/test.csv``, and the
    member's figures in ``scores.json`` (:func:`write_scores`).

    Detections: the folds' test tables are fused with WBF (``fusion``, saved as
    ``fold_fusion.yaml`` so predict-images fuses new images the same way). Probabilities (the
    classifier): the folds' test probabilities are averaged, and an OOF ROC AUC report is written.
    """
    member = member or Member(model)
    folder = member.folder(run)
    ks = sorted(folds["fold"].unique())
    missing = [k for k in ks if not (folder / f"fold{k}" / "oof.csv").exists()]
    if missing:
        variant = f" VARIANT={member.variant}" if member.variant else ""
        raise DataError(folder, f"no predictions for fold(s) {missing}: run make oof MODEL={model}{variant}")
    if kind(model) == "classifier":
        from models.classifier.report import merge_probabilities

        oof, test = merge_probabilities([folder / f"fold{k}" for k in ks], data, folds, folder)
    else:
        oof_table = pd.concat([read_predictions(folder / f"fold{k}" / "oof.csv") for k in ks], ignore_index=True)
        test_table = fuse_group([read_predictions(folder / f"fold{k}" / "test.csv") for k in ks], data.test_sizes, fusion)
        save(fusion, folder / "fold_fusion.yaml")
        oof = write_predictions(oof_table, folder / "oof.csv", data.train_sizes)
        test = write_predictions(test_table, folder / "test.csv", data.test_sizes)
    write_scores(model, data, folds, folder)
    return oof, test


def _figure(model: str, data: DataFolder, ids: list[str], table: pd.DataFrame | pd.Series, labels: pd.DataFrame) -> float | None:
    """mAP@0.4 of a detector's rows on ``ids``, or ROC AUC of the classifier's p_abnormal (None: one class only)."""
    if kind(model) == "classifier":
        from sklearn.metrics import roc_auc_score

        finding = labels.assign(f=labels["class_id"] != NO_FINDING).groupby("image_id")["f"].any()
        y = finding.reindex(ids).fillna(False).to_numpy().astype(int)
        return float(roc_auc_score(y, table.loc[ids].to_numpy())) if len(set(y)) == 2 else None
    return float(mean_average_precision(ground_truth(labels), table[table["image_id"].isin(set(ids))], ids)["map"])


def write_scores(model: str, data: DataFolder, folds: pd.DataFrame, folder: Path) -> Path:
    """``folder/scores.json``: the member's OOF figure pooled and per fold, their mean (the honest single-model
    figure: each fold scored alone), and the test figure where the data folder has test labels."""
    ids = folds["image_id"].astype(str).tolist()
    classifier = kind(model) == "classifier"
    oof = read_probabilities(folder / "oof.csv", ids) if classifier else read_predictions(folder / "oof.csv")
    per_fold = {str(int(k)): _figure(model, data, folds.loc[folds["fold"] == k, "image_id"].astype(str).tolist(), oof,
                                     data.labels) for k in sorted(folds["fold"].unique())}
    known = [v for v in per_fold.values() if v is not None]
    test = None
    test_labels = data.root / "test_labels.csv"
    if test_labels.is_file():
        from cxr.labels import read_labels

        try:
            labels = read_labels(test_labels, data.test_sizes)
            test_ids = data.test_ids()
            table = read_probabilities(folder / "test.csv", test_ids) if classifier else read_predictions(folder / "test.csv")
            test = _figure(model, data, test_ids, table, labels)
        except DataError as e:  # test labels in another layout: the figure is unknown, the merge stands
            print(f"note: no test figure for {folder.name}: {e}")
    scores = {"metric": "auc" if classifier else "map", "pooled": _figure(model, data, ids, oof, data.labels),
              "folds": per_fold, "fold_mean": float(sum(known) / len(known)) if known else None, "test": test,
              "finding_boxes": None if classifier else int((oof["class_id"] != NO_FINDING).sum()),
              "images": len(ids), "written": datetime.datetime.now().isoformat(timespec="seconds")}
    return write_json(scores, folder / SCORES_FILE)


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


def differing(old: dict, new: dict, free: set | frozenset) -> list[str]:
    """Keys of two resolved configs whose values differ (a key only one has counts), except the ``free`` ones."""
    return [k for k in dict.fromkeys([*old, *new]) if k not in free and old.get(k, "<unset>") != new.get(k, "<unset>")]


def check_run_config(cfg: object, out: Path, predict_only: frozenset | set = frozenset()) -> None:
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
    diff = differing(old, new, WHERE_IT_RUNS | predict_only)  # prediction settings never touch the weights
    if not diff:
        return
    if not has_progress(out):
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once
            print(f"{out}: removing a run that stopped before its first checkpoint (another config: {', '.join(diff)})")
            shutil.rmtree(out)
        return
    changes = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff)
    raise DataError(saved, f"this fold was trained with another config ({changes}): name a new variant "
                           f"(VARIANT=...) or NAME for these settings, or FORCE=1 to retrain it")


def _changes(old: dict, new: dict, keys: list[str], verb: str) -> list[str]:
    return [f"{k}: {verb} {old.get(k, '<unset>')!r}, asked {new.get(k, '<unset>')!r}" for k in keys]


def predict_free(adapter: Any) -> set[str]:
    """The keys that may differ from a fold's training config: the adapter's ``PREDICT_ONLY`` and where it runs."""
    return set(getattr(adapter, "PREDICT_ONLY", ())) | WHERE_IT_RUNS


def trained_changes(adapter: Any, old: dict, new: dict) -> list[str]:
    """``key: trained X, asked Y`` for each training setting (not :func:`predict_free`) of ``new`` that differs from
    the saved config ``old``: weights trained with ``old`` do not fit ``new``."""
    return _changes(old, new, differing(old, new, predict_free(adapter)), "trained")


def stale_folds(adapter: Any, cfg: Any, folder: Path, ks: list[int], inputs: dict[int, dict], run: Path,
                family: str) -> dict[int, tuple[str, list[str]]]:
    """Folds of a member whose saved results were made otherwise than ``cfg`` and ``inputs`` (per fold) ask:
    fold -> ("train", what differs) when the weights are not this config's (a model-defining key, the
    labels, the image size or the split changed), or ("predict", what differs) when only the prediction
    settings (the adapter's ``PREDICT_ONLY``) of its OOF/test tables differ. Where a job runs never counts.
    Folds with nothing trained yet are not listed (there is nothing to reuse)."""
    only = frozenset(getattr(adapter, "PREDICT_ONLY", ()))
    asked = read_yaml(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    stale: dict[int, tuple[str, list[str]]] = {}
    for k in ks:
        out = folder / f"fold{k}"
        saved = out / "config.yaml"
        if not saved.is_file():
            continue
        new = {**asked, "weights": fold_start(asked["weights"], run, k, family)} if asked.get("weights") else asked
        old = read_yaml(saved.read_text()) or {}
        lines = trained_changes(adapter, old, new) + changed_inputs(read_inputs(out), inputs[k])
        if lines:
            stale[k] = ("train", lines)
            continue
        if not (out / "oof.csv").is_file():
            continue
        predicted = read_yaml((out / "predict.yaml").read_text()) if (out / "predict.yaml").is_file() else None
        predicted = {**old, **(predicted or {})}
        keys = [k2 for k2 in differing(predicted, new, WHERE_IT_RUNS) if k2 in only]
        if keys:
            stale[k] = ("predict", _changes(predicted, new, keys, "predicted"))
    return stale


def check(model: str, member: Member, cfg: Any, inputs: dict[int, dict], run: Path, ks: list[int],
          force: bool) -> None:
    """Before make reuses a member's folds: every trained fold's saved config and inputs must be what is asked
    now. A difference stops here, before any work, with the keys (``epochs: trained 2, asked 3``) and the
    ways on; with ``force`` the folds concerned are cleared so make redoes them (the weights of a fold whose
    training settings still hold are kept: only its predictions are redone)."""
    folder = member.folder(run)
    adapter = import_adapter(model)
    stale = stale_folds(adapter, cfg, folder, ks, inputs, run, model)
    if not stale:
        return
    retrain = sorted(k for k, (what, _) in stale.items() if what == "train")
    repredict = sorted(k for k, (what, _) in stale.items() if what == "predict")
    lines = sorted({line for _, found in stale.values() for line in found})
    if not force:
        variant = f" VARIANT={member.variant}" if member.variant else ""
        todo = (f"FORCE=1 to retrain fold(s) {', '.join(map(str, retrain))}" if retrain else "") + \
               (" and " if retrain and repredict else "") + \
               (f"FORCE=1 to predict fold(s) {', '.join(map(str, repredict))} again (weights kept)" if repredict else "")
        raise DataError(folder, f"{member} was made with other settings ({'; '.join(lines)}): nothing reused. Name a "
                                f"new variant (make oof MODEL={model} VARIANT=<name> SET=...) or a new NAME for these "
                                f"settings, or {todo} (the same command with FORCE=1)")
    for k in retrain:
        shutil.rmtree(folder / f"fold{k}")
    for k in repredict:
        for name in ("oof.csv", "test.csv", "predict.yaml"):
            (folder / f"fold{k}" / name).unlink(missing_ok=True)
    for name in ("oof.csv", "test.csv", SCORES_FILE):  # the merge follows its folds
        (folder / name).unlink(missing_ok=True)
    print(f"FORCE: {member} ({'; '.join(lines)}): "
          + ", ".join([*(f"fold {k} retrains" for k in retrain), *(f"fold {k} predicts again" for k in repredict)]))


def config_text(model: str, cfg: object) -> str:
    """The resolved config as YAML, each key with its type and meaning as a comment (saveable as a profile)."""
    from models.common import VOCABULARY

    adapter = import_adapter(model)
    values = to_dict(cfg)
    lines = [f"# {model}: every key of its Config (shared keys mean the same in every model: "
             f"{', '.join(k for k in VOCABULARY if k in values)})"]
    passthrough = getattr(adapter.Config, "PASSTHROUGH", "")
    if passthrough:
        lines.append(f"# {passthrough}")
    only = sorted(getattr(adapter, "PREDICT_ONLY", ()))
    if only:
        lines.append(f"# may change at predict time: {', '.join(only)} (and {', '.join(sorted(WHERE_IT_RUNS))})")
    for key, type_, meaning in describe(adapter.Config, VOCABULARY):
        value = yaml.safe_dump({key: values[key]}, default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]
        lines.append(f"{value}  # {type_}" + (f"; {meaning}" if meaning else ""))
    return "\n".join(lines)


def predict_config(adapter: Any, cfg: Any, out: Path) -> Any:
    """The config ``predict`` runs with: the fold's saved ``config.yaml`` (what it was trained with), with
    only the prediction settings (the adapter's ``PREDICT_ONLY``) and where it runs taken from ``cfg``. A
    model-defining key that differs (``imgsz``, the architecture, ...) stops the run, naming the keys:
    predicting with settings the weights were not trained with silently wrecks the fold's OOF table."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return cfg  # not trained here: load_infer says which make target trains it
    trained = load(adapter.Config, saved, overrides_from=str(saved))
    free, new = predict_free(adapter), to_dict(cfg)
    changes = "; ".join(trained_changes(adapter, to_dict(trained), new))
    if changes:
        raise DataError(saved, f"this fold was trained with other settings ({changes}): predict with the training "
                               f"settings (same PROFILE, no SET for these keys); only {', '.join(sorted(free))} may "
                               f"change at predict time")
    return dataclasses.replace(trained, **{k: getattr(cfg, k) for k in free if k in new})  # typed, not to_dict's


def record_prediction(adapter: Any, cfg: Any, out: Path) -> Path:
    """``predict.yaml``: the prediction settings the fold's tables were made with (the report reads
    ``checkpoint`` from it: ``best`` marks the fold's OOF figures as optimistic)."""
    keys = predict_free(adapter)
    values = {k: v for k, v in to_dict(cfg).items() if k in keys}
    with atomic_path(out / "predict.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    return out / "predict.yaml"


def score_line(model: str, data: DataFolder, ids: list[str], path: Path) -> str:
    """``mAP@0.4 0.107`` (detectors, the competition metric on these images) or ``ROC AUC 0.91`` (classifier)."""
    if kind(model) == "classifier":
        from sklearn.metrics import roc_auc_score

        labels = data.labels.assign(finding=data.labels["class_id"] != NO_FINDING).groupby("image_id")["finding"].any()
        y = labels.loc[ids].to_numpy().astype(int)
        if len(set(y)) < 2:
            return "ROC AUC undefined (one class only)"
        return f"ROC AUC {roc_auc_score(y, read_probabilities(path, ids).to_numpy()):.4f}"
    preds = read_predictions(path)
    return f"mAP@0.4 {mean_average_precision(ground_truth(data.labels), preds[preds['image_id'].isin(ids)], ids)['map']:.4f}"


def train_summary(model: str, fold: int, weights: Path) -> str:
    """What training left: the weights, and the validation score of the last and the best epoch."""
    out = weights.parent
    text = f"{model} fold {fold} trained: {weights}"
    metrics = out / "metrics.csv"
    if metrics.is_file():
        log = pd.read_csv(metrics)
        col = next((c for c in ("val_map", "val_auc") if c in log), None)
        if col is not None and log[col].notna().any():
            best = log.loc[log[col].idxmax()]
            last = log[log[col].notna()].iloc[-1]
            name = "mAP@0.4" if col == "val_map" else "ROC AUC"
            text += (f"; validation {name}: last {last[col]:.4f} (epoch {int(last['epoch'])}), best {best[col]:.4f} "
                     f"(epoch {int(best['epoch'])}); curves: {metrics}, {out / 'tensorboard'}")
    return text


@contextlib.contextmanager
def fold_log(out: Path, argv: list[str]) -> Iterator[None]:
    """Append everything this process and its children print to ``out/log.txt`` (two ``tee``s: stdout and
    stderr stay apart on the console), from here on; a failure's message or traceback goes there too. A run
    that fails before writing anything but its log leaves no folder (nor the run folders it created)."""
    created = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    with open(log, "a") as f:
        f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} python -m models {shlex.join(argv)}\n")
    # multiprocessing's resource tracker (spawned ranks: effdet/classifier launch, detectron2's launch) outlives
    # the verb; started here it holds the console, not the tees' pipes, whose end the exit waits for
    resource_tracker.ensure_running()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    tees = [subprocess.Popen(["tee", "-a", str(log)], stdin=subprocess.PIPE, stdout=fd, pass_fds=(fd,)) for fd in saved]
    os.dup2(tees[0].stdin.fileno(), 1)
    os.dup2(tees[1].stdin.fileno(), 2)
    failure = None
    try:
        yield
    except BaseException as e:
        failure = f"error: {e}\n" if isinstance(e, DataError) else traceback.format_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for tee, fd in zip(tees, saved):
            tee.stdin.close()
            try:
                tee.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a child that outlives the verb still holds the pipe: stop logging it
                tee.kill()
                tee.wait()
            os.close(fd)
        if failure is not None:
            with open(log, "a") as f:
                f.write(failure)
            if created is not None and {p.name for p in out.iterdir()} <= {"log.txt", INPUTS_FILE}:
                shutil.rmtree(created, ignore_errors=True)


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
    if len(argv) > 1 and argv[1] == "config":
        cp = Parser(prog="python -m models MODEL config", description="print the resolved config: key, value, type, meaning")
        cp.add_argument("model", choices=list(MODELS))
        cp.add_argument("verb", choices=["config"])
        cp.add_argument("--profile", default="demo", help="demo, full, or a YAML path")
        cp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override profile fields")
        cp.add_argument("--run-dir", help="with it: the member's recorded settings (member.yaml) apply under SET")
        cp.add_argument("--variant", type=plain_name, help="the variant of MODEL (RUN_DIR/MODEL@VARIANT)")
        a = cp.parse_args(argv)
        with one_line_errors():
            adapter = import_adapter(a.model)
            overrides = parse_overrides(a.set)
            if a.run_dir:
                overrides = settings(Member(a.model, a.variant).folder(Path(a.run_dir)), overrides)
            print(config_text(a.model, load(adapter.Config, profile_path(a.model, a.profile), overrides)))
        return
    p = Parser(prog="python -m models", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("verb", choices=["prepare", "train", "predict", "merge", "check"])
    p.add_argument("--data", required=True, help="folder in Kaggle's resized-PNG layout")
    p.add_argument("--folds", required=True, help="fold file (image_id,fold)")
    p.add_argument("--fold", type=non_negative_int, default=None, help="the fold (default 0; check: every fold)")
    p.add_argument("--profile", default="demo", help="demo, full, or a YAML path")
    p.add_argument("--run-dir", default="runs/demo", help="run root; outputs go to RUN_DIR/MODEL[@VARIANT]/foldK")
    p.add_argument("--variant", type=plain_name, default=None,
                   help="a named variant of MODEL with its own settings and folder RUN_DIR/MODEL@VARIANT")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override profile fields (on top of the member's recorded settings, member.yaml)")
    p.add_argument("--fold-fusion", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"merge: WBF of the folds' test tables (iou_thr, skip_box_thr, conf_type; default {FOLD_MERGE})")
    p.add_argument("--force", action="store_true",
                   help="check: clear the folds made with other settings so that make redoes them")
    a = p.parse_args(argv)
    with one_line_errors():
        member = Member(a.model, a.variant)
        data, folds, run = DataFolder(a.data), read_folds(a.folds), Path(a.run_dir)
        folder = member.folder(run)
        overrides = settings(folder, parse_overrides(a.set))
        key = asked_key(a.profile, profile_path(a.model, a.profile), overrides)
        if a.verb == "check":
            if a.fold is not None:
                check_fold(folds, a.fold, a.folds)
            ks = sorted(int(k) for k in folds["fold"].unique()) if a.fold is None else [a.fold]
            if not any((folder / f"fold{k}" / "config.yaml").is_file() for k in ks):
                return  # nothing trained yet: nothing could be reused
            profile = profile_path(a.model, a.profile)
            weights = asked_value(profile, overrides, "share_weights") or asked_value(profile, overrides, "weights")
            inputs = {k: {**fold_inputs(data.root, Path(a.folds), folds, k), **start_input(weights, run, k, a.model)}
                      for k in ks}  # hashed once, used twice
            if same_as_asked(folder, ks, key, inputs):
                return  # made with exactly what is asked (no framework import needed to know it)
            cfg = load(import_adapter(a.model).Config, profile_path(a.model, a.profile), overrides)
            check(a.model, member, cfg, inputs, run, ks, a.force)
            return
        adapter = import_adapter(a.model)
        cfg = load(adapter.Config, profile_path(a.model, a.profile), overrides)
        if a.verb == "merge":
            fusion = from_dict(WBF, {**to_dict(FOLD_MERGE), **parse_overrides(a.fold_fusion, "--fold-fusion")},
                               "--fold-fusion")
            oof, test = merge(a.model, data, folds, run, fusion, member)
            ks = sorted(int(k) for k in folds["fold"].unique())
            print(f"{member}: out-of-fold predictions of folds {', '.join(map(str, ks))}: {oof} "
                  f"(OOF {score_line(a.model, data, list(folds['image_id']), oof)}); test predictions, the folds' "
                  f"{'mean' if kind(a.model) == 'classifier' else 'tables fused with WBF'}: {test}")
            return
        fold = 0 if a.fold is None else a.fold
        check_fold(folds, fold, a.folds)
        out = folder / f"fold{fold}"
        asked_start = getattr(cfg, "weights", None)
        if asked_start:  # a second stage: this fold's own start (the saved config holds the file it was)
            cfg = dataclasses.replace(cfg, weights=fold_start(asked_start, run, fold, a.model))
        if a.verb == "predict":
            cfg = predict_config(adapter, cfg, out)
        if a.verb in ("train", "predict"):
            check_launcher(cfg)
        shared = getattr(cfg, "share_weights", None)
        inputs = ({**fold_inputs(data.root, Path(a.folds), folds, fold),
                   **start_input(shared or asked_start, run, fold, a.model)} if a.verb == "train" else {})
        if a.verb == "train":
            check_run_config(cfg, out, frozenset(getattr(adapter, "PREDICT_ONLY", ())))
            changed = changed_inputs(read_inputs(out), inputs) if out.is_dir() and has_progress(out) else []
            if changed:
                raise DataError(out, f"this fold was trained on other inputs ({'; '.join(changed)}): FORCE=1 "
                                     f"retrains it, or use another NAME")
        from models.common import job_device

        with fold_log(out, argv):
            if a.verb in ("train", "predict"):
                job_device(cfg, training=a.verb == "train")
            rank0 = os.environ.get("RANK", "0") == "0"
            if rank0 and a.verb in ("train", "predict"):  # the member's settings: what later commands rebuild
                record_settings(folder, member, a.profile, overrides)
            if rank0 and a.verb == "train":
                write_inputs(out, {**inputs, "asked": key})
            started = time.time()
            if a.verb == "train" and shared:
                result = share_fold(adapter, cfg, shared, run, fold, out, a.model)
            else:
                result = getattr(adapter, a.verb)(cfg, data, folds, fold, out)
            if not rank0:
                return
            if a.verb == "train":
                write_inputs(out, {**inputs, "asked": key}, time.time() - started)
                print(train_summary(str(member), fold, result), flush=True)
            elif a.verb == "predict":
                record_prediction(adapter, cfg, out)
                mark_predicted(out, key)
                oof, test = result
                val_ids = split(folds, fold)[1]
                print(f"{member} fold {fold}: out-of-fold predictions {oof} (fold {fold}'s {len(val_ids)} images, "
                      f"{score_line(a.model, data, val_ids, oof)}, checkpoint {getattr(cfg, 'checkpoint', 'last')}); "
                      f"test predictions {test}", flush=True)
            else:
                print(f"{member} fold {fold} prepared: {result}", flush=True)


def share_fold(adapter: Any, cfg: Any, shared: str, run: Path, fold: int, out: Path, family: str) -> Path:
    """``share_weights``: fold ``fold`` takes the trained fold of member ``shared`` (same family, the same
    training settings; only prediction settings may differ) instead of training: its weight files are hard
    links (one copy on disk), its config, curves and metrics copies. Returns the final weights' path here."""
    final = Path(fold_start(shared, run, fold, family))
    source = final.parent
    old = read_yaml((source / "config.yaml").read_text()) or {}
    changes = trained_changes(adapter, old, read_yaml(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    if changes:
        raise DataError(out, f"share_weights: {shared} fold {fold} was trained with other settings "
                             f"({'; '.join(changes)}): only {', '.join(sorted(predict_free(adapter)))} "
                             f"may differ from the member whose weights are shared")
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in ("inputs.json", "log.txt", "oof.csv", "test.csv", "predict.yaml"):
            continue
        target = out / path.name
        target.unlink(missing_ok=True)
        if path.suffix in (".pt", ".pth"):
            try:
                os.link(path, target)
                continue
            except OSError:  # another filesystem: a copy
                pass
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
    print(f"{family} fold {fold}: shares the weights of {shared} ({final}); not trained here", flush=True)
    return out / final.name


def asked_value(profile_file: Path, overrides: dict, key: str) -> Any:
    """The value of ``key`` a command asks for (its override, else the profile's), read without the framework."""
    if key in overrides:
        return overrides[key]
    return (read_yaml(Path(profile_file).read_text()) or {}).get(key) if Path(profile_file).is_file() else None


def profile_path(model: str, profile: str) -> Path:
    """``demo``/``full`` -> ``models/MODEL/PROFILE.yaml``; a ``.yaml`` path as given. An unknown name is a
    DataError naming the model's profiles (and the closest one)."""
    if profile.endswith(".yaml"):
        return Path(profile)
    path = HERE / model / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (HERE / model).glob("*.yaml"))
        close = difflib.get_close_matches(profile, known, 1)
        raise DataError("PROFILE", f"{profile!r} is not a profile of {model}: {', '.join(known)}"
                                   f"{f' (did you mean {close[0]!r}?)' if close else ''}, or a .yaml file")
    return path


if __name__ == "__main__":
    main()
