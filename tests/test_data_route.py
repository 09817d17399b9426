"""`cxr data`: Kaggle's DICOM download or a resized-PNG set -> a checked DATA folder.

Sources are written by the test (pydicom DICOMs, cv2 PNGs), so this runs without ../shared/data;
one test also feeds the real JPEG-2000 DICOMs through the same route when they are present.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from cxr.data import DataFolder, check_folder, read_folds
from cxr.images import png_size, writing
from cxr.io import DataError
from tests.conftest import real
from tests.test_bad_input import write_dicom

COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
TRAIN = {"t0": (60, 50), "t1": (48, 64), "t2": (40, 40), "t3": (52, 44)}  # id -> (height, width)
TEST = {"s0": (44, 36), "s1": (50, 50)}


def labels_table() -> pd.DataFrame:
    rows = []
    for i, (h, w) in TRAIN.items():
        for r in ("R1", "R2", "R3"):
            if i in ("t0", "t2") or (i, r) == ("t3", "R1"):  # t3: readers disagree, so not a normal image
                rows.append([i, "No finding", 14, r, None, None, None, None])
            else:
                rows.append([i, "Cardiomegaly", 3, r, 5, 6, w - 5, h - 6])
    return pd.DataFrame(rows, columns=COLUMNS)


def sample_table(ids) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "PredictionString": "14 1 0 0 1 1"})


def kaggle_download(root: Path) -> Path:
    """Kaggle's competition layout: train/ and test/ DICOMs (one MONOCHROME1), train.csv, sample_submission.csv."""
    for split, images in (("train", TRAIN), ("test", TEST)):
        (root / split).mkdir(parents=True)
        for k, (i, (h, w)) in enumerate(images.items()):
            px = np.linspace(0, 4000, h * w).reshape(h, w)
            write_dicom(root / split / f"{i}.dicom", px, "MONOCHROME1" if k == 0 else "MONOCHROME2")
    labels_table().to_csv(root / "train.csv", index=False)
    sample_table(TEST).to_csv(root / "sample_submission.csv", index=False)
    return root


def png_set(root: Path, size: int = 32) -> Path:
    """A public resized-PNG set: squashed PNGs plus meta CSVs with the ORIGINAL sizes; no labels, no sample."""
    for split, images in (("train", TRAIN), ("test", TEST)):
        (root / split).mkdir(parents=True)
        for i in images:
            cv2.imwrite(str(root / split / f"{i}.png"), np.full((size, size), 120, np.uint8))
        pd.DataFrame({"image_id": list(images), "dim0": [h for h, _ in images.values()],
                      "dim1": [w for _, w in images.values()]}).to_csv(root / f"{split}_meta.csv", index=False)
    return root


def run_data(capsys, *args) -> str:
    main(["data", *map(str, args)])
    return capsys.readouterr().out


def test_kaggle_download_route(tmp_path, capsys):
    src, out = kaggle_download(tmp_path / "kaggle"), tmp_path / "DATA"
    text = run_data(capsys, "--src", src, "--out", out, "--size", 24, "--workers", 2)
    for line in ("train_images: 4", "test_images: 2", "train_png_sizes: 24x24", "finding_boxes: 5", "readers: 3"):
        assert f"  {line}\n" in text, text
    summary = check_folder(out)
    assert summary["normal_images"] == 2 and summary["labelled_images"] == 4
    data = DataFolder(out)
    assert data.train_sizes.set_index("image_id").loc["t1"].tolist() == [64, 48]  # width, height from the DICOM
    assert data.test_sizes["image_id"].tolist() == ["s0", "s1"] and data.test_ids() == ["s0", "s1"]
    assert (out / "train.csv").read_bytes() == (src / "train.csv").read_bytes()
    assert png_size(data.image("train", "t0")) == (24, 24)
    # what `make folds` / `make pipeline` run next accepts the folder
    main(["folds", "--labels", str(out / "train.csv"), "--n-folds", "2", "--out", str(tmp_path / "folds.csv")])
    assert len(read_folds(tmp_path / "folds.csv")) == 4
    # a re-run converts nothing and still checks the folder
    assert "0 converted now" in run_data(capsys, "--src", src, "--out", out, "--size", 24)


def test_png_set_route(tmp_path, capsys):
    src, out = png_set(tmp_path / "png"), tmp_path / "DATA"
    labels = tmp_path / "train.csv"
    labels_table().to_csv(labels, index=False)
    run_data(capsys, "--src", src, "--out", out, "--size", 16, "--labels", labels)
    data = DataFolder(out)
    # original sizes come from the meta files, not from the (already resized) PNGs
    assert data.train_sizes.set_index("image_id").loc["t0"].tolist() == [50, 60]
    assert data.test_ids() == ["s0", "s1"]  # the PNG sets ship no sample: built from the test ids
    assert all(png_size(p) == (16, 16) for p in (out / "train").glob("*.png"))
    assert len(data.labels) == 12 and check_folder(out)["normal_images"] == 2
    # a set already at the wanted size is copied byte for byte (decoded to check it, not re-encoded)
    run_data(capsys, "--src", src, "--out", tmp_path / "same", "--size", 32, "--labels", labels)
    assert (tmp_path / "same" / "train" / "t0.png").read_bytes() == (src / "train" / "t0.png").read_bytes()


def test_broken_image_stops_with_the_failure_list(tmp_path, capsys):
    src = kaggle_download(tmp_path / "kaggle")
    (src / "train" / "t3.dicom").write_bytes((src / "train" / "t3.dicom").read_bytes()[:-100])
    out = tmp_path / "DATA"
    with pytest.raises(SystemExit) as e:
        main(["data", "--src", str(src), "--out", str(out), "--size", "16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"1 in {out / 'train' / 'failed.csv'}" in err
    assert len(list((out / "train").glob("*.png"))) == 3 and len(list((out / "test").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda out: (out / "train" / "t1.png").unlink(), "1 image(s) have no train/<id>.png, e.g. ['t1']"),
        (lambda out: shutil.copy(out / "test" / "s0.png", out / "test" / "s9.png"), "no size in test_meta.csv"),
        (lambda out: sample_table(["s0"]).to_csv(out / "sample_submission.csv", index=False), "1 test image(s) missing"),
        (lambda out: sample_table(["s0", "s1", "s1"]).to_csv(out / "sample_submission.csv", index=False), "'s1' listed twice"),
        (lambda out: labels_table().replace({"image_id": {"t0": "zz"}}).to_csv(out / "train.csv", index=False),
         "'zz' has no size"),
    ],
)
def test_check_folder_finds_problem(tmp_path, capsys, break_it, message):
    src, out = png_set(tmp_path / "png"), tmp_path / "DATA"
    labels_table().to_csv(src / "train.csv", index=False)
    run_data(capsys, "--src", src, "--out", out, "--size", 16)
    check_folder(out)
    break_it(out)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_folder(out)


def test_missing_source_files_are_named(tmp_path, capsys):
    src = png_set(tmp_path / "png")
    with pytest.raises(SystemExit):
        main(["data", "--src", str(src), "--out", str(tmp_path / "DATA")])
    assert f"{src / 'train.csv'}: file not found (pass --labels)" in capsys.readouterr().err
    (src / "test_meta.csv").unlink()
    labels_table().to_csv(src / "train.csv", index=False)
    with pytest.raises(SystemExit):
        main(["data", "--src", str(src), "--out", str(tmp_path / "DATA")])
    assert "test_meta.csv: file not found" in capsys.readouterr().err


def test_real_jpeg2000_dicoms_through_the_kaggle_route(tmp_path, capsys):
    """Two real VinDr train DICOMs (JPEG 2000, MONOCHROME1) as train, one of them again as test."""
    real_dir = real("vindr-cxr-images/dfloreaa")
    src = tmp_path / "kaggle"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    files = sorted(real_dir.rglob("*.dicom"))[:2]  # each takes seconds to decode
    for f in files:
        (src / "train" / f.name).symlink_to(f)
    (src / "test" / "x0.dicom").symlink_to(files[0])
    ids = [f.stem for f in files]
    pd.DataFrame([[i, "No finding", 14, "R1", None, None, None, None] for i in ids], columns=COLUMNS).to_csv(src / "train.csv", index=False)
    sample_table(["x0"]).to_csv(src / "sample_submission.csv", index=False)
    run_data(capsys, "--src", src, "--out", tmp_path / "DATA", "--size", 64)
    sizes = DataFolder(tmp_path / "DATA").train_sizes
    assert len(sizes) == 2 and (sizes["width"] > 1500).all() and (sizes["height"] > 1500).all()


def test_png_set_with_sizes_in_train_csv_and_test_csv(tmp_path, capsys):
    """Sets that carry the original sizes as width/height columns of train.csv and test.csv."""
    src = png_set(tmp_path / "png")
    for split in ("train", "test"):
        (src / f"{split}_meta.csv").unlink()
    size = {i: hw for i, hw in TRAIN.items()}
    labels_table().assign(width=lambda d: d["image_id"].map(lambda i: size[i][1]),
                          height=lambda d: d["image_id"].map(lambda i: size[i][0])).to_csv(src / "train.csv", index=False)
    pd.DataFrame({"image_id": list(TEST), "width": [w for _, w in TEST.values()],
                  "height": [h for h, _ in TEST.values()]}).to_csv(src / "test.csv", index=False)
    run_data(capsys, "--src", src, "--out", tmp_path / "DATA", "--size", 16)
    data = DataFolder(tmp_path / "DATA")
    assert data.train_sizes.set_index("image_id").loc["t1"].tolist() == [64, 48]
    assert data.test_sizes.set_index("image_id").loc["s0"].tolist() == [36, 44]
    bad = pd.read_csv(src / "train.csv")
    bad.loc[1, "width"] = 999  # t0 again, with another size
    bad.to_csv(src / "train.csv", index=False)
    with pytest.raises(SystemExit):
        main(["data", "--src", str(src), "--out", str(tmp_path / "DATA2"), "--size", "16"])
    assert "train.csv, row 3: image_id 't0' listed again with another size" in capsys.readouterr().err



# ---------------------------------------------------------------------------- one run per output folder


def busy_line(out: Path, pid: int) -> str:
    return f"error: {out} is being written by another run (pid {pid})"


def test_a_second_run_on_a_folder_being_written_stops_in_one_line(tmp_path, capsys):
    """prepare (another process), data and predict-images refuse a held folder in one line, exit 2,
    and touch nothing in it; once it is free the same command runs."""
    from ensemble import predict_images

    src = png_set(tmp_path / "png")
    labels_table().to_csv(src / "train.csv", index=False)
    out, data = tmp_path / "out", tmp_path / "DATA"
    with writing(out), writing(data):
        cmd = [sys.executable, "-m", "cxr.cli", "prepare", "--src", str(src / "train"), "--out", str(out), "--size", "16"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == busy_line(out, os.getpid()), proc.stderr
        with pytest.raises(SystemExit) as e:
            main(["data", "--src", str(src), "--out", str(data), "--size", "16"])
        captured = capsys.readouterr()
        assert e.value.code == 2 and captured.err.strip() == busy_line(data, os.getpid()) and "valid" not in captured.out
        with pytest.raises(SystemExit) as e:
            predict_images.main(["--src", str(src / "test"), "--run-dir", str(tmp_path / "run"), "--out", str(out),
                                 "--size", "16"])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == busy_line(out, os.getpid())
        assert sorted(p.name for p in out.iterdir()) == [".lock"] and sorted(p.name for p in data.iterdir()) == [".lock"]
    assert not out.exists() and not data.exists()  # created by the lock, left empty: removed
    run_data(capsys, "--src", src, "--out", data, "--size", 16)
    assert not list(data.rglob(".lock"))


def test_two_prepare_runs_at_once_lose_nothing(tmp_path):
    """Started together on one folder: one converts, the other stops in one line (or, if it came
    after, finds everything done); meta.csv always lists every image with its original size."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(src / f"i{i:02d}.png"), rng.integers(0, 255, (300 + i, 400), dtype=np.uint8))
    cmd = [sys.executable, "-m", "cxr.cli", "prepare", "--src", str(src), "--out", str(out), "--size", "32", "--workers", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    assert sorted(r[3] for r in results) in ([0, 0], [0, 2]), results
    holder = next(pid for pid, _, _, code in results if code == 0)
    for pid, stdout, stderr, code in results:
        if code == 2:
            assert stderr.strip() == busy_line(out, holder) and not stdout, (stdout, stderr)
    meta = pd.read_csv(out / "meta.csv")
    assert len(meta) == 24 and meta["dim0"].tolist() == list(range(300, 324))
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.csv", *(f"i{i:02d}.png" for i in range(24))])


@pytest.mark.parametrize("argv, words", [
    (["prepare", "--src", "{src}/train", "--out", "{src}/train"], ["{src}/train", "OUT must differ from SRC"]),
    (["prepare", "--src", "{src}/train", "--out", "{tmp}/o", "--workers", "-1"], ["--workers", "-1"]),
    (["data", "--src", "{src}", "--out", "{tmp}/o", "--workers", "-1"], ["--workers", "-1"]),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, words):
    """Not "no files found" (SRC = OUT), not a traceback (--workers -1): one line naming the value."""
    src = png_set(tmp_path / "png")
    labels_table().to_csv(src / "train.csv", index=False)
    with pytest.raises(SystemExit) as e:
        main([a.format(src=src, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w.format(src=src) in err for w in words), err
    assert not (tmp_path / "o").exists()
