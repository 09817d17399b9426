"""``python -m ensemble tune|submit``: tune WBF + gate on OOF, then write the submission and the report.

    python -m ensemble tune   --data D --folds F --run-dir runs/NAME [--models yolo,detectron,effdet] [--exclude effdet]
    python -m ensemble submit --data D --folds F --run-dir runs/NAME --name NAME   # submissions/NAME.csv, reports/NAME/
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from cxr.baseline import oof_prior
from cxr.data import DataFolder, read_folds
from cxr.io import DataError, read_table, write_json, write_table
from cxr.metric import ground_truth
from cxr.submission import check_submission, write_submission
from ensemble.ensemble import apply, load_model_tables, load_probabilities, params_from_dict, tune
from ensemble.report import write_report

DETECTORS = ("yolo", "detectron", "effdet")


def _models(a: argparse.Namespace) -> list[str]:
    models = [m for m in a.models.split(",") if m and m not in set(a.exclude.split(","))]
    if not models:
        raise DataError(a.run_dir, "no model left to ensemble")
    return models


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ensemble", description=__doc__.splitlines()[0])
    p.add_argument("verb", choices=["tune", "submit"])
    p.add_argument("--data", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--models", default=",".join(DETECTORS))
    p.add_argument("--exclude", default="", help="comma-separated models to leave out")
    p.add_argument("--classifier", default="classifier", help="classifier run folder name, or 'none' for no gate")
    p.add_argument("--name", default="demo")
    a = p.parse_args(argv)
    try:
        data, folds, run = DataFolder(a.data), read_folds(a.folds), Path(a.run_dir)
        ids = folds["image_id"].tolist()
        gt = ground_truth(data.labels)
        cls = None if a.classifier == "none" else run / a.classifier
        if a.verb == "tune":
            models = _models(a)
            tables = load_model_tables(run, models, "oof", ids)
            p_abnormal = load_probabilities(cls / "oof.csv", ids) if cls else None
            print(f"tuning on OOF of {len(ids)} images: models {models}, gate {'on' if cls else 'off'}")
            params, search = tune(tables, models, gt, ids, data.train_sizes, p_abnormal)
            write_json(asdict(params), run / "ensemble" / "params.json")
            write_table(search, run / "ensemble" / "search.csv")
            print(json.dumps(asdict(params), indent=1))
            return
        params = params_from_dict(json.loads((run / "ensemble" / "params.json").read_text()))
        test_ids = data.test_ids()
        models = params.fusion.models
        needs_gate = params.gate.rule != "none"
        p_test = load_probabilities(cls / "test.csv", test_ids) if needs_gate else None
        test = apply(params, load_model_tables(run, models, "test", test_ids), data.test_sizes, p_test)
        out = Path("submissions") / f"{a.name}.csv"
        write_submission(test, test_ids, out)
        problems = check_submission(out, data.root / "sample_submission.csv", data.test_sizes)
        if problems:
            print("\n".join(problems))
            sys.exit(1)
        print(f"wrote {out}: {len(test_ids)} images, {len(test)} rows, checked")
        oof_tables = load_model_tables(run, models, "oof", ids)
        p_oof = load_probabilities(cls / "oof.csv", ids) if cls and (cls / "oof.csv").exists() else None
        results = {m: t for m, t in zip(models, oof_tables)}
        ungated = type(params)(params.fusion)
        results["ensemble"] = apply(ungated, oof_tables, data.train_sizes, None)
        results["ensemble_gated"] = apply(params, oof_tables, data.train_sizes, p_oof)
        results["prior_boxes"] = oof_prior(data.fused(), data.train_sizes, folds)
        search = read_table(run / "ensemble" / "search.csv")
        summary = write_report(Path("reports") / a.name, results, gt, ids, data, test, search)
        print(json.dumps(summary))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
