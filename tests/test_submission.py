"""Prediction format and Kaggle submission: writer, parser, checker on broken files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from cxr.io import DataError
from cxr.labels import read_sizes
from cxr.predictions import read_predictions, validate, write_predictions
from cxr.submission import EMPTY_PREDICTION, check_submission, read_submission, write_submission
from tests.conftest import SAMPLE_SUBMISSION, TEST_LABELS, TEST_SIZES, real

COLS = ["image_id", "class_id", "score", "x_min", "y_min", "x_max", "y_max"]
PREDS = pd.DataFrame(
    [["a", 3, 0.9, 100.0, 200.0, 900.5, 700.0], ["a", 0, 0.25, 10.0, 20.0, 30.0, 40.0], ["b", 14, 0.6, 0, 0, 1, 1]],
    columns=COLS,
)
SIZES = pd.DataFrame({"image_id": ["a", "b", "c"], "width": [1000] * 3, "height": [1000] * 3})


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.csv"
    pd.DataFrame({"image_id": ["a", "b", "c"], "PredictionString": EMPTY_PREDICTION}).to_csv(path, index=False)
    return path


def write_raw(tmp_path, rows, columns=("image_id", "PredictionString")):
    path = tmp_path / "sub.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_write_read_round_trip(tmp_path, sample):
    path = write_submission(PREDS, ["a", "b", "c"], tmp_path / "sub.csv")
    assert check_submission(path, sample, SIZES) == []
    df = pd.read_csv(path)
    assert df.loc[2, "PredictionString"] == "14 1 0 0 1 1"  # nothing predicted for c
    assert df.loc[1, "PredictionString"] == "14 0.600000 0 0 1 1"
    back = read_submission(path)
    expected = pd.concat([PREDS, pd.DataFrame([["c", 14, 1.0, 0, 0, 1, 1]], columns=COLS)])
    pd.testing.assert_frame_equal(
        back.sort_values(["image_id", "score"]).reset_index(drop=True),
        validate(expected).sort_values(["image_id", "score"]).reset_index(drop=True),
    )


@pytest.mark.parametrize(
    "rows, problem",
    [
        ([["a", "14 1 0 0 1 1"], ["b", "14 1 0 0 1 1"]], "test id 'c' is missing"),
        ([["a", "14 1 0 0 1 1"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "'c' appears 2 times"),
        ([["a", "14 1 0 0 1 1"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"], ["d", "14 1 0 0 1 1"]], "'d' is not a test id"),
        ([["a", "3 0.5 1 2 3"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "row 2 (a): 5 values"),
        ([["a", "15 0.5 1 2 30 40"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "class '15'"),
        ([["a", "3 0.5 1 2 x 40"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "non-number"),
        ([["a", "3 1.5 1 2 30 40"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "score 1.5 not in [0, 1]"),
        ([["a", "14 0.5 0 0 2 2"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "No finding must be '14 p 0 0 1 1'"),
        ([["a", "3 0.5 50 2 30 40"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "needs 0 <= x_min < x_max"),
        ([["a", "3 0.5 10 20 1300 40"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "outside the 1000x1000"),
        ([["a", "3 0.5 0.1 0.2 0.3 0.4"], ["b", "14 1 0 0 1 1"], ["c", "14 1 0 0 1 1"]], "normalized coordinates"),
    ],
)
def test_checker_finds_problem(tmp_path, sample, rows, problem):
    problems = check_submission(write_raw(tmp_path, rows), sample, SIZES)
    assert any(problem in p for p in problems), problems


def test_empty_prediction_string_is_an_image_without_boxes(tmp_path, sample, capsys):
    """One meaning everywhere: an empty PredictionString is valid and adds no box, not even
    No finding, in check_submission, read_submission and evaluate (blend: tests/test_blend.py)."""
    path = write_raw(tmp_path, [["a", ""], ["b", "  "], ["c", "3 0.5 10 20 30 40"]])
    assert check_submission(path, sample, SIZES) == []
    assert read_submission(path, SIZES)["image_id"].tolist() == ["c"]
    labels = tmp_path / "labels.csv"
    pd.DataFrame([["a", "No finding", None, None, None, None], ["b", "No finding", None, None, None, None],
                  ["c", "Cardiomegaly", 10, 20, 30, 40]],
                 columns=["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]).to_csv(labels, index=False)
    main(["evaluate", "--json", "--labels", str(labels), "--submission", str(path), "--subset"])
    result = json.loads(capsys.readouterr().out)
    assert result["ap"]["3"] == 1.0 and result["ap"]["14"] == 0.0  # a's and b's No finding missed: no box predicted


def test_errors_name_the_csv_line_not_the_box(tmp_path):
    """A submission holds many boxes on a line: errors and warnings name the line, and
    values print as plain numbers."""
    path = write_raw(tmp_path, [["a", "3 0.5 10 20 30 40 4 0.5 10 20 30 40 5 0.5 10 20 30 40"],
                                ["b", "3 0.5 10 20 1771.4 40"], ["c", "14 1 0 0 1 1"]])
    with pytest.raises(DataError, match=r"sub.csv, row 3: box outside the image: \['b', 3, 0.5, 10.0, 20.0, 1771.4, 40.0\]"):
        read_submission(path, SIZES)
    warnings = []
    read_submission(write_raw(tmp_path, [["a", "3 0.5 10 20 30 40 4 0.5 10 20 30 40"], ["b", "3 0.5 -1 20 30 40"]]),
                    warn=warnings.append)
    assert len(warnings) == 1 and "sub.csv, row 3: 1 box(es) with box negative coordinate" in warnings[0]
    assert "np." not in warnings[0]


def test_checker_wrong_columns(tmp_path, sample):
    path = write_raw(tmp_path, [["a", "x"]], ("id", "PredictionString"))
    assert "columns must be" in check_submission(path, sample)[0]


def test_check_submission_cli_exit_codes(tmp_path, sample, capsys):
    good = write_submission(PREDS, ["a", "b", "c"], tmp_path / "good.csv")
    main(["check-submission", "--submission", str(good), "--sample", str(sample)])
    bad = write_raw(tmp_path, [["a", "3 0.5 1 2 3"]])
    with pytest.raises(SystemExit) as e:
        main(["check-submission", "--submission", str(bad), "--sample", str(sample)])
    assert e.value.code == 1
    assert "test id 'b' is missing" in capsys.readouterr().out
    for args in (["--submission", str(good), "--sample", str(tmp_path / "nope.csv")],
                 ["--submission", str(tmp_path / "nope.csv"), "--sample", str(sample)]):
        with pytest.raises(SystemExit) as e:  # a file that cannot be read is bad input: exit 2, one line
            main(["check-submission", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip() == f"error: {tmp_path / 'nope.csv'}: file not found", err


@pytest.mark.parametrize(
    "row, message",
    [
        (["a", 15, 0.5, 1, 2, 3, 4], "class_id not one of 0..14"),
        (["a", 3, np.nan, 1, 2, 3, 4], "score not in"),
        (["a", 3, 0.5, 5, 2, 3, 4], "x_min < x_max"),
        (["a", 3, 0.5, 1, 2, 3000, 4], "outside the image"),
        (["a", 14, 0.5, 1, 2, 3, 4], "No finding must be 0 0 1 1"),
        (["zz", 3, 0.5, 1, 2, 3, 4], "has no known size"),
    ],
)
def test_prediction_format_errors(tmp_path, row, message):
    with pytest.raises(DataError, match=message) as e:
        write_predictions(pd.concat([PREDS, pd.DataFrame([row], columns=COLS)]), tmp_path / "p.csv", SIZES)
    assert "row 5" in str(e.value)
    assert not (tmp_path / "p.csv").exists()  # nothing half-written


def test_prediction_csv_and_parquet_round_trip(tmp_path):
    for name in ("p.csv", "p.parquet"):
        write_predictions(PREDS, tmp_path / name, SIZES)
        pd.testing.assert_frame_equal(read_predictions(tmp_path / name), validate(PREDS))


def test_real_sample_submission_is_valid_and_scores_no_finding_only(capsys):
    sample = real(SAMPLE_SUBMISSION)
    assert check_submission(sample, sample, None) == []
    main(["evaluate", "--json", "--labels", str(real(TEST_LABELS)), "--submission", str(sample)])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"map", "ap"} and set(result["ap"]) == {str(c) for c in range(15)}
    assert result["ap"]["14"] > 0.6 and all(result["ap"][str(c)] == 0.0 for c in range(14))
    assert check_submission(sample, sample, read_sizes(real(TEST_SIZES))) == []


def test_real_normal_images_only_submission_is_not_perfect(tmp_path, capsys):
    """Issue 11: the 2,051 normal test images alone used to score mAP 1.0 on the real test labels."""
    labels = real(TEST_LABELS)
    gt = pd.read_csv(labels, dtype={"image_id": str})
    normal = sorted(set(gt.loc[gt["class_name"] == "No finding", "image_id"]))
    path = tmp_path / "normal_only.csv"
    pd.DataFrame({"image_id": normal, "PredictionString": "14 1 0 0 1 1"}).to_csv(path, index=False)
    main(["evaluate", "--json", "--labels", str(labels), "--submission", str(path)])
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert f"lacks {3000 - len(normal)} of 3000 labelled images" in out.err
    assert result["map"] < 0.1 and all(result["ap"][str(c)] == 0.0 for c in range(14))
    main(["evaluate", "--json", "--labels", str(labels), "--submission", str(path), "--subset"])
    assert json.loads(capsys.readouterr().out)["map"] == 1.0  # only when asked for
