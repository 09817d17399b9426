"""EfficientDet adapter through its real entry point on the synthetic benchmark (offline, CPU)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.predictions import read_predictions
from models.__main__ import main
from tests.conftest import demo_beats_prior
from models.effdet.effdet import Boxes, Config, build, collate

FAST = ["epochs=1", "imgsz=128", "batch=4"]


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("effdet_run")
    folds = run / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds, run


def args(verb, setup, *extra, run=None):
    data, folds, default_run = setup
    return ["effdet", verb, "--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(run or default_run), *extra]


def test_images_without_boxes_train(synth_dir):
    """A batch of only normal images gives a finite loss and gradients (effdet's padding row, class -1)."""
    data = DataFolder(synth_dir)
    fused = data.fused()
    normal = fused.loc[fused["class_id"] == 14, "image_id"].tolist()[:4]
    x, target = collate([Boxes(data, normal, fused, 128, augment=True)[i] for i in range(4)])
    assert all(t.tolist() == [-1.0] for t in target["cls"])
    bench = build(Config(imgsz=128, backbone_init=None)).train()
    loss = bench(x, target)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in bench.parameters())


def test_targets_are_yxyx_in_input_pixels_and_one_based(synth_dir):
    data = DataFolder(synth_dir)
    fused = data.fused()
    image_id = fused.loc[fused["class_id"] != 14, "image_id"].iloc[0]
    _, target = Boxes(data, [image_id], fused, 256, augment=False)[0]
    g = fused[(fused["image_id"] == image_id) & (fused["class_id"] != 14)]
    w, h = data.train_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    expected = g[["y_min", "x_min", "y_max", "x_max"]].to_numpy() * np.array([256 / h, 256 / w, 256 / h, 256 / w])
    order = np.argsort(expected[:, 0])
    got = target["bbox"].numpy()
    np.testing.assert_allclose(got[np.argsort(got[:, 0])], expected[order], atol=0.6)
    assert sorted(target["cls"].tolist()) == sorted((g["class_id"] + 1).tolist())


def test_train_predict_and_resume(setup, tmp_path):
    data, folds, run = setup
    main(args("train", setup, "--set", *FAST))
    out = run / "effdet" / "fold0"
    assert {"weights.pt", "last.pt", "metrics.csv", "config.yaml"} <= {p.name for p in out.iterdir()}
    main(args("predict", setup, "--set", *FAST, "tta=true"))
    d = DataFolder(data)
    oof = read_predictions(out / "oof.csv", d.train_sizes)
    f = pd.read_csv(folds, dtype={"image_id": str})
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])
    assert set(read_predictions(out / "test.csv", d.test_sizes)["image_id"]) == set(d.test_ids())

    # resume: a run killed after its first epoch checkpoint finishes the remaining epochs
    cmd = [sys.executable, "-m", "models", *args("train", setup, "--set", "epochs=2", "imgsz=128", "batch=4", run=tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "effdet" / "fold0" / "last.pt"
    deadline = time.time() + 600
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (tmp_path / "effdet" / "fold0" / "weights.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from epoch 1" in done.stdout
    assert pd.read_csv(tmp_path / "effdet" / "fold0" / "metrics.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_world_size_one_gloo(setup, tmp_path):
    """The DDP code path (process group from torchrun's environment, gloo on CPU) trains and writes weights."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "1", "-m", "models",
           *args("train", setup, "--set", "epochs=1", "imgsz=128", "batch=4", run=tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "effdet" / "fold0" / "weights.pt").exists()


@pytest.mark.slow
def test_demo_profile_beats_prior_boxes(tmp_path_factory, capsys):
    ours, prior, minutes = demo_beats_prior("effdet", tmp_path_factory.mktemp("effdet_demo"))
    with capsys.disabled():
        print(f"\neffdet demo fold 0: OOF mAP@0.4 {ours:.4f} vs prior boxes {prior:.4f} ({minutes:.1f} min)")
    assert ours > prior
