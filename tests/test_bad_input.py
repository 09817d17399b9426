"""Bad input never kills a run or inflates a score.

Every case on files the test writes itself (pydicom DICOMs, cv2 PNG/JPEG, small CSVs), so it
runs without ../shared/data: broken images in `prepare`, resume after a kill, evaluate scoring
like Kaggle, the submission checker, label/fold/probability validation, one-line CLI errors.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from cxr.config import load
from cxr.data import read_folds
from cxr.images import JOURNAL_NAME, png_size, prepare_png_set, read_dicom, read_image
from cxr.io import FILE_MODE, DataError, write_table
from cxr.labels import read_labels
from cxr.predictions import read_probabilities
from cxr.submission import check_submission

REPO = Path(__file__).resolve().parents[1]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", window: tuple | None = None,
                pixel_data: bool = True) -> Path:
    """A small uncompressed 12-bit DICOM, like a CR/DX file (optionally with a VOI window or without pixel data)."""
    import pydicom

    from cxr.dicom import write_dicom as write

    write(path, pixels.astype(np.uint16), photometric, window=window)
    if not pixel_data:
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h: int = 40, w: int = 30) -> np.ndarray:
    return np.linspace(0, 4000, h * w).reshape(h, w).astype(np.uint16)


# ---------------------------------------------------------------- DICOM decoding


def test_monochrome1_is_inverted_and_window_applied(tmp_path):
    px = ramp()
    plain = read_dicom(write_dicom(tmp_path / "m2.dcm", px))
    inverted = read_dicom(write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1"))
    assert np.abs(inverted.astype(int) - (255 - plain.astype(int))).max() <= 1  # rounding
    assert plain[0, 0] == 0 and plain[-1, -1] == 255  # body bright: the ramp's high end is white
    windowed = read_dicom(write_dicom(tmp_path / "w.dcm", px, window=(1000, 500)))
    below, above = px < 700, px > 1300  # outside [center - width/2, center + width/2]: clipped
    assert (windowed[below] == 0).all() and (windowed[above] == 255).all()
    inside = (px > 800) & (px < 1200)
    assert 0 < windowed[inside].min() < windowed[inside].max() < 255  # the window is stretched, not cut
    assert (plain[inside] < 100).all()  # without the window those pixels stay dark


def test_broken_dicoms_are_data_errors(tmp_path):
    good = write_dicom(tmp_path / "g.dcm", ramp())
    (tmp_path / "cut.dcm").write_bytes(good.read_bytes()[:-500])
    write_dicom(tmp_path / "nopix.dcm", ramp(), pixel_data=False)
    (tmp_path / "empty.dcm").write_bytes(b"")
    for name, message in [("cut.dcm", "less than expected"), ("nopix.dcm", "no pixel data"), ("empty.dcm", "empty file")]:
        with pytest.raises(DataError, match=message) as e:
            read_dicom(tmp_path / name)
        assert name in str(e.value)


def test_truncated_and_fake_images_are_detected(tmp_path):
    image = (np.random.default_rng(0).integers(0, 255, (64, 64))).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    for suffix in ("jpg", "png"):
        data = (tmp_path / f"a.{suffix}").read_bytes()
        (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match="truncated"):
            read_image(tmp_path / f"cut.{suffix}")
        assert read_image(tmp_path / f"a.{suffix}").shape == (64, 64)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match="not a PNG"):
        read_image(tmp_path / "text.png")


def test_data_error_survives_pickling():
    e = pickle.loads(pickle.dumps(DataError("x.csv", "bad value", 7)))
    assert isinstance(e, DataError) and str(e) == "x.csv, row 7: bad value" and e.row == 7


# ---------------------------------------------------------------- prepare


def broken_folder(src: Path) -> dict[str, str]:
    """Good images plus one of every broken kind; returns file name -> expected reason."""
    src.mkdir(parents=True)
    write_dicom(src / "d1.dicom", ramp(50, 40))
    write_dicom(src / "d2.dicom", ramp(30, 60), "MONOCHROME1", (2000, 1000))
    cv2.imwrite(str(src / "p1.png"), np.full((20, 24), 100, np.uint8))
    cv2.imwrite(str(src / "j1.jpg"), np.full((22, 18), 50, np.uint8))
    (src / "zero.png").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    (src / "cut.dicom").write_bytes((src / "d1.dicom").read_bytes()[:-300])
    write_dicom(src / "nopix.dicom", ramp(), pixel_data=False)
    jpg = (src / "j1.jpg").read_bytes()
    (src / "cutjpg.jpg").write_bytes(jpg[: len(jpg) - 40])
    (src / "a b.png").write_bytes((src / "p1.png").read_bytes())  # ids name files and CSV cells
    return {"zero.png": "empty file", "text.png": "not a PNG", "cut.dicom": "less than expected",
            "nopix.dicom": "no pixel data", "cutjpg.jpg": "truncated JPEG", "a b.png": "unsafe image_id 'a b'"}


def test_prepare_skips_bad_files_converts_the_rest(tmp_path, capsys):
    bad = broken_folder(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--src", str(tmp_path / "src"), "--out", str(out), "--size", "16", "--workers", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {out / 'failed.csv'}: 6 file(s) failed")
    assert "Traceback" not in err
    failed = pd.read_csv(out / "failed.csv")
    assert list(failed.columns) == ["file", "reason"]
    reasons = {Path(f).name: r for f, r in zip(failed["file"], failed["reason"])}
    assert set(reasons) == set(bad)
    for name, reason in bad.items():
        assert reason in reasons[name], (name, reasons[name])
    meta = pd.read_csv(out / "meta.csv")
    assert meta.set_index("image_id").loc[["d1", "d2", "j1", "p1"]].values.tolist() == [[50, 40], [30, 60], [22, 18], [20, 24]]
    assert sorted(p.name for p in out.glob("*.png")) == ["d1.png", "d2.png", "j1.png", "p1.png"]
    assert all(png_size(p) == (16, 16) for p in out.glob("*.png"))
    assert (out / "meta.csv").stat().st_mode & 0o777 == FILE_MODE  # not mkstemp's 0600
    assert not (out / JOURNAL_NAME).exists()
    # fixed files are picked up by the re-run, the rest is not redone, failed.csv goes away
    for name in bad:
        (tmp_path / "src" / name).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    result = prepare_png_set(tmp_path / "src", out, 16, progress=False)
    assert result.converted == 0 and len(result.failed) == 0 and not (out / "failed.csv").exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps


def test_prepare_resumes_from_a_killed_run_and_ignores_its_temp_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        cv2.imwrite(str(src / f"img{i}.png"), np.full((30 + i, 20), 10 * i, np.uint8))
    # what a kill leaves: two images done and journaled, a line cut mid-write, a PNG not yet
    # journaled, atomic_path temp files (one named like an image)
    out.mkdir()
    for i in (0, 1, 2):
        cv2.imwrite(str(out / f"img{i}.png"), np.zeros((16, 16), np.uint8))
    (out / JOURNAL_NAME).write_text("image_id,dim0,dim1,size\nimg0,30,20,16\nimg1,31,20,16\nimg2,3")
    (out / ".img3.png.x1y2.tmp").write_bytes(b"\x89PNG half")
    (out / ".meta.csv.abc.tmp").write_text("image_id,dim0\n")
    stamps = {i: (out / f"img{i}.png").stat().st_mtime_ns for i in (0, 1, 2)}
    result = prepare_png_set(src, out, 16, workers=2, progress=False)
    assert result.converted == 4  # img2 (cut journal line) .. img5
    assert [(out / f"img{i}.png").stat().st_mtime_ns for i in (0, 1)] == [stamps[0], stamps[1]]
    assert (out / "img2.png").stat().st_mtime_ns != stamps[2]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.csv"] + [f"img{i}.png" for i in range(6)])
    meta = pd.read_csv(out / "meta.csv")
    assert meta["image_id"].tolist() == [f"img{i}" for i in range(6)] and meta["dim0"].tolist() == list(range(30, 36))


def test_prepare_resumes_after_a_real_kill(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):  # big enough that one worker takes a few seconds in all
        cv2.imwrite(str(src / f"img{i:02d}.png"), rng.integers(0, 255, (900, 900), dtype=np.uint8))
    cmd = [sys.executable, "-m", "cxr.cli", "prepare", "--src", str(src), "--out", str(out), "--size", "64", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = out / JOURNAL_NAME
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 4:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.csv").exists(), "the run finished before it could be killed: make the images bigger"
    done = pd.read_csv(journal, on_bad_lines="skip")["image_id"].dropna().tolist()
    assert 3 <= len(done) < 60
    stamps = {i: (out / f"{i}.png").stat().st_mtime_ns for i in done}
    result = prepare_png_set(src, out, 64, workers=1, progress=False)
    assert len(result.meta) == 60 and result.converted <= 60 - len(done)
    assert {i: (out / f"{i}.png").stat().st_mtime_ns for i in done} == stamps  # finished images not redone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_prepare_with_another_size_redoes_everything(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f"a{i}.png"), np.full((40, 50), 99, np.uint8))
    assert prepare_png_set(src, out, 16, progress=False).converted == 3
    result = prepare_png_set(src, out, 24, progress=False)
    assert result.converted == 3 and all(png_size(p) == (24, 24) for p in out.glob("*.png"))
    assert result.meta[["dim0", "dim1"]].values.tolist() == [[40, 50]] * 3  # original sizes, not the PNGs'


def test_output_folder_inside_source_is_not_read_back(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.full((40, 50), 99, np.uint8))
    prepare_png_set(src, src / "png", 16, progress=False)
    result = prepare_png_set(src, src / "png", 16, progress=False)
    assert result.meta["image_id"].tolist() == ["a"] and result.converted == 0


# ---------------------------------------------------------------- evaluate: score what Kaggle scores


@pytest.fixture
def physionet(tmp_path) -> Path:
    """Three labelled images: n1, n2 normal; f1 with a Nodule/Mass box."""
    path = tmp_path / "labels.csv"
    pd.DataFrame(
        [["n1", "No finding", None, None, None, None], ["n2", "No finding", None, None, None, None],
         ["f1", "Nodule/Mass", 100, 100, 200, 200]],
        columns=["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
    ).to_csv(path, index=False)
    return path


def evaluate(capsys, *args) -> tuple[dict | None, str]:
    try:
        main(["evaluate", "--json", *map(str, args)])
    except SystemExit as e:
        out = capsys.readouterr()
        assert e.code == 2 and "Traceback" not in out.err
        assert len(out.err.strip().splitlines()) == 1, out.err
        return None, out.err
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def sub(tmp_path, rows, name="sub.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows, columns=["image_id", "PredictionString"]).to_csv(path, index=False)
    return path


def test_normal_images_only_do_not_score_a_perfect_map(tmp_path, physionet, capsys):
    normal_only = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n2", "14 1 0 0 1 1"]])
    result, err = evaluate(capsys, "--labels", physionet, "--submission", normal_only)
    assert result["ap"]["8"] == 0.0 and result["ap"]["14"] == 1.0 and result["map"] == 0.5  # f1 missed
    assert "lacks 1 of 3 labelled images" in err
    result, _ = evaluate(capsys, "--labels", physionet, "--submission", normal_only, "--subset")
    assert result["map"] == 1.0  # asked for: only the listed images


def test_evaluate_refuses_duplicates_and_bad_folds(tmp_path, physionet, capsys):
    dup = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n1", "14 1 0 0 1 1"], ["f1", "8 0.9 100 100 200 200"]])
    assert "'n1' appears more than once" in evaluate(capsys, "--labels", physionet, "--submission", dup)[1]
    good = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n2", "14 1 0 0 1 1"], ["f1", "8 0.9 100 100 200 200"]], "good.csv")
    assert evaluate(capsys, "--labels", physionet, "--submission", good)[0]["map"] == 1.0
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"image_id": ["n1", "n2", "f1"], "fold": [0, 1, 1]}).to_csv(folds, index=False)
    assert "--fold: needs --folds" in evaluate(capsys, "--labels", physionet, "--submission", good, "--fold", 0)[1]
    err = evaluate(capsys, "--labels", physionet, "--submission", good, "--folds", folds, "--fold", 9)[1]
    assert "fold 9 not in the fold file (folds [0, 1])" in err
    result, _ = evaluate(capsys, "--labels", physionet, "--submission", good, "--folds", folds, "--fold", 1)
    assert result["ap"]["8"] == 1.0 and result["ap"]["14"] == 1.0


@pytest.mark.parametrize("header", ["image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max",
                                    "image_id,class_name,x_min,y_min,x_max,y_max"], ids=["kaggle", "physionet"])
def test_a_label_file_with_no_rows_is_one_line_in_every_command(header, tmp_path, capsys):
    """A header and no rows: every command that reads labels stops with one line naming the file, exit 2,
    nothing written (it used to end in a pandas traceback)."""
    labels, sizes, out = tmp_path / "labels.csv", tmp_path / "sizes.csv", tmp_path / "out.csv"
    labels.write_text(header + "\n")
    sizes.write_text("image_id,width,height\na,100,100\n")
    submission = tmp_path / "sub.csv"
    submission.write_text("image_id,PredictionString\na,14 1 0 0 1 1\n")
    commands = [["folds", "--labels", labels, "--out", out], ["fuse", "--labels", labels, "--out", out],
                ["evaluate", "--labels", labels, "--submission", submission],
                ["baseline", "--labels", labels, "--train-sizes", sizes, "--sizes", sizes, "--out", out],
                ["stats", "--labels", labels, "--sizes", sizes, "--out", tmp_path / "stats.json"]]
    for argv in commands if "rad_id" in header else commands[2:3]:  # PhysioNet labels: test labels, scored only
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err == f"error: {labels}: has a header but no rows: a label file needs at least " \
            "one labelled image", (argv[0], err)
        assert not out.exists() and not (tmp_path / "stats.json").exists()


def test_boxes_kaggle_accepts_are_scored_with_a_warning(tmp_path, physionet, capsys):
    rows = [["n1", "14 1 0 0 1 1"], ["n2", "14 0.9 0 0 2 2"],  # IoU 0.25 with 0 0 1 1: a false positive
            ["f1", "8 0.9 -3 100 200 200"]]  # IoU 0.97 with the nodule: a hit, as Kaggle scores it
    result, err = evaluate(capsys, "--labels", physionet, "--submission", sub(tmp_path, rows))
    assert "negative coordinate" in err and "No finding must be 0 0 1 1" in err
    assert result["ap"]["8"] == 1.0
    assert result["ap"]["14"] == pytest.approx(0.5)  # n2's ground truth is missed: recall 1/2
    problems = check_submission(sub(tmp_path, rows), sub(tmp_path, [[i, "14 1 0 0 1 1"] for i in ("n1", "n2", "f1")], "s.csv"))
    assert any("negative coordinate" in p for p in problems) and any("No finding must be" in p for p in problems)


def test_checker_catches_non_finite_numbers_without_sizes(tmp_path):
    sample = sub(tmp_path, [["a", "14 1 0 0 1 1"], ["b", "14 1 0 0 1 1"]], "sample.csv")
    for text in ("3 0.5 10 20 inf 40", "3 nan 10 20 30 40", "3 0.5 -inf 20 30 40"):
        problems = check_submission(sub(tmp_path, [["a", text], ["b", "14 1 0 0 1 1"]]), sample)
        assert any("row 2 (a): has a non-finite number" in p for p in problems), (text, problems)


# ---------------------------------------------------------------- tables validated where they enter


def test_kaggle_labels_missing_a_column_are_not_read_as_physionet(tmp_path):
    full = pd.DataFrame([["a", "Atelectasis", 1, "R1", 10, 20, 30, 40]],
                        columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
    for column in ("rad_id", "class_id"):
        path = tmp_path / f"no_{column}.csv"
        full.drop(columns=column).to_csv(path, index=False)
        with pytest.raises(DataError, match=rf"missing column\(s\) \['{column}'\]"):
            read_labels(path)
    path = tmp_path / "other.csv"
    pd.DataFrame({"image_id": ["a"], "label": [1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="not a label file"):
        read_labels(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["a", "nan"], ["b", 0.5]], "p_abnormal=nan is not a probability"),
        ([["a", 7.5], ["b", 0.5]], "p_abnormal=7.5 is not a probability"),
        ([["a", -3], ["b", 0.5]], "p_abnormal=-3"),
        ([["a", "high"], ["b", 0.5]], "p_abnormal='high'"),
        ([["a", "inf"], ["b", 0.5]], "p_abnormal=inf"),
        ([["a", 0.1], ["a", 0.2], ["b", 0.5]], "image_id 'a' listed twice"),
        ([["a", 0.1]], r"no p_abnormal for 1 image\(s\), e.g. \['b'\]"),
        ([["../x", 0.1], ["a", 0.1], ["b", 0.5]], "unsafe image_id '../x'"),
    ],
)
def test_probabilities_are_validated(tmp_path, rows, message):
    path = tmp_path / "p.csv"
    pd.DataFrame(rows, columns=["image_id", "p_abnormal"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=message):
        read_probabilities(path, ["a", "b"])


def test_probabilities_good_table(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"image_id": ["c", "b", "a"], "p_abnormal": [1.0, 0.0, 0.25]}).to_csv(path, index=False)
    p = read_probabilities(path, ["a", "b"])
    assert p.index.tolist() == ["a", "b"] and p.tolist() == [0.25, 0.0]


@pytest.mark.parametrize(
    "ids, folds, message",
    [
        (["../../../x/evil", "b"], [0, 1], "row 2: unsafe image_id '../../../x/evil'"),
        (["a/b", "b"], [0, 1], "unsafe image_id 'a/b'"),
        ([".hidden", "b"], [0, 1], "unsafe image_id '.hidden'"),
        (["..", "b"], [0, 1], "unsafe image_id '..'"),
        (["a", "b"], [0, "x"], "row 3: fold='x' is not an integer"),
        (["a", "b"], [0, 1.5], "fold=1.5"),
        (["a", "a"], [0, 1], "row 3: image_id 'a' listed twice"),
    ],
)
def test_fold_file_ids_are_safe(tmp_path, ids, folds, message):
    path = tmp_path / "folds.csv"
    pd.DataFrame({"image_id": ids, "fold": folds}).to_csv(path, index=False)
    with pytest.raises(DataError, match=message):
        read_folds(path)


# ---------------------------------------------------------------- one-line CLI errors, nothing invalid left


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def train_csv(tmp_path) -> Path:
    path = tmp_path / "train.csv"
    rows = [[f"i{k}", "No finding", 14, "R1", None, None, None, None] for k in range(4)]
    pd.DataFrame(rows, columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("n", [0, 1, -2, 5])
def test_folds_bad_n_folds(tmp_path, train_csv, capsys, n):
    err = cli_error(capsys, "folds", "--labels", train_csv, "--n-folds", n, "--out", tmp_path / "f.csv")
    assert f"--n-folds {n}: need 2 <= n_folds <= 4" in err
    assert not (tmp_path / "f.csv").exists()


def test_unwritable_output_is_one_line(tmp_path, train_csv, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder should be
    err = cli_error(capsys, "folds", "--labels", train_csv, "--n-folds", 2, "--out", blocker / "f.csv")
    assert str(blocker) in err


def test_corrupt_parquet_and_non_utf8_csv(tmp_path, physionet, capsys):
    bad = tmp_path / "preds.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert "not a readable Parquet file" in cli_error(capsys, "evaluate", "--labels", physionet, "--submission", bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image_id,class_name,x_min,y_min,x_max,y_max\nn1,Pleural \xe9paississement,1,2,3,4\n".encode("latin-1"))
    assert "not UTF-8" in cli_error(capsys, "evaluate", "--labels", latin, "--submission", bad)


def test_submission_with_unknown_id_or_invalid_result_leaves_nothing(tmp_path, capsys):
    preds = tmp_path / "preds.csv"
    pd.DataFrame([["zz", 3, 0.5, 1, 2, 3, 4]], columns=["image_id", "class_id", "score", "x_min", "y_min", "x_max", "y_max"]).to_csv(preds, index=False)
    sample = sub(tmp_path, [["a", "14 1 0 0 1 1"], ["b", "14 1 0 0 1 1"]], "sample.csv")
    out = tmp_path / "out" / "sub.csv"
    err = cli_error(capsys, "submission", "--predictions", preds, "--sample", sample, "--out", out)
    assert "preds.csv, row 2: image_id 'zz' is not in" in err and not out.exists()
    dup_sample = sub(tmp_path, [["a", "14 1 0 0 1 1"], ["a", "14 1 0 0 1 1"], ["zz", "14 1 0 0 1 1"]], "dup.csv")
    err = cli_error(capsys, "submission", "--predictions", preds, "--sample", dup_sample, "--out", out)
    assert "not written" in err and not out.exists() and not list(out.parent.iterdir())


def test_config_syntax_error_and_non_utf8(tmp_path):
    from cxr.fusion import FusionConfig

    path = tmp_path / "bad.yaml"
    path.write_text("mode: [wbf\n")
    with pytest.raises(DataError, match=r"bad.yaml: YAML syntax error at line \d+, column \d+"):
        load(FusionConfig, path)
    path.write_bytes("mode: w\xe9f\n".encode("latin-1"))
    with pytest.raises(DataError, match="bad.yaml: not UTF-8"):
        load(FusionConfig, path)


def test_tables_get_normal_file_modes(tmp_path):
    path = write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
    assert path.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("error", [DataError("x.csv", "bad value", row=3), NotADirectoryError(20, "Not a directory", "out/f.csv")])
def test_every_entry_point_boundary_is_one_line_exit_2(error, capsys):
    """cxr, python -m models, python -m ensemble (tune/submit/blend/predict-images) share this boundary."""
    from cxr.io import one_line_errors

    with pytest.raises(SystemExit) as e, one_line_errors():
        raise error
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err in ("error: x.csv, row 3: bad value\n", "error: out/f.csv: Not a directory\n")


# ---------------------------------------------------------------- values checked where they enter


def entry_point(name: str):
    """The command-line mains of the project, each with its own parser (all cxr.args.Parser)."""
    if name == "cxr":
        return main
    if name == "blend":
        from ensemble.blend import main as blend_main

        return blend_main
    if name == "models":
        from models.__main__ import main as models_main

        return models_main
    if name == "scheduler":
        from models.scheduler import main as scheduler_main

        return scheduler_main
    from ensemble.__main__ import main as ensemble_main  # predict-images is forwarded from here

    return ensemble_main


RUN = ["--data", "d", "--folds", "f.csv", "--run-dir", "runs/x"]
PREDICT = ["predict-images", "--src", "s", "--run-dir", "runs/x", "--out", "o"]


@pytest.mark.parametrize(
    "entry, args, message",
    [
        ("cxr", ["folds", "--labels", "t.csv", "--seed", "-1", "--out", "f.csv"], "--seed: -1 is not a seed (an integer in 0..4294967295)"),
        ("cxr", ["folds", "--labels", "t.csv", "--seed", "1e3", "--out", "f.csv"], "--seed: '1e3' is not an integer"),
        ("cxr", ["fuse", "--labels", "t.csv", "--iou-thr", "5", "--out", "x.csv"], "--iou-thr: 5 is not an IoU in (0, 1]"),
        ("cxr", ["fuse", "--labels", "t.csv", "--iou-thr", "nan", "--out", "x.csv"], "--iou-thr: nan is not an IoU"),
        ("cxr", ["evaluate", "--labels", "t.csv", "--submission", "s.csv", "--fold", "-1"], "--fold: -1 is not an integer >= 0"),
        ("models", ["yolo", "train", *RUN, "--fold", "-1"], "--fold: -1 is not an integer >= 0"),
        ("models", ["yolov8", "train", *RUN], "model: invalid choice: 'yolov8'"),
        ("scheduler", ["--models", "yolo", *RUN, "--gpus", "0"], "--gpus: 0 is not an integer >= 1"),
        ("scheduler", ["--models", "yolo", *RUN, "--gpus-per-job", "x"], "--gpus-per-job: 'x' is not an integer"),
        ("cxr", ["evaluate", "--labels", "t.csv"], "the following arguments are required: --submission"),
        ("blend", ["--subs", "a.csv", "--iou-thr", "0"], "--iou-thr: 0 is not an IoU in (0, 1]"),
        ("blend", ["--subs", "a.csv", "--group-iou-thr", "1.5"], "--group-iou-thr: 1.5 is not an IoU"),
        ("blend", ["--subs", "a.csv", "--skip-box-thr", "1"], "--skip-box-thr: 1 is not in [0, 1)"),
        ("blend", ["--subs", "a.csv", "--weights", "-1"], "--weights: -1 is not a weight (a finite number >= 0)"),
        ("blend", ["--subs", "a.csv", "--weights", "inf"], "--weights: inf is not a weight"),
        ("blend", ["--subs", "a.csv", "--group-weights", "m=-2"], "--group-weights: -2 is not a weight"),
        ("blend", ["--subs", "a.csv", "--group-weights", "m"], "--group-weights: 'm' is not NAME=WEIGHT"),
        ("blend", ["--subs", "a.csv", "--gate-low", "2"], "--gate-low: 2 is not in [0, 1]"),
        ("blend", ["--subs", "a.csv", "--gate-rule", "firm"], "--gate-rule: invalid choice: 'firm'"),
        ("blend", ["--subs", "a.csv", "--conf-type", "mean"], "--conf-type: invalid choice: 'mean'"),
        ("blend", ["--subs", "a.csv", "--out", "submissions/a b.csv"], "--out: 'submissions/a b.csv' is not a path to NAME.csv"),
        ("blend", ["--subs", "a.csv", "--out", "submissions/..csv"], "--out: 'submissions/..csv' is not a path to NAME.csv"),
        ("ensemble", ["submit", *RUN, "--name", "../x"], "--name: '../x' is not a plain name (letters, digits"),
        ("ensemble", ["submit", *RUN, "--name", "a b"], "--name: 'a b' is not a plain name"),
        ("ensemble", ["submit", *RUN, "--name", ".."], "--name: '..' is not a plain name"),
        ("ensemble", ["tune", *RUN, "--jobs", "0"], "--jobs: 0 is not an integer >= 1"),
        ("ensemble", ["tune", *RUN, "--classifier", "../c"], "--classifier: '../c' is not a plain name"),
        ("ensemble", [*PREDICT, "--size", "0"], "--size: 0 is not an integer >= 1"),
        ("ensemble", [*PREDICT, "--data", "d", "--threshold", "1.5"], "--threshold: 1.5 is not in [0, 1]"),
        ("ensemble", [*PREDICT, "--data", "d", "--batch", "0"], "--batch: 0 is not an integer >= 1"),
        ("ensemble", [*PREDICT, "--data", "d", "--workers", "-1"], "--workers: -1 is not an integer >= 0"),
        ("ensemble", [*PREDICT, "--data", "d", "--overlay-px", "10"], "--overlay-px: 10 is not an integer >= 64"),
    ],
)
def test_flag_values_are_one_line_exit_2_before_anything_is_read(tmp_path, monkeypatch, capsys, entry, args, message):
    """Issue 20, item 1: every entry point refuses a value out of its range with one line naming the flag
    (no usage block, no traceback), exit 2, before any file is read or written (none of these files exist)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        entry_point(entry)(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not list(tmp_path.iterdir())


def test_fuse_that_drops_every_reader_or_an_unknown_one_is_an_error(tmp_path, train_csv, capsys):
    out = tmp_path / "fused.csv"
    err = cli_error(capsys, "fuse", "--labels", train_csv, "--drop-readers", "R1", "--out", out)
    assert "--drop-readers R1 drops every reader of the file: nothing left to fuse" in err and not out.exists()
    err = cli_error(capsys, "fuse", "--labels", train_csv, "--drop-readers", "R8", "--out", out)
    assert "--drop-readers R8: no such rad_id in the file; its readers: ['R1']" in err and not out.exists()


# ---------------------------------------------------------------- what would move a score without a word


def test_repeated_label_rows_stop_evaluate(tmp_path, physionet, capsys):
    twice = tmp_path / "twice.csv"
    pd.concat([pd.read_csv(physionet)] * 2).to_csv(twice, index=False)
    good = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n2", "14 1 0 0 1 1"], ["f1", "8 0.9 100 100 200 200"]])
    _, err = evaluate(capsys, "--labels", twice, "--submission", good)
    assert f"error: {twice}, row 5: 3 row(s) repeat an earlier row exactly; this one (image_id 'n1') repeats row 2" in err


def test_class_name_off_by_case_is_scored_as_the_class_with_a_warning(tmp_path, physionet, capsys):
    lower = tmp_path / "lower.csv"
    pd.read_csv(physionet).replace({"Nodule/Mass": "nodule/mass"}).to_csv(lower, index=False)
    good = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n2", "14 1 0 0 1 1"], ["f1", "8 0.9 100 100 200 200"]])
    result, err = evaluate(capsys, "--labels", lower, "--submission", good)
    assert result["map"] == 1.0 and result["ap"]["8"] == 1.0  # not dropped: f1 keeps its nodule
    assert "row 4: 1 class_name(s) differ from the known names only by case or spacing" in err


def test_table_of_one_fold_scored_against_every_label_warns(tmp_path, physionet, capsys):
    """Issue 20: a prediction table of one fold scored without --folds counts the other folds as missed."""
    table = tmp_path / "fold1.csv"
    pd.DataFrame([["f1", 8, 0.9, 100, 100, 200, 200], ["n2", 14, 1.0, 0, 0, 1, 1]],
                 columns=["image_id", "class_id", "score", "x_min", "y_min", "x_max", "y_max"]).to_csv(table, index=False)
    result, err = evaluate(capsys, "--labels", physionet, "--submission", table)
    assert result["ap"]["14"] == 0.5  # n1, of the other fold, is missed
    assert (f"warning: {table} has rows for 2 of 3 labelled images: the other 1 are scored as missed (no box); "
            "a table of some folds' images: --folds FILE [--fold K] scores only those") in err
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"image_id": ["n1", "n2", "f1"], "fold": [0, 1, 1]}).to_csv(folds, index=False)
    result, err = evaluate(capsys, "--labels", physionet, "--submission", table, "--folds", folds, "--fold", 1)
    assert result["map"] == 1.0 and err == ""


def test_normalized_boxes_are_scored_with_a_warning(tmp_path, physionet, capsys):
    normalized = sub(tmp_path, [["n1", "14 1 0 0 1 1"], ["n2", "14 1 0 0 1 1"], ["f1", "8 0.9 0.1 0.1 0.2 0.2"]])
    result, err = evaluate(capsys, "--labels", physionet, "--submission", normalized)
    assert result["ap"]["8"] == 0.0  # scored as pixels, like Kaggle
    assert "every finding box (1) lies in [0, 1]: normalized coordinates, not original pixels" in err



@pytest.mark.parametrize("name, plain", [("vbd", True), ("vbd_1.2-a", True), ("../x", False), ("a/b", False),
                                          ("a b", False), ("..", False), (".x", False), ("-x", False), ("", False)])
def test_plain_names(name, plain):
    """Output names (--name, blend's --out NAME.csv, --extra NAME=, --classifier) are one file name in the
    folder meant for them; the Makefile checks NAME= against the same cxr.args.PLAIN_NAME_RE."""
    from cxr.args import is_plain_name

    assert is_plain_name(name) == plain


def make_n(*args: str, dry: bool = True) -> subprocess.CompletedProcess:
    """``make [-n] ARGS`` in the repo, as a user types it (not as a sub-make of `make test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "--no-print-directory", *(["-n"] if dry else []), *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("device, command", [
    ("cpu", "models yolo train --data data/demo --folds folds/demo.csv --profile demo --run-dir runs/demo --set epochs=2 device=cpu"),
    ("1", "CUDA_VISIBLE_DEVICES=1 .venv/bin/python -m models yolo train"),
    ("0,1,2,3", "CUDA_VISIBLE_DEVICES=0,1,2,3 .venv/bin/python -m models yolo train --data data/demo --folds "
                "folds/demo.csv --profile demo --run-dir runs/demo --set epochs=2 gpus=4 --fold 0"),
])
def test_make_device_reaches_the_adapter(device, command):
    """DEVICE=cpu is a setting (it was CUDA_VISIBLE_DEVICES=cpu), a card list trains one job on all of them."""
    r = make_n("train", f"DEVICE={device}", "SET=epochs=2")
    assert r.returncode == 0 and command in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("name", ["../x", "a b", "", ".hidden", "-x"])
def test_make_refuses_a_name_that_is_not_plain(name):
    """NAME names folds/, runs/, submissions/ and reports/ entries: '../x' wrote outside them, 'a b' two wrong files."""
    r = make_n("folds", f"NAME={name}")
    assert r.returncode == 2 and f"NAME='{name}' is not a plain name" in r.stderr and not r.stdout




def test_make_suggests_a_target_or_model_before_any_work():
    r = make_n("trian", dry=False)
    assert r.returncode == 2 and "no target 'trian'; did you mean 'train'?" in r.stderr and not r.stdout
    r = make_n("train", "MODEL=yolov8")  # used to build data and folds first
    assert r.returncode == 2 and "MODEL=yolov8 is not a model; did you mean yolo?" in r.stderr and not r.stdout


@pytest.mark.parametrize("data, profile", [("data/demo", "demo"), ("data/demo/", "demo"), ("/data/vbd1024", "full")])
def test_profile_follows_data(data, profile):
    """The 128 px demo profiles never train on real data by accident: another DATA means the full profiles."""
    r = make_n("train", f"DATA={data}")
    assert r.returncode == 0 and f"--profile {profile} " in r.stdout
    assert "--profile demo " in make_n("train", f"DATA={data}", "PROFILE=demo").stdout  # an explicit choice wins


@pytest.mark.parametrize("target", ["prepare", "data"])
def test_make_exact_keeps_the_full_jpeg2000_decode(target):
    """EXACT=1 reaches cxr's --exact; without it the reduced-resolution decode is the default."""
    assert "--exact" in make_n(target, "SRC=a", "OUT=b", "EXACT=1").stdout
    assert "--exact" not in make_n(target, "SRC=a", "OUT=b").stdout
