"""Ensemble: fusion and gate on hand-made predictions (known answers), fast scoring against the metric,
tuning (nested OOF, processes), model sets, outside models, submission, report."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import DataError, write_table
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import write_predictions
from cxr.submission import check_submission, write_submission
from ensemble.__main__ import main
from cxr.wbf import CONF_TYPES, fuse_predictions
from ensemble.ensemble import FusionParams, GateParams, apply, fuse, gate, load_model_tables, tune
from ensemble.scoring import Truth, gated, score_rows

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


def test_weight_zero_leaves_a_member_out(synth_dir):
    """A member of weight 0 is no part of the fusion: fuse() equals fusing the other tables alone, for every
    conf type (fused at weight 0 its boxes would still join clusters and count in the rescaling)."""
    data, gt, good, noisy, _ = fake_models(synth_dir, seed=7)
    shifted = good.assign(x_min=good["x_min"] + 1, score=good["score"] * 0.9)
    tables, sizes = [good, noisy, shifted], data.train_sizes
    for conf in CONF_TYPES:
        p = FusionParams(["good", "noisy", "shifted"], [2.0, 0.0, 1.0], 0.5, 0.0, conf)
        expected = fuse_predictions([good, shifted], sizes, [2.0, 1.0], 0.5, 0.0, conf)
        pd.testing.assert_frame_equal(fuse(tables, sizes, p), expected)
    alone = FusionParams(["good", "noisy", "shifted"], [0.0, 3.0, 0.0])  # one member left, avg: its own table
    pd.testing.assert_frame_equal(fuse(tables, sizes, alone), noisy)
    with pytest.raises(ValueError, match="every member has weight 0"):
        fuse(tables, sizes, FusionParams(["good", "noisy", "shifted"], [0.0, 0.0, 0.0]))


def test_tuner_gives_a_noise_member_weight_zero_and_scores_it_as_the_metric(synth_dir):
    """The default weight grid holds 0: a member of pure noise is left out, the good one kept; every
    candidate with a zero weight scores what cxr.metric gives the fused table (the fast path leaves the
    member out as fuse() does), and no candidate has every weight 0."""
    data, gt, good, noisy, _ = fake_models(synth_dir, seed=8)
    ids = sorted(gt["image_id"].unique())
    tables = [good, noisy]
    params, search = tune(tables, ["good", "noisy"], gt, ids, data.train_sizes, None, iou_grid=(0.5,),
                          skip_grid=(0.0, 0.05), log=lambda _: None)
    assert params.fusion.weights[1] == 0 and params.fusion.weights[0] > 0
    assert params.oof_map["ensemble"] > max(search.loc[search["stage"] == "fusion", "map"])
    assert "ensemble_gated" not in params.oof_map  # no classifier: no gated figure to repeat the ensemble
    search = search.assign(weights=search["weights"].map(tuple))
    assert (0.0, 1.0) in set(search["weights"]) and not any(sum(w) == 0 for w in search["weights"])
    zero = search[search["weights"].map(lambda w: 0.0 in w)]
    zero = zero.drop_duplicates(["weights", "iou_thr", "skip_box_thr", "conf_type"])
    assert len(zero) >= 2
    for r in zero.itertuples():
        p = FusionParams(["good", "noisy"], list(r.weights), r.iou_thr, r.skip_box_thr, r.conf_type)
        fused = fuse(tables, data.train_sizes, p)
        assert r.map == pytest.approx(mean_average_precision(gt, fused, ids)["map"], abs=1e-12), r


@pytest.fixture
def cli_run(synth_dir, tmp_path, monkeypatch):
    """Three detectors' and the classifier's OOF/test tables in tmp/runs/t, the cwd in tmp."""
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
    # spread over the upper half: whatever gate the tuner picks, the most abnormal-looking test images keep boxes
    write_table(pd.DataFrame({"image_id": test_ids, "p_abnormal": np.linspace(0.5, 1.0, len(test_ids))}),
                run / "classifier" / "test.csv")
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(synth_dir), "--folds", str(folds), "--run-dir", str(run), "--jobs", "1"]
    return data, gt, good, noisy, table(test_rows), run, common


def test_cli_tune_submit_report_and_missing_images(cli_run, tmp_path, capsys):
    data, gt, good, noisy, _, run, common = cli_run
    synth_dir = data.root
    main(["tune", *common, "--exclude", "detectron"])
    params = json.loads((run / "ensemble" / "params.json").read_text())
    assert params["fusion"]["models"] == ["yolo", "effdet"]  # left out by name
    assert (run / "ensemble" / "effdet-yolo+classifier" / "params.json").exists()
    assert set(params["nested_map"]) == {"yolo", "effdet", "ensemble", "ensemble_gated"}
    assert all(len(v) == 3 for v in params["nested_folds"].values())  # one figure per fold
    main(["submit", *common, "--exclude", "detectron", "--name", "t"])
    assert check_submission(tmp_path / "submissions" / "t.csv", synth_dir / "sample_submission.csv", data.test_sizes) == []
    summary = json.loads((tmp_path / "reports" / "t" / "summary.json").read_text())
    assert {"yolo", "effdet", "ensemble", "ensemble_gated", "prior_boxes"} == set(summary)
    assert summary["ensemble_gated"] >= summary["ensemble"] and summary["yolo"] > summary["prior_boxes"]
    report = (tmp_path / "reports" / "t" / "index.md").read_text()  # the latest set's page; its files in <set>/
    own = tmp_path / "reports" / "t" / "effdet-yolo+classifier"
    assert "Per-class AP" in report and (own / "pr_curves.png").exists() and (own / "index.html").exists()
    assert "nested" in report and f"{params['nested_map']['ensemble_gated']:.4f}" in report
    assert list(own.glob("test_*.png")) and (tmp_path / "submissions" / "t__effdet-yolo+classifier.csv").exists()
    # another set is not tuned yet: submit says so
    with pytest.raises(SystemExit) as e:
        main(["submit", *common, "--models", "yolo", "--name", "t"])
    assert e.value.code == 2 and "no tuned parameters for models ['yolo']" in capsys.readouterr().err

    # a model with a hole: clear error naming the model and the split
    holed = good[good["image_id"] != good["image_id"].iloc[0]]
    write_predictions(holed, run / "yolo" / "oof.csv", data.train_sizes)
    with pytest.raises(DataError, match="model 'yolo' has no prediction for 1 oof image"):
        load_model_tables(run, ["yolo"], "oof", sorted(gt["image_id"].unique()))
    with pytest.raises(SystemExit):
        main(["tune", *common])
    assert "model 'yolo' has no prediction" in capsys.readouterr().err


def only_no_finding(table_, seed=0):
    """A member that predicts nothing but a No-finding row per image (a failed training): random scores."""
    ids = table_["image_id"].unique()
    rng = np.random.default_rng(seed)
    return table([[i, 14, s, 0, 0, 1, 1] for i, s in zip(ids, rng.uniform(size=len(ids)))])


def test_cli_tune_names_weak_members_and_leaves_noise_out(cli_run, capsys):
    """tune names the member without a finding box and the one under the prior-box floor, one line each,
    keeps the lines in params.json, and gives the noise member weight 0 (still listed, for test time)."""
    data, gt, good, noisy, _, run, common = cli_run
    write_predictions(only_no_finding(good), run / "detectron" / "oof.csv", data.train_sizes)
    main(["tune", *common, "--classifier", "none"])
    out = capsys.readouterr().out
    params = json.loads((run / "ensemble" / "detectron-effdet-yolo" / "params.json").read_text())
    assert re.search(r"^warning: member detectron has no finding boxes in its OOF predictions \(OOF mAP 0\.\d{4}, "
                     r"prior-box floor 0\.\d{4}\): the tuner may give it weight 0$", out, re.MULTILINE), out
    assert re.search(r"^warning: member effdet is below the prior-box floor \(OOF mAP 0\.\d{4}, prior-box floor "
                     r"0\.\d{4}\): the tuner may give it weight 0$", out, re.MULTILINE), out
    assert "member yolo" not in out
    assert params["warnings"] == [line for line in out.splitlines() if line.startswith("warning: member")]
    weights = dict(zip(params["fusion"]["models"], params["fusion"]["weights"]))
    assert sorted(weights) == ["detectron", "effdet", "yolo"]  # every member kept, the left-out at weight 0
    assert weights["effdet"] == 0 and weights["yolo"] > 0
    assert re.search(r"^left out by the tuner \(weight 0\): .*effdet", out, re.MULTILINE)
    assert params["oof_map"]["ensemble"] >= params["oof_map"]["yolo"] and "ensemble_gated" not in params["nested_map"]


def test_model_set_is_a_choice_tuned_once_per_set(cli_run, capsys):
    *_, run, common = cli_run
    main(["tune", *common, "--models", "yolo,effdet", "--classifier", "none"])
    first = run / "ensemble" / "effdet-yolo" / "params.json"
    stamp = first.stat().st_mtime_ns
    main(["tune", *common, "--models", "effdet yolo", "--classifier", "none"])  # same set, any order: nothing to do
    assert "nothing to tune" in capsys.readouterr().out and first.stat().st_mtime_ns == stamp
    main(["tune", *common, "--exclude", "effdet,classifier"])  # another set: tuned, the first kept
    other = json.loads((run / "ensemble" / "detectron-yolo" / "params.json").read_text())
    assert other["fusion"]["models"] == ["yolo", "detectron"] and other["gate"]["rule"] == "none"
    assert json.loads((run / "ensemble" / "params.json").read_text()) == other  # the set in use
    assert first.stat().st_mtime_ns == stamp
    (run / "yolo" / "oof.csv").touch()  # a newer input: tuned again
    main(["tune", *common, "--models", "yolo,effdet", "--classifier", "none"])
    assert first.stat().st_mtime_ns > stamp
    with pytest.raises(SystemExit) as e:
        main(["tune", *common, "--models", "yolo,resnet"])
    assert e.value.code == 2 and "'resnet' is not a model family" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["tune", *common, "--exclude", "efdet"])  # a typo leaves nothing out silently
    assert e.value.code == 2 and "--exclude names no model: ['efdet']" in capsys.readouterr().err


def test_extra_model_in_submission_format_joins_and_is_checked(cli_run, tmp_path, capsys):
    data, gt, good, noisy, test_table, run, common = cli_run
    folds = pd.read_csv(common[3], dtype={"image_id": str})
    notebook = tmp_path / "notebook_preds"
    write_submission(good, folds["image_id"].tolist(), notebook / "oof.csv")  # Kaggle format, original pixels
    write_submission(test_table, data.test_ids(), notebook / "test.csv")
    main(["tune", *common, "--models", "effdet", "--extra", str(notebook)])
    params = json.loads((run / "ensemble" / "effdet-notebook_preds+classifier" / "params.json").read_text())
    assert params["fusion"]["models"] == ["effdet", "notebook_preds"]
    assert params["oof_map"]["notebook_preds"] > params["oof_map"]["effdet"]
    main(["submit", *common, "--models", "effdet", "--extra", str(notebook), "--name", "nb"])
    assert check_submission(tmp_path / "submissions" / "nb.csv", data.root / "sample_submission.csv", data.test_sizes) == []
    summary = json.loads((tmp_path / "reports" / "nb" / "summary.json").read_text())
    assert "notebook_preds" in summary
    # an image outside the fold file: named, exit 2
    wrong = tmp_path / "wrong"
    write_submission(good, [*folds["image_id"], "not_a_fold_image"], wrong / "oof.csv")
    write_submission(test_table, data.test_ids(), wrong / "test.csv")
    with pytest.raises(SystemExit) as e:
        main(["tune", *common, "--extra", f"nb2={wrong}", "--force"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model 'nb2' predicts 1 oof image(s) not in the fold file" in err
    # boxes in resized pixels of a smaller image are caught by the size check
    small = good.copy()
    small[["x_min", "y_min", "x_max", "y_max"]] *= 50
    write_submission(small, folds["image_id"].tolist(), wrong / "oof.csv")
    with pytest.raises(SystemExit) as e:
        main(["tune", *common, "--extra", f"nb2={wrong}"])
    assert e.value.code == 2 and "outside the image" in capsys.readouterr().err


def test_outside_model_in_submission_format_empty_string_and_line_numbers(tmp_path):
    """An empty PredictionString is an image with no box (covered, not missing), as in every command;
    a bad box is named by its CSV line, not its box count."""
    sizes = pd.DataFrame({"image_id": ["a", "b", "c"], "width": 100, "height": 100})
    folder = tmp_path / "nb"
    folder.mkdir()
    rows = [["a", "3 0.5 10 10 20 20 4 0.5 10 10 20 20"], ["b", ""], ["c", "14 1 0 0 1 1"]]
    pd.DataFrame(rows, columns=["image_id", "PredictionString"]).to_csv(folder / "oof.csv", index=False)
    (t,) = load_model_tables(tmp_path, ["nb"], "oof", ["a", "b", "c"], {"nb": folder}, sizes)
    assert t["image_id"].tolist() == ["a", "a", "c"]
    rows[2][1] = "3 0.5 10 10 200 20"
    pd.DataFrame(rows, columns=["image_id", "PredictionString"]).to_csv(folder / "oof.csv", index=False)
    with pytest.raises(DataError, match=r"oof.csv, row 4: box outside the image: \['c', 3, 0.5, 10.0, 10.0, 200.0, 20.0\]"):
        load_model_tables(tmp_path, ["nb"], "oof", ["a", "b", "c"], {"nb": folder}, sizes)


def test_submit_reads_the_baseline_prior_and_blend_is_forwarded(cli_run, tmp_path, capsys):
    data, gt, good, noisy, _, run, common = cli_run
    main(["tune", *common, "--models", "yolo,effdet"])
    write_predictions(noisy, run / "prior_boxes" / "oof.csv", data.train_sizes)  # what make baseline writes
    main(["submit", *common, "--models", "yolo,effdet", "--name", "p"])
    summary = json.loads((tmp_path / "reports" / "p" / "summary.json").read_text())
    assert summary["prior_boxes"] == summary["effdet"]  # read, not recomputed
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["blend", "--help"])  # ensemble.blend's own parser
    assert e.value.code == 0 and "--subs" in capsys.readouterr().out


def test_fast_scoring_equals_the_metric_on_subsets_and_gates(synth_dir):
    data, gt, good, noisy, p_abnormal = fake_models(synth_dir, seed=4)
    ids = sorted(gt["image_id"].unique())
    preds = pd.concat([good, noisy], ignore_index=True)
    preds.loc[::5, "score"] = 0.5  # ties: the metric keeps row order
    truth = Truth(gt, ids)
    scored = score_rows(truth, preds)
    expected = mean_average_precision(gt, preds, ids)
    assert scored.map() == expected["map"] and scored.ap() == expected["ap"]
    half = ids[::2]
    assert scored.map(truth.mask(half)) == mean_average_precision(gt, preds[preds["image_id"].isin(half)], half)["map"]
    p = p_abnormal.reindex(truth.ids).to_numpy()
    for g in (GateParams("soft"), GateParams("hard", 0.3, 0.9), GateParams("hard", 0.0, 0.5)):
        expected = mean_average_precision(gt, gate(preds, p_abnormal, g), ids)["map"]
        assert gated(scored, p, g.rule, g.low, g.high).map() == pytest.approx(expected, abs=1e-12)


def test_nested_oof_is_the_search_on_other_folds_scored_on_the_fold(synth_dir):
    data, gt, good, noisy, p_abnormal = fake_models(synth_dir, seed=5)
    ids = sorted(gt["image_id"].unique())
    folds = make_folds(data.labels, n_folds=3, seed=0)
    grids = dict(iou_grid=(0.5,), skip_grid=(0.0,), weight_grid=(1.0, 3.0), gate_grid=(0.0, 0.5, 0.9, 1.0))
    params, search = tune([good, noisy], ["good", "noisy"], gt, ids, data.train_sizes, p_abnormal, folds=folds, **grids)
    for k in range(3):
        held = folds.loc[folds["fold"] == k, "image_id"].tolist()
        rest = [i for i in ids if i not in set(held)]
        sub = [t[t["image_id"].isin(rest)] for t in (good, noisy)]
        inner, _ = tune(sub, ["good", "noisy"], gt, rest, data.train_sizes, p_abnormal, **grids)
        on_fold = [t[t["image_id"].isin(held)] for t in (good, noisy)]
        for name, p in (("ensemble", replace(inner, gate=GateParams())), ("ensemble_gated", inner)):
            expected = mean_average_precision(gt, apply(p, on_fold, data.train_sizes, p_abnormal), held)["map"]
            assert params.nested_folds[name][k] == pytest.approx(expected, abs=1e-9)
    assert params.nested_map["ensemble_gated"] == pytest.approx(np.mean(params.nested_folds["ensemble_gated"]))


def test_two_processes_choose_what_one_does(synth_dir):
    data, gt, good, noisy, p_abnormal = fake_models(synth_dir, seed=6)
    ids = sorted(gt["image_id"].unique())
    folds = make_folds(data.labels, n_folds=3, seed=0)
    grids = dict(iou_grid=(0.4, 0.6), skip_grid=(0.0,), weight_grid=(1.0, 2.0), gate_grid=(0.0, 0.5, 1.0))
    one, s1 = tune([good, noisy], ["good", "noisy"], gt, ids, data.train_sizes, p_abnormal, folds=folds, jobs=1, **grids)
    two, s2 = tune([good, noisy], ["good", "noisy"], gt, ids, data.train_sizes, p_abnormal, folds=folds, jobs=2, **grids)
    assert one == two
    pd.testing.assert_frame_equal(s1, s2)
