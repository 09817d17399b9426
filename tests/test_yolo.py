"""YOLOv8 adapter through its real entry point (python -m models yolo ...), offline, on the synthetic benchmark."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.predictions import read_predictions
from models.__main__ import main
from tests.conftest import demo_beats_prior

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("yolo_run")
    folds = run / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds, run


def args(verb, setup, *extra, run=None):
    data, folds, default_run = setup
    return ["yolo", verb, "--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(run or default_run), *extra]


def test_prepare_writes_yolo_dataset(setup):
    main(args("prepare", setup))
    data, folds, run = setup
    root = run / "yolo" / "fold0" / "dataset"
    f = pd.read_csv(folds)
    val = f.loc[f["fold"] == 0, "image_id"]
    assert len(list((root / "images" / "val").glob("*.png"))) == len(val)
    assert len(list((root / "labels" / "train").glob("*.txt"))) == (f["fold"] != 0).sum()
    lines = [l for p in (root / "labels" / "train").glob("*.txt") for l in p.read_text().splitlines()]
    values = np.array([[float(v) for v in l.split()] for l in lines])
    assert values[:, 0].max() <= 13 and (values[:, 1:] >= 0).all() and (values[:, 1:] <= 1).all()
    assert any(p.read_text() == "" for p in (root / "labels" / "train").glob("*.txt"))  # normal = background


def test_train_one_epoch_and_predict(setup):
    main(args("train", setup, "--set", "epochs=1"))
    data, folds, run = setup
    out = run / "yolo" / "fold0"
    assert (out / "weights.pt").exists() and (out / "config.yaml").exists()
    assert (out / "train" / "results.csv").exists()  # per-epoch metrics log
    main(args("predict", setup, "--set", "tta=true"))
    d = DataFolder(data)
    oof = read_predictions(out / "oof.csv", d.train_sizes)  # validates format and in-image boxes
    test = read_predictions(out / "test.csv", d.test_sizes)
    f = pd.read_csv(folds)
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])  # a No-finding row per image at least
    assert set(test["image_id"]) == set(d.test_ids())


def test_resume_after_kill(setup, tmp_path):
    cmd = [sys.executable, "-m", "models", *args("train", setup, "--set", "epochs=3", run=tmp_path)]
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "yolo" / "fold0" / "train" / "weights" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (tmp_path / "yolo" / "fold0" / "weights.pt").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming training" in done.stdout + done.stderr
    results = pd.read_csv(tmp_path / "yolo" / "fold0" / "train" / "results.csv")
    assert results["epoch"].tolist() == [1, 2, 3]


@pytest.mark.slow
def test_demo_profile_beats_prior_boxes(tmp_path_factory, capsys):
    ours, prior, minutes = demo_beats_prior("yolo", tmp_path_factory.mktemp("yolo_demo"))
    with capsys.disabled():
        print(f"\nyolo demo fold 0: OOF mAP@0.4 {ours:.4f} vs prior boxes {prior:.4f} ({minutes:.1f} min)")
    assert ours > prior
