"""Blend of finished submissions (ensemble/blend.py) on submissions the tests make from the synthetic
benchmark: detector-like test predictions written as Kaggle CSVs, scored against its test labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.boxes import iou_matrix
from cxr.config import load
from cxr.dataset import BOX_COLUMNS, NO_FINDING, PREDICTION_COLUMNS
from cxr.io import read_table, write_table
from cxr.labels import read_labels, read_sizes
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import write_predictions
from cxr.submission import check_submission, format_predictions, read_submission, write_submission
from cxr.wbf import fuse_predictions
from ensemble.blend import BlendConfig, main, read_input
from tests.conftest import SAMPLE_SUBMISSION, TEST_LABELS, TEST_SIZES, real

REPO = Path(__file__).resolve().parents[1]


def nms(preds: pd.DataFrame, iou_thr: float) -> pd.DataFrame:
    """Per image and class, keep a box only if it overlaps no higher-scored kept box above ``iou_thr``
    (what a detector's own NMS leaves)."""
    keep = []
    ranked = preds.sort_values("score", ascending=False, kind="stable")
    for _, g in ranked.groupby(["image_id", "class_id"], sort=False):
        boxes = g[BOX_COLUMNS].to_numpy(dtype=float)
        kept: list[int] = []
        for i in range(len(g)):
            if not kept or iou_matrix(boxes[i : i + 1], boxes[kept]).max() <= iou_thr:
                kept.append(i)
        keep += list(g.index[kept])
    return preds.loc[sorted(keep)].reset_index(drop=True)


def detector(gt: pd.DataFrame, sizes: pd.DataFrame, seed: int, hit: float = 0.8) -> pd.DataFrame:
    """A plausible detector on the test images: most ground-truth boxes found with jitter, two false
    positives per image, an uninformed No-finding row, then NMS at IoU 0.3."""
    rng = np.random.default_rng(seed)
    known = sizes.set_index("image_id")
    rows = []
    for image_id, g in gt.groupby("image_id"):
        w, h = known.loc[image_id, ["width", "height"]].to_numpy(dtype=float)
        finding = g[g["class_id"] != NO_FINDING]
        for r in finding.itertuples():
            if rng.uniform() < hit:
                jitter = rng.normal(0, 0.06, 4) * np.array([r.x_max - r.x_min, r.y_max - r.y_min] * 2)
                x0, y0, x1, y1 = np.clip(np.array([r.x_min, r.y_min, r.x_max, r.y_max]) + jitter, 0, [w, h, w, h])
                if x1 > x0 + 1 and y1 > y0 + 1:
                    rows.append([image_id, r.class_id, rng.uniform(0.3, 1.0), x0, y0, x1, y1])
        for _ in range(2):
            x, y = rng.uniform(0, 0.7, 2) * [w, h]
            rows.append([image_id, int(rng.integers(0, 14)), rng.uniform(0, 0.9), x, y, x + 0.2 * w, y + 0.2 * h])
        rows.append([image_id, NO_FINDING, rng.uniform(), 0, 0, 1, 1])  # no idea whether the image is normal
    return nms(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), 0.3)


def useless(sizes: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, w, h in sizes[["image_id", "width", "height"]].itertuples(index=False):
        for _ in range(5):
            x, y = rng.uniform(0, 0.5, 2) * [w, h]
            rows.append([image_id, int(rng.integers(0, 14)), rng.uniform(), x, y, x + 0.4 * w, y + 0.4 * h])
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


@pytest.fixture(scope="module")
def bench(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three 'fold models' and a useless model, as Kaggle submissions and as this repo's fold tables."""
    out = tmp_path_factory.mktemp("blend")
    sizes = read_sizes(synth_dir / "test_meta.csv")
    ids = read_table(synth_dir / "sample_submission.csv", dtype={"image_id": str})["image_id"].tolist()
    gt = ground_truth(read_labels(synth_dir / "test_labels.csv"))
    subs, folds = {}, []
    for k in range(3):
        preds = detector(gt, sizes, seed=k)
        subs[f"fold{k}"] = write_submission(preds, ids, out / f"fold{k}.csv")
        folds.append(write_predictions(preds, out / "runs" / "m" / f"fold{k}" / "test.csv", sizes))
    subs["other"] = write_submission(detector(gt, sizes, seed=10, hit=0.6), ids, out / "other.csv")
    subs["useless"] = write_submission(useless(sizes, seed=5), ids, out / "useless.csv")
    return {"dir": out, "data": synth_dir, "sizes": sizes, "ids": ids, "gt": gt, "subs": subs, "folds": folds}


def blend(bench: dict, name: str, *args: str) -> tuple[Path, pd.DataFrame | None]:
    """Run the CLI; return the submission path and the report table (when --labels was given)."""
    out = bench["dir"] / "out" / f"{name}.csv"
    report = bench["dir"] / "reports" / name
    main(["--data", str(bench["data"]), "--out", str(out), "--report-dir", str(report), *args])
    table = read_table(report / "blend.csv") if (report / "blend.csv").exists() else None
    return out, table


def score(bench: dict, path: Path) -> float:
    return mean_average_precision(bench["gt"], read_submission(path), bench["ids"])["map"]


def parsed(path: Path) -> pd.DataFrame:
    """A submission as a sorted prediction table (to compare two submissions box by box)."""
    t = read_submission(path)
    return t.sort_values(["image_id", "class_id", "score", "x_min"], kind="stable").reset_index(drop=True)


def same_boxes(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b)
    assert (a["image_id"].to_numpy() == b["image_id"].to_numpy()).all()
    assert (a["class_id"].to_numpy() == b["class_id"].to_numpy()).all()
    np.testing.assert_allclose(a["score"], b["score"], atol=2e-6)
    np.testing.assert_allclose(a[BOX_COLUMNS].to_numpy(), b[BOX_COLUMNS].to_numpy(), atol=0.11)  # .1f pixels


def test_blend_of_a_model_with_itself_changes_nothing(bench):
    s = str(bench["subs"]["fold0"])
    out, table = blend(bench, "self", "--subs", s, s, "--labels", str(bench["data"] / "test_labels.csv"))
    same_boxes(parsed(out), parsed(bench["subs"]["fold0"]))
    assert score(bench, out) == pytest.approx(score(bench, bench["subs"]["fold0"]), abs=1e-12)
    maps = table.set_index("kind")["map"]
    assert maps["fused"] == pytest.approx(maps["input"].iloc[0], abs=1e-12)
    assert check_submission(out, bench["data"] / "sample_submission.csv", bench["sizes"]) == []


def test_useless_submission_at_weight_zero_changes_nothing(bench):
    s, u, o = (str(bench["subs"][k]) for k in ("fold0", "useless", "other"))
    alone, _ = blend(bench, "alone", "--subs", s)
    with_zero, table = blend(bench, "zero", "--subs", s, u, "--weights", "1", "0",
                             "--labels", str(bench["data"] / "test_labels.csv"))
    assert read_table(with_zero).equals(read_table(alone))
    assert read_table(alone).equals(read_table(s))  # one submission is passed through as it is
    assert table["name"].tolist() == [s, u, "fused"]  # the weight-0 input is still scored
    pair, _ = blend(bench, "pair", "--subs", s, o, "--weights", "2", "1")
    triple, _ = blend(bench, "triple", "--subs", s, o, u, "--weights", "2", "1", "0")
    assert read_table(triple).equals(read_table(pair))
    counted, _ = blend(bench, "counted", "--subs", s, o, u, "--weights", "2", "1", "1")
    assert score(bench, counted) < score(bench, pair)  # the useless one does harm when it counts


def test_gate_with_perfect_probabilities_lifts_the_score(bench):
    gt = bench["gt"]
    abnormal = gt.groupby("image_id")["class_id"].min() != NO_FINDING
    probs = bench["dir"] / "perfect.csv"
    write_table(pd.DataFrame({"image_id": abnormal.index, "target": abnormal.astype(float).to_numpy()}), probs)
    normal = bench["dir"] / "perfect_normal.csv"
    write_table(pd.DataFrame({"image_id": abnormal.index, "p_normal": 1.0 - abnormal.astype(float).to_numpy()}), normal)
    subs = [str(bench["subs"][k]) for k in ("fold0", "fold1", "other")]
    labels = ["--labels", str(bench["data"] / "test_labels.csv")]
    fused, _ = blend(bench, "ungated", "--subs", *subs)
    soft, table = blend(bench, "soft", "--subs", *subs, "--gate", str(probs), *labels)
    rows = table.set_index("kind")
    assert rows.loc["gated", "map"] > rows.loc["fused", "map"]
    assert rows.loc["gated", "No finding"] == pytest.approx(1.0)
    assert score(bench, soft) > score(bench, fused)
    same, _ = blend(bench, "soft_normal", "--subs", *subs, "--gate", str(normal), "--gate-means", "normal")
    assert read_table(same).equals(read_table(soft))
    hard, _ = blend(bench, "hard", "--subs", *subs, "--gate", str(probs), "--gate-rule", "hard",
                    "--gate-low", "0.2", "--gate-high", "0.5")
    assert score(bench, hard) > score(bench, fused)
    boxes = read_submission(hard)
    normal_ids = set(abnormal.index[~abnormal])
    assert not ((boxes["class_id"] != NO_FINDING) & boxes["image_id"].isin(normal_ids)).any()  # dropped: normal


def test_grouping_then_fusing_equals_the_fold_merge(bench):
    sizes, ids = bench["sizes"], bench["ids"]
    folds = [str(p) for p in bench["folds"]]  # this repo's runs/NAME/MODEL/foldK/test.csv
    # what `python -m models MODEL merge` writes as RUN/MODEL/test.csv today: WBF of the folds' test tables
    tables = [read_table(p, dtype={"image_id": str}) for p in folds]
    merged = fuse_predictions(tables, sizes, iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")
    assert merged.equals(fuse_predictions(tables, sizes))  # those are merge's settings
    out, _ = blend(bench, "merge", "--subs", *folds, "--groups", "m", "m", "m",
                   "--group-iou-thr", "0.55", "--group-conf-type", "avg")
    assert read_table(out).equals(format_predictions(merged, ids))
    # two groups: the folds are fused first, then with the other model at the final settings
    other = str(bench["subs"]["other"])
    out2, table = blend(bench, "groups", "--subs", *folds, other, "--groups", "m", "m", "m", "-",
                        "--group-iou-thr", "0.55", "--iou-thr", "0.5", "--conf-type", "max", "--group-weights", "m=2",
                        "--labels", str(bench["data"] / "test_labels.csv"))
    expected = fuse_predictions([merged, read_input(other, ids, sizes)], sizes, [2.0, 1.0], 0.5, 0.0, "max")
    assert read_table(out2).equals(format_predictions(expected, ids))
    assert table["kind"].tolist() == ["input"] * 4 + ["group", "fused"]
    assert table.loc[table["kind"] == "group", "map"].iloc[0] == pytest.approx(
        mean_average_precision(bench["gt"], merged, ids)["map"])


def test_yaml_config_and_the_example(bench, tmp_path):
    cfg = load(BlendConfig, REPO / "ensemble" / "blend.yaml")  # the documented example parses
    assert cfg.fusion.iou_thr == 0.4 and cfg.gate.rule == "soft"
    folds = [str(p) for p in bench["folds"]]
    yaml_path = tmp_path / "b.yaml"
    yaml_path.write_text(
        "submissions:\n" + "".join(f"  - {{path: {p}, group: m}}\n" for p in folds)
        + "groups:\n  - {name: m, fusion: {iou_thr: 0.55}}\n")
    out, _ = blend(bench, "yaml", "--config", str(yaml_path))
    merged = fuse_predictions([read_table(p, dtype={"image_id": str}) for p in folds], bench["sizes"])
    assert read_table(out).equals(format_predictions(merged, bench["ids"]))
    saved = load(BlendConfig, bench["dir"] / "reports" / "yaml" / "blend.yaml")  # the resolved config, saved
    assert saved.groups[0].fusion.iou_thr == 0.55 and len(saved.submissions) == 3


def test_empty_prediction_string_means_no_box(bench, tmp_path):
    sub = read_table(bench["subs"]["fold0"], dtype={"image_id": str})
    sub.loc[0, "PredictionString"] = ""
    path = tmp_path / "empty.csv"
    write_table(sub, path)
    preds = read_input(path, bench["ids"], bench["sizes"])
    full = read_submission(bench["subs"]["fold0"])
    assert sub.loc[0, "image_id"] not in set(preds["image_id"])
    assert len(preds) == (full["image_id"] != sub.loc[0, "image_id"]).sum()


def bad_copy(bench: dict, tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    """Arguments with a broken input, and what its one-line error must contain (the file, row and value)."""
    sub = read_table(bench["subs"]["fold0"], dtype={"image_id": str}, keep_default_na=False)
    ids = bench["ids"]
    path = tmp_path / f"{case}.csv"
    gate = tmp_path / "p.csv"
    write_table(pd.DataFrame({"image_id": ids, "target": 0.5}), gate)
    args, expect = ["--subs", str(path)], ""
    if case == "unknown_id":
        sub.loc[3, "image_id"], expect = "not_a_test_image", "row 5: image_id 'not_a_test_image' is not in the sample"
    elif case == "duplicate":
        sub = pd.concat([sub, sub.iloc[[1]]], ignore_index=True)
        expect = f"row {len(sub) + 1}: image_id '{ids[1]}' appears again (first on row 3)"
    elif case == "missing_image":
        sub, expect = sub.drop(index=7), "1 test image(s) missing"
    elif case == "not_a_submission":
        path, expect = bench["data"] / "test_labels.csv", "not a submission: columns must be"
        args = ["--subs", str(path)]
    elif case == "no_file":
        args, expect = ["--subs", str(path)], "file not found"
    elif case == "score_outside":
        sub.loc[2, "PredictionString"] = "3 1.5 10 10 50 50"
        expect = "row 4: score not in [0, 1]"
    elif case == "malformed":
        sub.loc[2, "PredictionString"], expect = "3 0.5 10 10 50", "row 4: PredictionString"
    elif case == "outside_image":
        sub.loc[2, "PredictionString"] = "3 0.5 10 10 50000 50"
        w, h = bench["sizes"].set_index("image_id").loc[ids[2], ["width", "height"]]
        expect = f"row 4: box lies outside the original image: {ids[2]} ({w}x{h}): [3, 0.5, 10.0, 10.0, 50000.0, 50.0]"
    elif case == "normalized":
        sub["PredictionString"], expect = "3 0.5 0.1 0.1 0.5 0.5", "normalized coordinates"
    elif case == "gate_outside":
        p = pd.DataFrame({"image_id": ids, "target": 0.5})
        p.loc[4, "target"] = 1.7
        write_table(p, gate)
        args, path, expect = ["--subs", str(bench["subs"]["fold0"]), "--gate", str(gate)], gate, "row 6: target=1.7"
    elif case == "gate_missing":
        write_table(pd.DataFrame({"image_id": ids[1:], "target": 0.5}), gate)
        args, path, expect = ["--subs", str(bench["subs"]["fold0"]), "--gate", str(gate)], gate, "no probability for 1"
    elif case == "gate_unknown":
        write_table(pd.DataFrame({"image_id": [*ids, "stranger"], "target": 0.5}), gate)
        args, path = ["--subs", str(bench["subs"]["fold0"]), "--gate", str(gate)], gate
        expect = f"row {len(ids) + 2}: image_id 'stranger' is not in the sample"
    elif case == "weights":
        args = ["--subs", str(bench["subs"]["fold0"]), "--weights", "1", "2"]
        path, expect = "--weights", "2 value(s) for 1"
    if not case.startswith(("gate", "weights", "not_a", "no_file")):
        write_table(sub, path)
    return args, [str(path), expect]


@pytest.mark.parametrize("case", ["unknown_id", "duplicate", "missing_image", "not_a_submission", "no_file",
                                  "score_outside", "malformed", "outside_image", "normalized", "gate_outside",
                                  "gate_missing", "gate_unknown", "weights"])
def test_bad_input_is_one_line_and_exit_2(bench, tmp_path, capsys, case):
    args, expected = bad_copy(bench, tmp_path, case)
    out = tmp_path / "never.csv"
    with pytest.raises(SystemExit) as e:
        main(["--data", str(bench["data"]), "--out", str(out), "--report-dir", str(tmp_path / "r"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and all(x in err for x in expected), (expected, err)
    assert "np." not in err  # values as written (1771.4), never np.float64(1771.4)
    assert not out.exists() and not list(tmp_path.glob(".never.csv.*"))  # nothing half-written


def test_real_test_set_gate_from_a_public_classifier(tmp_path):
    """The 3,000 real test ids and sizes, the PhysioNet consensus labels and a real 2-class file
    (nhtlongcs' classifier, column class14prob = P(No finding)): gating the sample submission
    ('14 1 0 0 1 1' everywhere) with it must lift the No-finding AP."""
    probs = real("vindr-cxr-train-annotations/nhtlongcs/datasets/test_info.csv")
    sample, sizes, labels = real(SAMPLE_SUBMISSION), real(TEST_SIZES), real(TEST_LABELS)
    out, report = tmp_path / "gated.csv", tmp_path / "report"
    main(["--subs", str(sample), "--sample", str(sample), "--sizes", str(sizes), "--labels", str(labels),
          "--gate", str(probs), "--gate-column", "class14prob", "--gate-means", "normal",
          "--out", str(out), "--report-dir", str(report)])
    table = read_table(report / "blend.csv").set_index("kind")
    assert table.loc["gated", "No finding"] > table.loc["input", "No finding"] + 0.2
    assert table.loc["gated", "map"] > table.loc["input", "map"]
    assert check_submission(out, sample, read_sizes(sizes)) == []


def test_unwritable_output_is_one_line(bench, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder should be
    with pytest.raises(SystemExit) as e:
        main(["--data", str(bench["data"]), "--out", str(blocker / "b.csv"), "--report-dir", str(tmp_path / "r"),
              "--subs", str(bench["subs"]["fold0"])])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {blocker}"), err
