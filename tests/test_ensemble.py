"""Ensemble: fusion and gate on hand-made predictions (known answers), tuning, submission, report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import DataError, write_table
from cxr.metric import ground_truth
from cxr.predictions import write_predictions
from cxr.submission import check_submission
from ensemble.__main__ import main
from ensemble.ensemble import GateParams, gate, load_model_tables, tune

COLS = ["image_id", "class_id", "score", "x_min", "y_min", "x_max", "y_max"]


def table(rows):
    return pd.DataFrame(rows, columns=COLS)


def test_soft_gate_replaces_no_finding_rows():
    preds = table([["a", 3, 0.8, 10, 10, 50, 50], ["a", 14, 0.2, 0, 0, 1, 1], ["b", 14, 0.9, 0, 0, 1, 1]])
    p = pd.Series({"a": 0.9, "b": 0.05})
    out = gate(preds, p, GateParams("soft"))
    assert out.loc[out["class_id"] == 14].set_index("image_id")["score"].to_dict() == pytest.approx({"a": 0.1, "b": 0.95})
    assert out.loc[out["class_id"] == 3, "score"].tolist() == [0.8]


def test_hard_gate_drops_scales_keeps():
    preds = table([["keep", 3, 0.8, 10, 10, 50, 50], ["mid", 3, 0.8, 10, 10, 50, 50], ["drop", 3, 0.8, 10, 10, 50, 50]])
    p = pd.Series({"keep": 0.9, "mid": 0.5, "drop": 0.05})  # p_normal 0.1, 0.5, 0.95
    out = gate(preds, p, GateParams("hard", low=0.3, high=0.9))
    boxes = out[out["class_id"] == 3].set_index("image_id")["score"]
    assert boxes.to_dict() == pytest.approx({"keep": 0.8, "mid": 0.8 * 0.5})
    assert out.loc[out["class_id"] == 14].set_index("image_id")["score"].to_dict() == pytest.approx(
        {"keep": 0.1, "mid": 0.5, "drop": 0.95})


def fake_models(synth_dir, seed=0):
    """'good' = ground-truth boxes with small jitter and its own No-finding row; 'noisy' = random boxes."""
    data = DataFolder(synth_dir)
    gt = ground_truth(data.labels)
    rng = np.random.default_rng(seed)
    sizes = data.train_sizes.set_index("image_id")
    good, noisy = [], []
    for image_id, g in gt.groupby("image_id"):
        w, h = sizes.loc[image_id, ["width", "height"]]
        finding = g[g["class_id"] != 14]
        for r in finding.itertuples():
            jitter = rng.normal(0, 0.05, 4) * np.array([r.x_max - r.x_min, r.y_max - r.y_min] * 2)
            box = np.clip(np.array([r.x_min, r.y_min, r.x_max, r.y_max]) + jitter, 0, [w, h, w, h])
            good.append([image_id, r.class_id, rng.uniform(0.3, 1.0), *box])
        for _ in range(2):  # false positives in every image
            x, y = rng.uniform(0, 0.7, 2) * [w, h]
            good.append([image_id, int(rng.integers(0, 14)), rng.uniform(0, 0.6), x, y, x + 0.2 * w, y + 0.2 * h])
            x, y = rng.uniform(0, 0.7, 2) * [w, h]
            noisy.append([image_id, int(rng.integers(0, 14)), rng.uniform(0, 1), x, y, x + 0.2 * w, y + 0.2 * h])
        good.append([image_id, 14, 0.3 if len(finding) else 0.7, 0, 0, 1, 1])
        noisy.append([image_id, 14, rng.uniform(), 0, 0, 1, 1])
    p_abnormal = gt.groupby("image_id")["class_id"].min().map(lambda c: 0.1 if c == 14 else 0.9)
    p_abnormal = (p_abnormal + rng.normal(0, 0.05, len(p_abnormal))).clip(0, 1)
    return data, gt, table(good), table(noisy), p_abnormal


def test_tuning_never_lowers_oof_map_and_finds_the_good_model(synth_dir):
    data, gt, good, noisy, p_abnormal = fake_models(synth_dir)
    ids = sorted(gt["image_id"].unique())
    params, search = tune([good, noisy], ["good", "noisy"], gt, ids, data.train_sizes, p_abnormal,
                          iou_grid=(0.5,), skip_grid=(0.0,), weight_grid=(1.0, 4.0), gate_grid=(0.0, 0.5, 0.9, 1.0))
    default = search.iloc[0]["map"]
    assert params.oof_map["ensemble"] >= default
    assert params.oof_map["ensemble_gated"] >= params.oof_map["ensemble"]
    assert params.fusion.weights[0] > params.fusion.weights[1]  # trusts the good model more
    assert params.gate.rule in ("soft", "hard")
    assert {"stage", "weights", "iou_thr", "conf_type", "rule", "map"} <= set(search.columns)
    assert params.oof_map["good"] > params.oof_map["noisy"]


def test_cli_tune_submit_report_and_missing_images(synth_dir, tmp_path, monkeypatch, capsys):
    data, gt, good, noisy, p_abnormal = fake_models(synth_dir, seed=1)
    folds = tmp_path / "folds.csv"
    write_table(make_folds(data.labels, n_folds=3, seed=0), folds)
    run = tmp_path / "runs" / "t"
    test_ids = data.test_ids()
    rng = np.random.default_rng(2)
    test_rows = []
    for i in test_ids:
        w, h = data.test_sizes.set_index("image_id").loc[i, ["width", "height"]]
        test_rows += [[i, 3, rng.uniform(), 0.3 * w, 0.5 * h, 0.7 * w, 0.8 * h], [i, 14, 0.5, 0, 0, 1, 1]]
    for name, oof in (("yolo", good), ("effdet", noisy), ("detectron", noisy)):
        write_predictions(oof, run / name / "oof.csv", data.train_sizes)
        write_predictions(table(test_rows), run / name / "test.csv", data.test_sizes)
    write_table(p_abnormal.rename("p_abnormal").rename_axis("image_id").reset_index(), run / "classifier" / "oof.csv")
    write_table(pd.DataFrame({"image_id": test_ids, "p_abnormal": 0.5}), run / "classifier" / "test.csv")
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(synth_dir), "--folds", str(folds), "--run-dir", str(run)]
    main(["tune", *common, "--exclude", "detectron"])
    params = json.loads((run / "ensemble" / "params.json").read_text())
    assert params["fusion"]["models"] == ["yolo", "effdet"]  # left out by name
    main(["submit", *common, "--name", "t"])
    assert check_submission(tmp_path / "submissions" / "t.csv", synth_dir / "sample_submission.csv", data.test_sizes) == []
    summary = json.loads((tmp_path / "reports" / "t" / "summary.json").read_text())
    assert {"yolo", "effdet", "ensemble", "ensemble_gated", "prior_boxes"} == set(summary)
    assert summary["ensemble_gated"] >= summary["ensemble"] and summary["yolo"] > summary["prior_boxes"]
    report = (tmp_path / "reports" / "t" / "index.md").read_text()
    assert "Per-class AP" in report and (tmp_path / "reports" / "t" / "pr_curves.png").exists()
    assert list((tmp_path / "reports" / "t").glob("test_*.png"))

    # a model with a hole: clear error naming the model and the split
    holed = good[good["image_id"] != good["image_id"].iloc[0]]
    write_predictions(holed, run / "yolo" / "oof.csv", data.train_sizes)
    with pytest.raises(DataError, match="model 'yolo' has no prediction for 1 oof image"):
        load_model_tables(run, ["yolo"], "oof", sorted(gt["image_id"].unique()))
    with pytest.raises(SystemExit):
        main(["tune", *common])
    assert "model 'yolo' has no prediction" in capsys.readouterr().err
