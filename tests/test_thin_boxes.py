"""Every box a model emits reaches a valid submission, through every writer.

The format writes coordinates to 0.1 px, so a box thinner than that (EfficientDet emitted
x 0.0-0.023 on the demo) became ``0.0 0.0``: an invalid submission at the end of a whole run.
``cxr.submission.write_submission`` widens such boxes and checks before it publishes; these
tests feed sub-pixel and zero-width boxes through the four writers that use it: ``ensemble
submit``, ``blend``, ``predict-images`` and ``cxr submission``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.dataset import BOX_COLUMNS, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.folds import make_folds
from cxr.io import DataError, write_json, write_table
from cxr.predictions import write_predictions
from cxr.submission import check_submission, read_submission, widen_thin_boxes, write_submission

SIZES = pd.DataFrame({"image_id": ["a", "b", "c"], "width": [1000, 1000, 1000], "height": [800, 800, 800]})


def thin_rows(image_id: str, w: float, h: float) -> list[list]:
    """Sub-pixel boxes at the origin, at the far edges and inside, a normal one, the No-finding row."""
    return [
        [image_id, 0, 0.9, 0.0, 0.0, 0.023, 40.0],  # rounds to 0.0-0.0
        [image_id, 3, 0.8, w - 0.02, h - 30.0, w, h - 0.04],  # at the right/bottom edge
        [image_id, 5, 0.7, 10.02, 10.0, 10.04, 90.0],  # rounds to 10.0-10.0
        [image_id, 7, 0.6, 100.0, 100.0, 300.0, 300.0],
        [image_id, 14, 0.1, 0, 0, 1, 1],
    ]


def assert_widened(sub: Path, sample: Path | list[str], sizes: pd.DataFrame, n_images: int) -> None:
    assert check_submission(sub, sample, sizes) == []
    back = read_submission(sub, sizes)
    findings = back[back["class_id"] != 14]
    b = findings[BOX_COLUMNS].to_numpy()
    assert ((b[:, 2] - b[:, 0] > 0.099) & (b[:, 3] - b[:, 1] > 0.099)).all()
    assert len(findings) >= 4 * n_images  # every box is kept: none dropped
    assert sorted(findings["class_id"].unique().tolist())[:4] == [0, 3, 5, 7]


def test_widen_thin_boxes_keeps_class_score_and_image():
    preds = pd.DataFrame(thin_rows("a", 1000, 800), columns=PREDICTION_COLUMNS)
    out, n = widen_thin_boxes(preds, SIZES)
    assert n == 3
    assert out.loc[0, BOX_COLUMNS].tolist() == [0.0, 0.0, 0.1, 40.0]
    assert out.loc[1, BOX_COLUMNS].tolist() == [999.9, 770.0, 1000.0, 800.0]  # grew towards 0 at the edge
    assert out.loc[2, BOX_COLUMNS].tolist() == [10.0, 10.0, 10.1, 90.0]
    assert out.loc[3, BOX_COLUMNS].tolist() == [100.0, 100.0, 300.0, 300.0]
    pd.testing.assert_series_equal(out["score"], preds["score"])
    zero = pd.DataFrame([["a", 2, 0.5, 50.0, 5.0, 50.0, 9.0]], columns=PREDICTION_COLUMNS)  # zero width
    assert widen_thin_boxes(zero)[0].loc[0, BOX_COLUMNS].tolist() == [50.0, 5.0, 50.1, 9.0]
    inverted = pd.DataFrame([["a", 2, 0.5, 50.0, 5.0, 40.0, 9.0]], columns=PREDICTION_COLUMNS)
    assert widen_thin_boxes(inverted)[1] == 0  # a reversed box is a bug upstream: not repaired silently


def test_writer_widens_warns_and_never_publishes_an_invalid_file(tmp_path):
    preds = pd.DataFrame(thin_rows("a", 1000, 800), columns=PREDICTION_COLUMNS)
    warnings = []
    path = write_submission(preds, ["a", "b", "c"], tmp_path / "s.csv", sizes=SIZES, warn=warnings.append)
    assert_widened(path, ["a", "b", "c"], SIZES, 1)
    assert len(warnings) == 1 and "3 box(es)" in warnings[0]
    before = path.read_bytes()
    bad = pd.DataFrame([["a", 2, 0.5, 50.0, 5.0, 40.0, 9.0]], columns=PREDICTION_COLUMNS)  # inverted
    with pytest.raises(DataError, match="not written: 1 problem.*needs 0 <= x_min < x_max"):
        write_submission(bad, ["a", "b", "c"], path, sizes=SIZES)
    assert path.read_bytes() == before  # the older valid file stays
    with pytest.raises(DataError, match="not written: 2 problem.*'d' is not a test id"):
        write_submission(preds, ["a", "b", "c", "d"], tmp_path / "new.csv", sample=["a", "b", "c", "e"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]  # no temp file, nothing new


def test_cxr_submission_cli(tmp_path):
    from cxr.cli import main

    preds = write_predictions(pd.DataFrame(thin_rows("b", 1000, 800), columns=PREDICTION_COLUMNS), tmp_path / "p.csv")
    sample = write_table(pd.DataFrame({"image_id": ["a", "b", "c"], "PredictionString": "14 1 0 0 1 1"}), tmp_path / "sample.csv")
    sizes = write_table(pd.DataFrame({"image_id": SIZES["image_id"], "dim0": SIZES["height"], "dim1": SIZES["width"]}),
                        tmp_path / "meta.csv")
    out = tmp_path / "sub.csv"
    main(["submission", "--predictions", str(preds), "--sample", str(sample), "--sizes", str(sizes), "--out", str(out)])
    assert_widened(out, sample, SIZES, 1)


def test_blend(synth_dir, tmp_path):
    from ensemble.blend import main

    data = DataFolder(synth_dir)
    ids = data.test_ids()
    rows = [r for i, (w, h) in data.test_sizes.set_index("image_id")[["width", "height"]].iterrows() for r in thin_rows(i, w, h)]
    sub = write_table(pd.DataFrame({"image_id": ids, "PredictionString": "14 1 0 0 1 1"}), tmp_path / "in.csv")
    # the input can't hold a box that rounds away, so it is written with more decimals, as notebooks do
    table = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    strings = table.groupby("image_id").apply(
        lambda g: " ".join(f"{int(c)} {s} {x0:.3f} {y0:.3f} {x1:.3f} {y1:.3f}" for c, s, x0, y0, x1, y1 in g[PREDICTION_COLUMNS[1:]].to_numpy()
                           if x1 > x0 or c == 14), include_groups=False)
    write_table(pd.DataFrame({"image_id": ids, "PredictionString": strings.loc[ids].to_numpy()}), sub)
    out = tmp_path / "blend.csv"
    main(["--data", str(synth_dir), "--subs", str(sub), "--out", str(out), "--report-dir", str(tmp_path / "r")])
    assert_widened(out, synth_dir / "sample_submission.csv", data.test_sizes, len(ids))


def test_ensemble_submit(synth_dir, tmp_path, monkeypatch):
    """A one-model set with hand-written parameters: the test table carries the thin boxes."""
    from ensemble.__main__ import main
    from ensemble.ensemble import FusionParams, Params, params_path

    data = DataFolder(synth_dir)
    folds = write_table(make_folds(data.labels, n_folds=3, seed=0), tmp_path / "folds.csv")
    run = tmp_path / "runs" / "t"
    gt = data.fused()
    oof = gt.assign(score=0.9)[PREDICTION_COLUMNS].fillna(dict(zip(BOX_COLUMNS, NO_FINDING_BOX)))  # No finding: 0 0 1 1
    write_predictions(oof, run / "yolo" / "oof.csv", data.train_sizes)
    sizes = data.test_sizes.set_index("image_id")
    rows = [r for i in data.test_ids() for r in thin_rows(i, *sizes.loc[i, ["width", "height"]])]
    write_predictions(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), run / "yolo" / "test.csv", data.test_sizes)
    params = params_path(run, ["yolo"], None)
    write_json(asdict(Params(FusionParams(["yolo"], [1.0]))), params)
    write_table(pd.DataFrame({"stage": ["default"], "map": [np.nan]}), params.parent / "search.csv")
    monkeypatch.chdir(tmp_path)
    main(["submit", "--data", str(synth_dir), "--folds", str(folds), "--run-dir", str(run), "--models", "yolo",
          "--classifier", "none", "--name", "t"])
    assert_widened(tmp_path / "submissions" / "t.csv", synth_dir / "sample_submission.csv", data.test_sizes,
                   len(data.test_ids()))
    assert json.loads((tmp_path / "reports" / "t" / "summary.json").read_text())["yolo"] > 0.9


def test_predict_images_outputs(tmp_path):
    """predict-images' writer of finished batches (its models are exercised in test_predict_images)."""
    from ensemble.predict_images import Parts, _write_outputs

    parts = Parts(tmp_path / "out" / ".parts", {"k": 1})
    preds = pd.DataFrame(thin_rows("a", 1000, 800) + thin_rows("b", 1000, 800), columns=PREDICTION_COLUMNS)
    info = pd.DataFrame({"image_id": ["a", "b"], "file": ["a.png", "b.png"], "width": [1000, 1000], "height": [800, 800]})
    parts.add(preds, info)
    files = {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}
    _write_outputs(parts, files, [], tmp_path / "out", tmp_path / "runs" / "t", 0.3, 0)
    assert_widened(tmp_path / "out" / "submission.csv", ["a", "b"], SIZES, 2)
