"""Normal/abnormal classifier through its real entry point on the synthetic benchmark (offline)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from models.__main__ import main


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cls_run")
    folds = run / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds, run


def args(verb, setup, fold=0, *extra, run=None):
    data, folds, default_run = setup
    return ["classifier", verb, "--data", str(data), "--folds", str(folds), "--fold", str(fold),
            "--run-dir", str(run or default_run), *extra]


def test_labels_fused_and_any_reader_agree_on_vindr_like_data(setup):
    from models.classifier.classifier import labels_table

    data = DataFolder(setup[0])
    fused, any_reader = labels_table(data, "fused"), labels_table(data, "any_reader")
    assert fused.equals(any_reader)  # no image mixes No finding and findings, as in VinDr
    assert 0.1 < fused["abnormal"].mean() < 0.5


def test_all_folds_demo_profile_auc_and_coverage(setup, capsys):
    data, folds, run = setup
    start = time.time()
    for k in range(3):
        main(args("train", setup, k))
        main(args("predict", setup, k, "--set", "tta=true"))
    main(args("merge", setup))
    minutes = (time.time() - start) / 60
    report = json.loads((run / "classifier" / "report.json").read_text())
    with capsys.disabled():
        print(f"\nclassifier demo (3 folds x 100 images): OOF AUC {report['auc_overall']:.4f} "
              f"per fold {report['auc_per_fold']} ({minutes:.1f} min)")
    assert report["auc_overall"] > 0.8
    oof = pd.read_csv(run / "classifier" / "oof.csv", dtype={"image_id": str})
    assert oof["image_id"].is_unique and set(oof["image_id"]) == set(pd.read_csv(folds, dtype={"image_id": str})["image_id"])
    test = pd.read_csv(run / "classifier" / "test.csv", dtype={"image_id": str})
    assert sorted(test["image_id"]) == sorted(DataFolder(data).test_ids())
    assert test["p_abnormal"].between(0, 1).all()
    assert (run / "classifier" / "calibration.png").stat().st_size > 1000
    metrics = pd.read_csv(run / "classifier" / "fold0" / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr"]


def test_resume_after_kill(setup, tmp_path):
    cmd = [sys.executable, "-m", "models", *args("train", setup, 0, "--set", "epochs=3", "imgsz=96", run=tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "classifier" / "fold0" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (tmp_path / "classifier" / "fold0" / "weights.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from epoch" in done.stdout
    assert pd.read_csv(tmp_path / "classifier" / "fold0" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
