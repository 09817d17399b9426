"""Faster R-CNN (detectron2) adapter through its real entry point on the synthetic benchmark (offline, CPU)."""
from __future__ import annotations

import json
import os
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
from models.detectron.detectron import AlbumentationsMapper, Config, build_cfg, records

FAST = ["max_iter=4", "eval_period=2", "checkpoint_period=2", "imgsz=128", "batch=2", "rpn_post_nms_topk_test=100"]


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("d2_run")
    folds = run / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds, run


def args(verb, setup, *extra, run=None):
    data, folds, default_run = setup
    return ["detectron", verb, "--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(run or default_run), *extra]


def test_records_scale_boxes_per_axis(synth_dir):
    data = DataFolder(synth_dir)
    fused = data.fused()
    image_id = fused.loc[fused["class_id"] != 14, "image_id"].iloc[0]
    rec = records(data, [image_id])[0]
    w, h = data.train_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    g = fused[(fused["image_id"] == image_id) & (fused["class_id"] != 14)]
    expected = g[["x_min", "y_min", "x_max", "y_max"]].to_numpy() * np.array([128 / w, 128 / h, 128 / w, 128 / h])
    np.testing.assert_allclose(np.array([a["bbox"] for a in rec["annotations"]]), expected)
    assert (rec["height"], rec["width"]) == (128, 128)


def test_empty_images_train(synth_dir, tmp_path):
    """A batch of normal images (no annotations) gives finite losses through the GN model built from scratch."""
    from detectron2.modeling import build_model

    data = DataFolder(synth_dir)
    fused = data.fused()
    normal = fused.loc[fused["class_id"] == 14, "image_id"].tolist()[:2]
    mapper = AlbumentationsMapper(128, train=True)
    batch = [mapper(r) for r in records(data, normal)]
    assert all(len(b["instances"]) == 0 for b in batch)
    from detectron2.utils.events import EventStorage

    model = build_model(build_cfg(Config(depth=18, imgsz=128, device="cpu"), tmp_path)).train()
    with EventStorage(0):  # detectron2 logs training statistics into the trainer's storage
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.bottom_up.stem.conv1.norm.__class__.__name__ == "GroupNorm"


def test_train_predict_and_resume(setup, tmp_path):
    data, folds, run = setup
    main(args("train", setup, "--set", *FAST))
    out = run / "detectron" / "fold0"
    assert (out / "weights.pth").exists() and (out / "curves.png").exists()
    metrics = [json.loads(l) for l in (out / "train" / "metrics.json").read_text().splitlines()]
    assert any("val_map" in m for m in metrics) and any("total_loss" in m for m in metrics)
    main(args("predict", setup, "--set", *FAST, "tta=true"))
    d = DataFolder(data)
    oof = read_predictions(out / "oof.csv", d.train_sizes)
    f = pd.read_csv(folds, dtype={"image_id": str})
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])
    assert set(read_predictions(out / "test.csv", d.test_sizes)["image_id"]) == set(d.test_ids())

    # resume: kill once a checkpoint is complete (detectron2 names it in last_checkpoint after writing it),
    # rerun: training continues from that checkpoint and ends at max_iter
    fast = [s for s in FAST if not s.startswith(("eval_period", "max_iter"))] + ["eval_period=100", "max_iter=10"]
    cmd = [sys.executable, "-m", "models", *args("train", setup, "--set", *fast, run=tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = tmp_path / "detectron" / "fold0" / "train" / "last_checkpoint"
    deadline = time.time() + 600
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = pointer.read_text().strip()
    assert checkpoint.startswith("model_0") and not (tmp_path / "detectron" / "fold0" / "weights.pth").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Loading from" in log and checkpoint in log, log[-3000:]  # resumed from that checkpoint
    assert (tmp_path / "detectron" / "fold0" / "weights.pth").exists()


@pytest.mark.slow
def test_demo_profile_beats_prior_boxes(tmp_path_factory, capsys):
    ours, prior, minutes = demo_beats_prior("detectron", tmp_path_factory.mktemp("detectron_demo"))
    with capsys.disabled():
        print(f"\ndetectron demo fold 0: OOF mAP@0.4 {ours:.4f} vs prior boxes {prior:.4f} ({minutes:.1f} min)")
    assert ours > prior
