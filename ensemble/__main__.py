"""``python -m ensemble tune|submit|blend|predict-images``: tune WBF + gate on OOF, write the submission and the report, blend submissions.

    python -m ensemble tune   --data D --folds F --run-dir runs/NAME [--models yolo,effdet] [--exclude effdet]
                              [--extra path/to/notebook_preds] [--classifier classifier|none] [--jobs 2] [--force]
    python -m ensemble submit --data D --folds F --run-dir runs/NAME --name NAME [same model choice]
                              # submissions/NAME__<set>.csv + reports/NAME/<set>/, copied as the latest:
                              # submissions/NAME.csv + reports/NAME/index.html
    python -m ensemble blend ...   # ensemble.blend: weighted blend of submission files (see its --help)
    python -m ensemble predict-images ...   # ensemble.predict_images: the tuned ensemble on a folder of new studies
    python -m ensemble runs ...   # ensemble.runs: every run x member and its figures (make runs)

The model set: ``--models`` (default: every detector of models/__init__.py; members as
models/members.py names them: ``yolo``, the variant ``yolo@s640``, ``demo:detectron`` borrowed from
run ``demo`` if its folds are this fold file's) less ``--exclude``, plus ``--extra`` folders (a model trained elsewhere: ``oof.csv`` and ``test.csv`` in the prediction
format or the Kaggle submission format, named after the folder or ``NAME=PATH``). Each set keeps
its own tuned parameters (``RUN/ensemble/<set>/``), so changing the set tunes anew; ``tune`` skips
a set whose parameters are newer than its inputs. ``RUN/ensemble/params.json`` is a copy of the
parameters last tuned or submitted (what ``ensemble.predict_images`` applies).

Outputs of ``submit``, per set (``<set>`` = the folder name under ``RUN/ensemble/``, e.g.
``detectron-effdet-yolo+classifier``), so a second set under the same NAME keeps the first:

    submissions/NAME__<set>.csv     the set's checked submission
    reports/NAME/<set>/index.html   its report (index.md, summary.json, scores.csv, figures, ...)
    submissions/NAME.csv            a copy of the set submitted last (what make submission promises)
    reports/NAME/index.html         the page of the set submitted last (pictures from <set>/), links every set
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path


import models as model_table
from cxr.args import PLAIN_NAME, Parser, is_plain_name, plain_name, positive_int
from cxr.baseline import oof_prior
from cxr.data import DataFolder, read_folds
from cxr.io import DataError, atomic_path, one_line_errors, read_table, write_json, write_table
from cxr.metric import ground_truth
from cxr.predictions import read_predictions
from cxr.submission import write_submission
from ensemble.ensemble import (GateParams, apply, load_model_tables, load_probabilities, params_from_dict, params_path,
                               tune, weak_members)
from ensemble.provenance import record_data, training_data
from models.members import check_same_folds, parse_member
from ensemble.report import RunInfo, submission_test_map, write_report


@dataclass
class Choice:
    """The model set of one run: its members (this run's, variants, borrowed, outside folders) and the gate's
    classifier member (or None)."""

    models: list[str]  # as named: yolo, yolo@s640, demo:detectron, or an EXTRA folder's name
    sources: dict[str, Path]  # the members read from another folder: borrowed ones and EXTRA folders
    classifier: str | None  # classifier, classifier@v or demo:classifier
    classifier_dir: Path | None = None  # its folder (oof.csv, test.csv)
    extra: frozenset[str] = frozenset()  # the EXTRA names (no run, no profile: the report says so)


def _names(text: str) -> list[str]:
    return [m for m in re.split(r"[,\s]+", text.strip()) if m]


def choose(a: argparse.Namespace) -> Choice:
    """``--models`` less ``--exclude``, plus ``--extra`` folders; unknown names are errors.

    A member is a detector family, a variant (``yolo@s640``: ``RUN/yolo@s640/``) or borrowed from another
    run (``demo:detectron``: ``runs/demo/detectron/``), whose folds must be this run's fold file (checked,
    refused by name otherwise). A classifier member among ``--models`` is the gate's (as ``--classifier``).
    """
    run = Path(a.run_dir)
    folds_path = Path(a.folds)
    folds = read_folds(folds_path)
    exclude = set(_names(a.exclude))
    detectors = model_table.names("detector")
    asked = _names(a.models) if a.models else detectors
    classifier = None if a.classifier == "none" else a.classifier
    members: list[str] = []
    sources: dict[str, Path] = {}
    for name in asked:
        member = parse_member(name, "--models")
        if model_table.kind(member.family) == "classifier":
            classifier = name  # the gate's classifier, e.g. demo:classifier
            continue
        if member.run:
            check_same_folds(member.folder(run), folds, folds_path, member)
            sources[name] = member.folder(run)
        members.append(name)
    extra: set[str] = set()
    for item in _names(a.extra):
        name, _, path = item.partition("=") if "=" in item else (Path(item).name, "", item)
        if not is_plain_name(name) or name in detectors or name in members or name in sources:
            raise DataError(path, f"--extra name {name!r} must be new and a plain name ({PLAIN_NAME}); a run's own "
                                  f"member is borrowed as RUN:MEMBER in MODELS (e.g. demo:detectron)")
        if not Path(path).is_dir():
            raise DataError(path, "--extra needs a folder with oof.csv and test.csv")
        sources[name] = Path(path)
        extra.add(name)
    known = {*members, *sources, *model_table.names("classifier"), *([classifier] if classifier else [])}
    if exclude - known:
        raise DataError(run, f"--exclude names no model: {sorted(exclude - known)}; models: {sorted(known)}")
    chosen = [m for m in [*members, *extra] if m not in exclude]
    if not chosen:
        raise DataError(run, "no model left to ensemble")
    classifier_dir = None
    if classifier is not None:
        if classifier in exclude or parse_member(classifier, "--classifier").family in exclude:
            classifier = None
        else:
            member = parse_member(classifier, "--classifier")
            if model_table.kind(member.family) != "classifier":
                raise DataError("--classifier", f"{classifier!r} is not a classifier member")
            if member.run:
                check_same_folds(member.folder(run), folds, folds_path, member)
            classifier_dir = member.folder(run)
    return Choice(chosen, {m: p for m, p in sources.items() if m in chosen}, classifier, classifier_dir,
                  frozenset(extra & set(chosen)))


def _inputs(a: argparse.Namespace, c: Choice, data: DataFolder) -> list[Path]:
    run = Path(a.run_dir)
    paths = [c.sources[m] / "oof.csv" if m in c.sources else run / m / "oof.csv" for m in c.models]
    return paths + ([c.classifier_dir / "oof.csv"] if c.classifier_dir else []) + [Path(a.folds), data.root / "train.csv"]


def _publish(path: Path, run: Path) -> None:
    """RUN/ensemble/params.json := the set's parameters (atomically): the ensemble in use."""
    write_json(json.loads(path.read_text()), run / "ensemble" / "params.json")


def tune_set(a: argparse.Namespace) -> None:
    """Tune the chosen set on OOF; writes RUN/ensemble/<set>/{params.json,search.csv}; skips when up to date."""
    data, folds, run = DataFolder(a.data), read_folds(a.folds), Path(a.run_dir)
    c = choose(a)
    out = params_path(run, c.models, c.classifier)
    inputs = _inputs(a, c, data)
    if not a.force and out.exists() and all(p.exists() and p.stat().st_mtime <= out.stat().st_mtime for p in inputs):
        print(f"{out} is newer than its inputs: nothing to tune (--force tunes again)")
        _publish(out, run)
        return
    ids = folds["image_id"].tolist()
    gt = ground_truth(data.labels)
    tables = load_model_tables(run, c.models, "oof", ids, c.sources, data.train_sizes)
    p_abnormal = load_probabilities(c.classifier_dir / "oof.csv", ids) if c.classifier_dir else None
    prior = run / "prior_boxes" / "oof.csv"  # the floor make baseline wrote; computed here only without it
    floor = read_predictions(prior) if prior.exists() else oof_prior(data.fused(), data.train_sizes, folds)
    warnings = weak_members(c.models, tables, gt, ids, floor)
    for line in warnings:
        print(line)
    print(f"tuning on OOF of {len(ids)} images: models {c.models}, gate {c.classifier or 'off'}, {a.jobs} process(es)")
    params, search = tune(tables, c.models, gt, ids, data.train_sizes, p_abnormal, folds=folds, jobs=a.jobs)
    params.warnings = warnings
    params.classifier = c.classifier  # predict-images runs the same classifier member
    left_out = [m for m, w in zip(params.fusion.models, params.fusion.weights) if w == 0]
    if left_out:
        print(f"left out by the tuner (weight 0): {', '.join(left_out)}")
    write_table(search, out.parent / "search.csv")
    write_json(asdict(params), out)  # last: its presence marks the set tuned
    _publish(out, run)
    print(json.dumps(asdict(params), indent=1))


def submit(a: argparse.Namespace) -> None:
    """The tuned set on test: its checked submission and OOF report, kept per set and copied as the latest.

    ``submissions/NAME__<set>.csv`` and ``reports/NAME/<set>/`` belong to the set; then
    ``submissions/NAME.csv`` (a copy) and ``reports/NAME/index.{html,md}`` (the set's page, its
    pictures read from ``<set>/``) are the set submitted last. ``RUN/ensemble/data.json`` records
    the data folder (synthetic or not) for predict-images. Where the data folder has
    ``test_labels.csv``, the submission (and, with the gate on, the ensemble without it) is scored on
    test as ``cxr evaluate`` does: shown in the report, never tuned on. ``RUN/ensemble/<set>/scores.json``:
    ``{"test_map", "test_map_ungated" (gate on only), "nested", "oof"}``, null where not scored.
    """
    data, folds, run = DataFolder(a.data), read_folds(a.folds), Path(a.run_dir)
    c = choose(a)
    path = params_path(run, c.models, c.classifier)
    if not path.exists():
        raise DataError(path, f"no tuned parameters for models {c.models} (gate {c.classifier or 'off'}): "
                              "run make ensemble with the same MODELS/EXCLUDE/EXTRA")
    params = params_from_dict(json.loads(path.read_text()))
    _publish(path, run)
    record_data(run, data.root)
    test_ids = data.test_ids()
    needs_gate = params.gate.rule != "none"
    p_test = load_probabilities(c.classifier_dir / "test.csv", test_ids) if needs_gate else None
    test_tables = load_model_tables(run, c.models, "test", test_ids, c.sources, data.test_sizes)
    test = apply(params, test_tables, data.test_sizes, p_test)
    kind = path.parent.name  # the set's folder name, as in RUN/ensemble/<set>/
    own = Path("submissions") / f"{a.name}__{kind}.csv"
    sample = data.root / "sample_submission.csv"
    write_submission(test, test_ids, own, sample, data.test_sizes)  # checked, or not written
    out = Path("submissions") / f"{a.name}.csv"
    with atomic_path(out) as tmp:
        shutil.copyfile(own, tmp)
    print(f"wrote {own} and {out}: {len(test_ids)} images, {len(test)} rows, checked")
    # the test score, where the data folder has test labels: reported, never tuned on
    labels = data.root / "test_labels.csv"
    test_map: dict[str, float] = {}
    if labels.is_file():
        test_map["ensemble_gated" if needs_gate else "ensemble"] = submission_test_map(labels, own)
        if needs_gate:  # what the gate adds on test: the ungated ensemble, written and scored the same way
            with tempfile.TemporaryDirectory() as scratch:
                plain = apply(replace(params, gate=GateParams()), test_tables, data.test_sizes, None)
                ungated = write_submission(plain, test_ids, Path(scratch) / "ungated.csv", sample, data.test_sizes)
                test_map["ensemble"] = submission_test_map(labels, ungated)
        print(f"test mAP@0.4 ({labels}, never tuned on): "
              + ", ".join(f"{k} {v:.4f}" for k, v in test_map.items()))
    # gate off: the gate search's figures stay in params.json, but the set's scores are the ensemble's alone
    nested, oof = ({k: v for k, v in figures.items() if needs_gate or k != "ensemble_gated"}
                   for figures in (params.nested_map, params.oof_map))
    write_json({"test_map": test_map.get("ensemble_gated" if needs_gate else "ensemble"),
                "test_map_ungated": test_map.get("ensemble") if needs_gate else None,
                "nested": nested, "oof": oof}, path.parent / "scores.json")
    ids = folds["image_id"].tolist()
    oof_tables = load_model_tables(run, c.models, "oof", ids, c.sources, data.train_sizes)
    p_oof = load_probabilities(c.classifier_dir / "oof.csv", ids) if c.classifier_dir else None  # the report's AUC too
    results = dict(zip(c.models, oof_tables))
    results["ensemble"] = apply(replace(params, gate=GateParams()), oof_tables, data.train_sizes, None)
    if needs_gate:  # gate off: no gated row anywhere (it would repeat the ensemble under another name)
        results["ensemble_gated"] = apply(params, oof_tables, data.train_sizes, p_oof)
    prior = run / "prior_boxes" / "oof.csv"  # what make baseline wrote; computed here only without it
    results["prior_boxes"] = read_predictions(prior) if prior.exists() else oof_prior(data.fused(), data.train_sizes, folds)
    search = read_table(path.parent / "search.csv")
    gt = ground_truth(data.labels)
    info = RunInfo(name=a.name, set_name=kind, run=run, models=[m for m in c.models if m not in c.extra],
                   classifier=c.classifier, data=training_data(run, data.root), submission=f"{own} (= {out})", folds=folds)
    reports = Path("reports") / a.name
    summary = write_report(reports / kind, results, gt, ids, data, test, search, params, info=info, latest=reports,
                           p_abnormal=p_oof, test_map=test_map)
    print(f"report: {reports / kind / 'index.html'} (latest: {reports / 'index.html'})")
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["blend"]:
        from ensemble.blend import main as blend_main

        blend_main(argv[1:])
        return
    if argv[:1] == ["runs"]:
        from ensemble.runs import main as runs_main
        runs_main(argv[1:])
        return
    if argv[:1] == ["predict-images"]:
        from ensemble.predict_images import main as predict_images_main

        predict_images_main(argv[1:])
        return
    p = Parser(prog="python -m ensemble", description=__doc__.splitlines()[0])
    p.add_argument("verb", choices=["tune", "submit", "blend", "predict-images"])
    p.add_argument("--data", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--models", default="", help="detectors to fuse, comma/space separated (default: every detector)")
    p.add_argument("--exclude", default="", help="models (or extras, or the classifier) to leave out")
    p.add_argument("--extra", default="", help="folders of models trained elsewhere (oof.csv + test.csv), [NAME=]PATH")
    classifiers = model_table.names("classifier")
    p.add_argument("--classifier", type=plain_name, default=classifiers[0] if classifiers else "none",
                   help="classifier run folder name, or 'none' for no gate")
    p.add_argument("--name", type=plain_name, default="demo", help="submissions/NAME.csv, reports/NAME/ (a plain name)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="processes that fuse candidates (default: every core)")
    p.add_argument("--force", action="store_true", help="tune again even when the parameters are up to date")
    a = p.parse_args(argv)
    with one_line_errors():
        tune_set(a) if a.verb == "tune" else submit(a)


if __name__ == "__main__":
    main()
