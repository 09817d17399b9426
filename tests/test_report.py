"""The run report (ensemble/report.py), what a run was trained on (ensemble/provenance.py) and
``cxr evaluate``'s table. Fast: the fake model tables of tests/test_ensemble.py (``cli_run``), fold
folders holding only the files the report reads, no model trained."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from cxr.cli import main as cxr_main
from cxr.data import DataFolder
from cxr.dataset import CLASS_NAMES, PREDICTION_COLUMNS
from cxr.io import write_table
from cxr.metric import ground_truth
from cxr.predictions import write_predictions
from ensemble.__main__ import main
from ensemble.provenance import model_info, record_data, training_data
from ensemble.report import confusion, plot_training_curves, read_curves
from ensemble.scoring import Truth, score_rows
from tests.test_ensemble import cli_run, table  # noqa: F401  (cli_run: the fixture, shared)
from tests.test_predict_images import screenshot

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SET_A, SET_B = "effdet-yolo+classifier", "yolo"


def fold_logs(run: Path) -> None:
    """Fold folders with what each framework leaves: YOLO's padded results.csv and config.yaml (demo
    profile, epochs 1), detectron2's metrics.json, effdet's metrics.csv with an extra text column,
    the classifier's metrics.csv; yolo fold2 has no log at all."""
    demo = yaml.safe_load((MODELS_DIR / "yolo" / "demo.yaml").read_text())
    for k in range(3):
        fold = run / "yolo" / f"fold{k}"
        fold.mkdir(parents=True)
        (fold / "config.yaml").write_text(yaml.safe_dump({**demo, "epochs": 1, "workers": demo.get("workers", 0),
                                                          "max_det": 10}))
        if k < 2:
            write_table(pd.DataFrame({"                 epoch": [1, 2, 3], "      train/box_loss": [3.0, 2.0, 1.5],
                                      "train/cls_loss": [4.0, 3.0, 2.0], "val/box_loss": [3.5, 2.8, 2.5],
                                      "   metrics/mAP50(B)": [0.01, 0.05, 0.08 + k / 100]}),
                        fold / "train" / "results.csv")
        fold = run / "effdet" / f"fold{k}"
        write_table(pd.DataFrame({"epoch": [1, 2], "train_loss": [2.0, 1.0], "val_loss": [2.5, 1.8],
                                  "val_map": [0.02, 0.04], "note": ["a", "b"]}), fold / "metrics.csv")
        write_table(pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.5], "val_auc": [0.6, 0.7 + k / 50]}),
                    run / "classifier" / f"fold{k}" / "metrics.csv")
    (run / "detectron" / "fold0" / "train").mkdir(parents=True)
    lines = [{"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.5, "val_loss": 1.7, "val_map": 0.03}]
    (run / "detectron" / "fold0" / "train" / "metrics.json").write_text("\n".join(map(json.dumps, lines)) + "\n")


def links(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page.read_text())


def test_two_model_sets_keep_their_reports_and_submissions(cli_run, tmp_path):  # noqa: F811
    *_, run, common = cli_run
    fold_logs(run)
    main(["tune", *common, "--exclude", "detectron"])
    main(["submit", *common, "--exclude", "detectron", "--name", "t"])
    subs, reports = tmp_path / "submissions", tmp_path / "reports" / "t"
    first_sub, first_page = (subs / f"t__{SET_A}.csv").read_bytes(), (reports / SET_A / "index.html").read_bytes()
    assert (subs / "t.csv").read_bytes() == first_sub
    main(["tune", *common, "--models", "yolo", "--classifier", "none"])
    main(["submit", *common, "--models", "yolo", "--classifier", "none", "--name", "t"])
    # the second set has its own files; the first set's are untouched; the plain names are the latest
    assert (subs / f"t__{SET_A}.csv").read_bytes() == first_sub
    assert (reports / SET_A / "index.html").read_bytes() == first_page
    assert (subs / "t.csv").read_bytes() == (subs / f"t__{SET_B}.csv").read_bytes()
    assert (reports / "summary.json").read_text() == (reports / SET_B / "summary.json").read_text()
    latest = (reports / "index.html").read_text()
    assert "model set yolo<" in latest and f'href="{SET_A}/index.html"' in latest and 'href="yolo/index.html"' in latest
    for page in (reports / "index.html", reports / SET_A / "index.html", reports / SET_B / "index.html",
                 reports / "index.md"):
        targets = links(page) if page.suffix == ".html" else re.findall(r"\]\(([^)]+)\)", page.read_text())
        assert targets and not [t for t in targets if t.startswith(("http:", "https:", "//"))], "offline"
        missing = [t for t in targets if not (page.parent / t.replace("%2B", "+")).is_file()]
        assert not missing, f"{page}: links to missing files {missing}"
    assert "model set yolo" in (reports / "index.md").read_text()


def test_report_names_the_ensemble_and_explains_its_numbers(cli_run, tmp_path):  # noqa: F811
    data, gt, *_, run, common = cli_run
    fold_logs(run)
    main(["tune", *common, "--exclude", "detectron"])
    main(["submit", *common, "--exclude", "detectron", "--name", "t"])
    params = json.loads((run / "ensemble" / "params.json").read_text())
    out = tmp_path / "reports" / "t" / SET_A
    page = (out / "index.html").read_text()
    f, g = params["fusion"], params["gate"]
    for text in ("These models were trained on SYNTHETIC demo images", "fused models (weight)",
                 ", ".join(f"{m} {w:g}" for m, w in zip(f["models"], f["weights"])),
                 f"iou_thr {f['iou_thr']:g}, skip_box_thr {f['skip_box_thr']:g}, conf_type {f['conf_type']}",
                 f"{g['rule']}:", "the gap between them is not optimism", "nested", "Confusion matrix",
                 "ground truth (left) and predictions (right)", "Training curves", f"submissions/t__{SET_A}.csv"):
        assert text in page, text
    demo_epochs = yaml.safe_load((MODELS_DIR / "yolo" / "demo.yaml").read_text())["epochs"]
    assert f"demo profile (epochs {demo_epochs} -&gt; 1), 3 folds" in page
    # the three mAP columns: pooled = summary.json, fold mean of the untuned = tune's nested figure,
    # honest fold mean of the ensembles = the nested search
    scores = pd.read_csv(out / "scores.csv").set_index("predictions")
    summary = json.loads((out / "summary.json").read_text())
    assert scores["pooled_map"].to_dict() == pytest.approx(summary)
    for m in ("yolo", "effdet"):
        assert scores.loc[m, "fold_mean_map"] == pytest.approx(params["nested_map"][m])
        assert scores.loc[m, "honest_fold_mean_map"] == scores.loc[m, "fold_mean_map"]
    for m in ("ensemble", "ensemble_gated"):
        assert scores.loc[m, "honest_fold_mean_map"] == pytest.approx(params["nested_map"][m])
        assert scores.loc[m, [f"fold{k}_nested_map" for k in range(3)]].tolist() == pytest.approx(params["nested_folds"][m])
    ap = pd.read_csv(out / "per_class_ap.csv").set_index("class")
    assert list(ap.index) == list(CLASS_NAMES) and {"yolo", "yolo@fold0", "ensemble_gated@fold2"} <= set(ap.columns)
    # the confusion matrix's diagonal holds the metric's true positives above its threshold
    threshold = float(re.search(r"score &gt;= ([0-9.]+) \(the score of its best F1", page).group(1))
    matrix = pd.read_csv(out / "confusion.csv").set_index("ground truth")
    gated = json.loads((out / "summary.json").read_text())["ensemble_gated"]
    assert gated > 0.5
    assert matrix.shape == (16, 16) and matrix.loc["spurious", "missed"] == 0
    gt_boxes = gt.groupby("class_id").size()
    assert matrix.drop(index="spurious").sum(axis=1).tolist() == [gt_boxes.get(c, 0) for c in range(15)]
    assert np.trace(matrix.to_numpy()[:15, :15]) > 0 and threshold > 0
    # training curves: every framework's log drawn, a fold without one named
    assert (out / "curves_yolo.png").is_file() and (out / "curves_effdet.png").is_file()
    assert "fold2: no curve file" in page and (out / "curves_classifier.png").is_file()
    assert json.loads((run / "ensemble" / "data.json").read_text())["synthetic"] is True
    assert len(list(out.glob("oof_*.png"))) == 6 and list(out.glob("test_*.png"))
    # the gate's effect in the main table: the ensemble without and with it, pooled and nested
    md = (out / "index.md").read_text()
    for name, label in (("ensemble", "ensemble, without the gate"),
                        ("ensemble_gated", f"ensemble_gated, with the {g['rule']} gate (submitted)")):
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"{summary[name]:.4f}" in row and f"{params['nested_map'][name]:.4f}" in row, row
    assert "<b>The gate</b>" in page
    # the classifier's OOF ROC AUC, pooled and per fold, as sklearn computes it
    auc = pd.read_csv(out / "classifier_auc.csv").set_index("images")
    p_abnormal = pd.read_csv(run / "classifier" / "oof.csv", dtype={"image_id": str}).set_index("image_id")
    p_abnormal = p_abnormal["p_abnormal"]
    abnormal = set(gt.loc[gt["class_id"] != 14, "image_id"])
    folds = pd.read_csv(common[3], dtype={"image_id": str})
    per_fold = [(f"fold {k}", f["image_id"]) for k, f in folds.groupby("fold")]
    subsets = [("all folds, pooled", folds["image_id"]), *per_fold]
    for name, ids in subsets:
        expected = roc_auc_score([i in abnormal for i in ids], p_abnormal.loc[ids])
        assert auc.loc[name, "roc_auc"] == pytest.approx(expected)
        assert f"{expected:.4f}" in page
    assert "Classifier classifier: OOF ROC AUC" in page
    # the test score (synth data has test_labels.csv): cxr evaluate's figure, labelled as test
    scores_json = json.loads((run / "ensemble" / SET_A / "scores.json").read_text())
    labels = data.root / "test_labels.csv"
    assert scores_json["test_map"] == pytest.approx(evaluate_json(labels, tmp_path / "submissions" / "t.csv"))
    assert scores_json["test_map_ungated"] is not None and scores_json["nested"] == params["nested_map"]
    assert scores_json["oof"] == params["oof_map"]
    assert "test mAP@0.4 (test labels, never tuned on)" in page and f"{scores_json['test_map']:.4f}" in page
    assert scores.loc["ensemble_gated", "test_map"] == pytest.approx(scores_json["test_map"])


def evaluate_json(labels: Path, submission: Path) -> float:
    """``cxr evaluate --json``'s mAP of a submission (what make evaluate prints)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cxr_main(["evaluate", "--labels", str(labels), "--submission", str(submission), "--json"])
    return json.loads(buf.getvalue())["map"]


def test_report_with_the_gate_off_says_nothing_gated_and_names_weak_members(cli_run, tmp_path, capsys):  # noqa: F811
    """A classifier that knows nothing (P(abnormal) 0.5 everywhere) loses to no gate: no gated row, curve or word
    in the report, the submission is the ensemble; a member with only No-finding rows is named in a warning block;
    the AUC table and the test score are there, scores.json has no ungated figure."""
    data, gt, good, *_, run, common = cli_run
    folds = pd.read_csv(common[3], dtype={"image_id": str})
    write_table(pd.DataFrame({"image_id": folds["image_id"], "p_abnormal": 0.5}), run / "classifier" / "oof.csv")
    ids = good["image_id"].unique()
    write_predictions(table([[i, 14, 0.5, 0, 0, 1, 1] for i in ids]), run / "detectron" / "oof.csv", data.train_sizes)
    main(["tune", *common, "--models", "yolo,detectron"])
    main(["submit", *common, "--models", "yolo,detectron", "--name", "off"])
    out = capsys.readouterr().out
    kind = "detectron-yolo+classifier"
    params = json.loads((run / "ensemble" / kind / "params.json").read_text())
    assert params["gate"]["rule"] == "none"
    reports = tmp_path / "reports" / "off"
    pages = [folder / name for folder in (reports, reports / kind) for name in ("index.md", "index.html")]
    for page in pages:
        text = page.read_text()
        assert "gated" not in text.lower(), page
        assert "Weak ensemble members" in text and "member detectron has no finding boxes" in text
        assert "ensemble (submitted)" in text and "OOF ROC AUC" in text
    assert "warning: member detectron has no finding boxes" in out
    scores = pd.read_csv(reports / kind / "scores.csv")
    assert "ensemble_gated" not in set(scores["predictions"]) and "ensemble" in set(scores["predictions"])
    assert "ensemble_gated" not in json.loads((reports / kind / "summary.json").read_text())
    assert "ensemble_gated" not in json.loads((reports / kind / "nested.json").read_text())["nested_map"]
    assert pd.read_csv(reports / kind / "classifier_auc.csv")["roc_auc"].tolist() == pytest.approx([0.5] * 5)
    scores_json = json.loads((run / "ensemble" / kind / "scores.json").read_text())
    assert scores_json["test_map_ungated"] is None
    assert "ensemble_gated" not in {*scores_json["nested"], *scores_json["oof"]}
    assert scores_json["nested"]["ensemble"] == params["nested_map"]["ensemble"]
    labels = data.root / "test_labels.csv"
    assert scores_json["test_map"] == pytest.approx(evaluate_json(labels, tmp_path / "submissions" / "off.csv"))
    assert f"{scores_json['test_map']:.4f}" in (reports / "index.md").read_text()


def test_report_shows_the_runs_ablation(cli_run, tmp_path):  # noqa: F811
    """The run's ablation (bench/levers.py's runs/NAME/ablation.json and .md) is in every report page of the run,
    the latest set's included; a run without one has no such section."""
    *_, run, common = cli_run
    main(["tune", *common, "--models", "yolo", "--classifier", "none"])
    main(["submit", *common, "--models", "yolo", "--classifier", "none", "--name", "plain"])
    assert "Ablation" not in (tmp_path / "reports" / "plain" / "index.html").read_text()
    rows = [{"lever": "none", "member": "yolo", "what": "as it is", "fold_mean": 0.19, "test": None,
             "ensemble": 0.46, "ensemble_instead": None, "seconds": None},
            {"lever": "tta", "member": "yolo@tta", "what": "multi-scale TTA", "fold_mean": 0.2012, "test": 0.3,
             "ensemble": 0.4711, "ensemble_instead": 0.4655, "seconds": 61}]
    (run / "ablation.json").write_text(json.dumps({"run": run.name, "family": "yolo", "rows": rows}))
    (run / "ablation.md").write_text("| lever | member |\n| --- | --- |\n| tta | yolo@tta |\n")
    main(["submit", *common, "--models", "yolo", "--classifier", "none", "--name", "abl"])
    reports = tmp_path / "reports" / "abl"
    for page in (reports / "index.html", reports / SET_B / "index.html"):
        text = page.read_text()
        assert f"Ablation: the winners' levers on {run.name}" in text, page
        assert "<td>0.4711</td><td>0.4655</td><td>0.3000</td><td>61</td>" in text, page
    assert "| tta | yolo@tta |" in (reports / "index.md").read_text()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(cli_run, tmp_path):  # noqa: F811
    """The page with its pictures, then without them: the figures are what makes it dark."""
    *_, run, common = cli_run
    fold_logs(run)
    main(["tune", *common, "--exclude", "detectron"])
    main(["submit", *common, "--exclude", "detectron", "--name", "t"])
    shot = screenshot(tmp_path / "reports" / "t" / "index.html", tmp_path / "report.png", height=6000)
    colour = cv2.imread(str(tmp_path / "report.png"))
    assert (colour[:300] == (32, 0, 176)).all(axis=2).sum() > 500, "the red synthetic-data warning is at the top"
    stripped = tmp_path / "stripped"
    shutil.copytree(tmp_path / "reports" / "t", stripped, ignore=shutil.ignore_patterns("*.png"))
    bare = screenshot(stripped / "index.html", tmp_path / "bare.png", height=6000)
    # the figures (PR panels, confusion matrix, radiographs, curves) add many non-background pixels
    assert (shot < 200).mean() > (bare < 200).mean() + 0.1


def test_confusion_matrix_known_answer():
    gt = table([["a", 3, 1, 10, 10, 50, 50], ["a", 5, 1, 60, 60, 90, 90], ["a", 0, 1, 0, 60, 20, 90],
                ["b", 14, 1, 0, 0, 1, 1]]).drop(columns="score")
    preds = table([["a", 3, 0.9, 11, 11, 50, 50],    # its own class: true positive
                   ["a", 3, 0.8, 10, 10, 49, 49],    # a duplicate of the taken box: spurious
                   ["a", 7, 0.7, 60, 60, 91, 91],    # on the class 5 box: a confusion 5 -> 7
                   ["a", 2, 0.6, 100, 100, 120, 120],  # nothing there: spurious
                   ["a", 0, 0.1, 0, 60, 20, 90],     # below the threshold: not counted, so class 0 is missed
                   ["b", 14, 0.7, 0, 0, 1, 1]])      # No finding found
    m = confusion(gt, preds, threshold=0.5)
    assert m.loc["Cardiomegaly", "Cardiomegaly"] == 1 and m.loc["ILD", "Lung Opacity"] == 1
    assert m.loc["Aortic enlargement", "missed"] == 1 and m.loc["No finding", "No finding"] == 1
    assert m.loc["spurious", "Cardiomegaly"] == 1 and m.loc["spurious", "Calcification"] == 1
    assert m.to_numpy().sum() == 6


def test_training_curves_read_every_framework_log(tmp_path):
    run = tmp_path / "run"
    fold_logs(run)
    t, source = read_curves(run / "yolo" / "fold0")
    assert source == "train/results.csv" and "metrics/mAP50(B)" in t.columns and "epoch" in t.columns  # names stripped
    t, source = read_curves(run / "effdet" / "fold0")
    assert source == "metrics.csv" and "note" not in t.columns and t["val_map"].tolist() == [0.02, 0.04]
    t, source = read_curves(run / "detectron" / "fold0")
    assert source == "train/metrics.json" and t["val_map"].dropna().tolist() == [0.03]
    missing = f"no curve file (metrics.csv, train/results.csv, train/metrics.json) in {run / 'yolo' / 'fold2'}"
    assert read_curves(run / "yolo" / "fold2") == (None, missing)
    (run / "detectron" / "fold1" / "tb").mkdir(parents=True)
    (run / "detectron" / "fold1" / "tb" / "events.out.tfevents.1.host").write_bytes(b"")
    assert "only TensorBoard files" in read_curves(run / "detectron" / "fold1")[1]
    (run / "effdet" / "fold2" / "metrics.csv").write_text("epoch,val_map\n")  # written before the first epoch ended
    assert read_curves(run / "effdet" / "fold2")[0] is None
    path, note = plot_training_curves(run, "yolo", tmp_path / "yolo.png")
    assert path.is_file() and "fold2: no curve file" in note
    path, note = plot_training_curves(run, "effdet", tmp_path / "effdet.png")
    assert path.is_file() and "metrics.csv" in note
    assert plot_training_curves(run, "nothing", tmp_path / "x.png") == (None, f"no fold folder in {run / 'nothing'}")


def test_training_data_and_profiles(tmp_path, synth_dir):
    run = tmp_path / "run"
    fold_logs(run)
    real = tmp_path / "real"
    real.mkdir()
    assert training_data(run, synth_dir).synthetic and "SYNTHETIC" in training_data(run, synth_dir).warning()
    assert training_data(run, real).synthetic is False and training_data(run, real).warning() == ""
    assert training_data(run).path is None and "unknown" in training_data(run).describe()
    record_data(run, synth_dir)  # what submit records: a demo run later pointed at a real folder stays a demo run
    assert training_data(run).synthetic and training_data(run, real).synthetic
    demo = yaml.safe_load((MODELS_DIR / "yolo" / "demo.yaml").read_text())
    info = model_info(run, "yolo")
    assert info.profile == "demo" and info.folds == [0, 1, 2] and info.changes == {"epochs": (demo["epochs"], 1)}
    assert info.describe() == f"demo profile (epochs {demo['epochs']} -> 1), 3 folds"
    assert model_info(run, "effdet").profile == "unknown"
    # a fold predicted from the epoch that scored best on that same fold (predict.yaml, written by predict)
    (run / "yolo" / "fold1" / "predict.yaml").write_text("checkpoint: best\ntta: false\n")
    (run / "yolo" / "fold2" / "predict.yaml").write_text("checkpoint: last\ntta: false\n")
    assert model_info(run, "yolo").best_on_fold == [1]
    assert "OPTIMISTIC OOF: fold(s) 1" in model_info(run, "yolo").describe()


def test_evaluate_prints_a_table_with_class_names(synth_dir, tmp_path, capsys):
    truth = ground_truth(DataFolder(synth_dir).labels)
    preds = truth.assign(score=0.9)[PREDICTION_COLUMNS]
    preds = preds[preds["class_id"] != 3]  # Cardiomegaly missed
    path = tmp_path / "preds.csv"
    write_table(preds, path)
    labels = str(synth_dir / "train.csv")
    cxr_main(["evaluate", "--labels", labels, "--submission", str(path)])
    out = capsys.readouterr().out
    assert re.search(r"^Cardiomegaly +0\.0000 +\d+ +0$", out, re.MULTILINE), out
    assert re.search(r"^No finding +1\.0000 +\d+ +\d+$", out, re.MULTILINE) and re.search(r"^mAP@0\.4 +0\.\d{4}\b", out, re.MULTILINE)
    assert not re.search(r"\d\.\d{5,}", out), "4 decimals, not 16"
    cxr_main(["evaluate", "--labels", labels, "--submission", str(path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["ap"]["3"] == 0.0 and result["ap"]["14"] == 1.0
    assert result["map"] == pytest.approx(score_rows(Truth(truth, sorted(truth["image_id"].unique())), preds).map())
