"""Faster R-CNN (detectron2) adapter through its real entry point on the synthetic benchmark (offline, CPU)."""
from __future__ import annotations

import json
import pickle
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr.config import load
from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import DataError, write_table
from cxr.predictions import read_predictions
from cxr.synth import SynthConfig, generate
from models.__main__ import main, parse_overrides
from models.detectron.detectron import Config, Mapper, ValidationHook, build_cfg, frozen_bn_checkpoint, records
from tests.conftest import kill_when, model_args

# fold 0 of `tiny`: 4 training images at batch 2 = 2 iterations per epoch
FAST = ["imgsz=128", "batch=2", "rpn_post_nms_topk_test=100"]
# 3 epochs, validation at epochs 2 and 3 (the last always validates); an opts pair for detectron2's config
TRAINED = [*FAST, "epochs=3", "validate_every=2", "snapshots=1", 'opts=[MODEL.RPN.NMS_THRESH, "0.6"]']
PROFILES = Path(__file__).resolve().parents[1] / "models" / "detectron"
COLUMNS = ["epoch", "train_loss", "val_loss", "val_map", "lr", "seconds"]


def args(verb, setup, *extra, run=None):
    return model_args("detectron", verb, setup, *extra, run=run)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data, fold file, run root) of a tiny benchmark: 6 training images in 3 folds (fold 0: 4 to train on,
    2 to validate; findings in both), 2 test images; an epoch at batch 2 is 2 iterations."""
    root = tmp_path_factory.mktemp("tiny")
    data = generate(SynthConfig(out=str(root / "data"), n_train=6, n_test=2, size=128, seed=5))
    folds = root / "folds.csv"
    write_table(make_folds(DataFolder(data).labels, n_folds=3, seed=0), folds)
    return data, folds, root / "run"


@pytest.fixture(scope="module")
def trained(tiny):
    """Fold 0 trained for 3 epochs (validated at epochs 2 and 3) and predicted (with flip TTA) once, shared by
    the tests below; with the model's weights at each validation, in order."""
    snapshots = []
    evaluate = ValidationHook.evaluate

    def snapshot_then_evaluate(self, model):
        snapshots.append({k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()})
        return evaluate(self, model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ValidationHook, "evaluate", snapshot_then_evaluate)
        main(args("train", tiny, "--set", *TRAINED))
    main(args("predict", tiny, "--set", *TRAINED, "tta=true"))
    return tiny[2] / "detectron" / "fold0", snapshots


def test_mapper_scales_boxes_per_axis(synth_dir):
    """Records hold original pixels and the meta table's size; the mapper puts the boxes on the
    squashed network image, each axis by its own factor."""
    data = DataFolder(synth_dir)
    fused = data.fused()
    image_id = fused.loc[fused["class_id"] != 14, "image_id"].iloc[0]
    rec = records(data, [image_id])[0]
    w, h = data.train_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    assert (rec["width"], rec["height"]) == (w, h) and (w, h) != (128, 128)
    g = fused[(fused["image_id"] == image_id) & (fused["class_id"] != 14)]
    mapped = Mapper(Config(imgsz=96), train=False)(rec)
    expected = g[["x_min", "y_min", "x_max", "y_max"]].to_numpy() * np.array([96 / w, 96 / h, 96 / w, 96 / h])
    np.testing.assert_allclose(mapped["instances"].gt_boxes.tensor.numpy(), expected, rtol=1e-5)
    assert mapped["instances"].gt_classes.tolist() == g["class_id"].tolist()
    assert tuple(mapped["image"].shape) == (3, 96, 96) and (mapped["height"], mapped["width"]) == (96, 96)


def test_empty_images_train(synth_dir, tmp_path):
    """A batch of normal images (no annotations) gives finite losses through the GN model built from scratch."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    data = DataFolder(synth_dir)
    fused = data.fused()
    normal = fused.loc[fused["class_id"] == 14, "image_id"].tolist()[:2]
    cfg = Config(depth=18, imgsz=128, device="cpu")
    mapper = Mapper(cfg, train=True)
    batch = [mapper(r) for r in records(data, normal)]
    assert all(len(b["instances"]) == 0 for b in batch)
    model = build_model(build_cfg(cfg, tmp_path)).train()
    with EventStorage(0):  # detectron2 logs training statistics into the trainer's storage
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.bottom_up.stem.conv1.norm.__class__.__name__ == "GroupNorm"


def test_train_and_predict(tiny, trained):
    data, folds, _ = tiny
    out, _ = trained
    assert (out / "weights.pth").exists() and (out / "best.pth").exists()
    metrics = [json.loads(l) for l in (out / "train" / "metrics.json").read_text().splitlines()]
    assert any("val_map" in m for m in metrics) and any("total_loss" in m for m in metrics)
    # one final and one best file; none of detectron2's checkpoints (with the optimizer) once the fold is finished;
    # detectron2's resolved config beside ours, its network in model.txt
    assert not list((out / "train").glob("*.pth")) and not (out / "train" / "last_checkpoint").exists()
    assert set(torch.load(out / "weights.pth", weights_only=True)) == {"model"}
    d2 = yaml.safe_load((out / "detectron2.yaml").read_text())
    assert d2["SOLVER"]["MAX_ITER"] == 3 * 2 and d2["SOLVER"]["CHECKPOINT_PERIOD"] == 2
    assert d2["TEST"]["EVAL_PERIOD"] == 4 and d2["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 14
    assert d2["MODEL"]["RPN"]["NMS_THRESH"] == 0.6  # the opts pair, merged last
    assert "GeneralizedRCNN" in (out / "model.txt").read_text()
    d = DataFolder(data)
    oof = read_predictions(out / "oof.csv", d.train_sizes)
    f = pd.read_csv(folds, dtype={"image_id": str})
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])
    assert set(read_predictions(out / "test.csv", d.test_sizes)["image_id"]) == set(d.test_ids())


def test_curves_metrics_csv_and_tensorboard(trained):
    """metrics.csv: one row per epoch with the shared columns, validation cells only on the epochs that
    validated; TensorBoard events of ours (tensorboard/) and detectron2's (train/)."""
    out, _ = trained
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == COLUMNS and m["epoch"].tolist() == [1, 2, 3]
    assert m["val_map"].isna().tolist() == [True, False, False] and m["val_loss"].isna().tolist() == [True, False, False]
    assert np.isfinite(m[["train_loss", "lr", "seconds"]].to_numpy()).all() and (m["seconds"] > 0).all()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "train").glob("events.out.tfevents.*"))


def test_final_and_best_weights(trained, monkeypatch):
    """weights.pth = the model after the last step, best.pth = the model of the best validation (the first
    of equal scores); checkpoint=best makes load_infer load best.pth, the default weights.pth."""
    import models.detectron.detectron as d

    out, snapshots = trained
    m = pd.read_csv(out / "metrics.csv").dropna(subset=["val_map"])
    assert m["epoch"].tolist() == [2, 3] and len(snapshots) == 2
    best_i = int(np.argmax(m["val_map"].to_numpy()))
    final = torch.load(out / "weights.pth", weights_only=True)["model"]
    best = torch.load(out / "best.pth", weights_only=True)["model"]
    assert set(final) == set(best) == set(snapshots[-1])
    for k in final:
        assert torch.equal(final[k], snapshots[-1][k]) and torch.equal(best[k], snapshots[best_i][k]), k
    loaded = []
    checkpointer_load = d.DetectionCheckpointer.load
    monkeypatch.setattr(d.DetectionCheckpointer, "load", lambda self, path, *a, **kw: loaded.append(Path(path)) or
                        checkpointer_load(self, path, *a, **kw))
    cfg = load_cfg(*TRAINED, "device=cpu")
    d.load_infer(replace(cfg, checkpoint="best"), out)
    d.load_infer(cfg, out)
    assert loaded == [out / "best.pth", out / "weights.pth"]


def load_cfg(*overrides: str, profile: str = "demo") -> Config:
    return load(Config, PROFILES / f"{profile}.yaml", parse_overrides(list(overrides)))


def test_opts_reach_detectron2_and_are_checked(tiny, tmp_path, capsys):
    """opts: KEY VALUE pairs merged last; a key detectron2 does not have is one error line naming it (before
    anything is written); a key set from a field is refused naming the field; a value of the wrong type too."""
    d2 = build_cfg(load_cfg("opts=[MODEL.RPN.NMS_THRESH, '0.6', MODEL.ROI_HEADS.NMS_THRESH_TEST, '0.4']"), tmp_path)
    assert (d2.MODEL.RPN.NMS_THRESH, d2.MODEL.ROI_HEADS.NMS_THRESH_TEST) == (0.6, 0.4)
    with pytest.raises(SystemExit) as e:
        main(args("train", tiny, "--set", *FAST, "opts=[MODEL.RPN.NMS_THRES, '0.6']", run=tmp_path / "run"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "MODEL.RPN.NMS_THRES: detectron2's config has no such key" in err
    assert not (tmp_path / "run").exists()
    for opts, message in [("[SOLVER.BASE_LR, '0.1']", "SOLVER.BASE_LR is set from the field 'lr'"),
                          ("[INPUT.MIN_SIZE_TEST, '256']", "set from the field 'imgsz'"),
                          ("[MODEL.RPN.NMS_THRESH, abc]", "Type mismatch"),
                          ("[MODEL.RPN.NMS_THRESH]", "expected KEY VALUE pairs")]:
        with pytest.raises(DataError, match=message):
            build_cfg(load_cfg(f"opts={opts}"), tmp_path)


def test_resume_after_kill(tiny, tmp_path):
    """checkpoint_minutes ~ 0: a timed checkpoint after every iteration, also within an epoch (detectron2's own
    checkpointer counts iterations). Kill once one is complete (detectron2 names it in last_checkpoint after
    writing it); the rerun continues from that checkpoint and ends after the last epoch, with one metrics.csv
    row per epoch and no timed checkpoint left. Its console: the epoch lines without `nan` (epoch 2 does not
    validate), and the network's printout in model.txt, not on the console."""
    argv = args("train", tiny, "--set", *FAST, "epochs=3", "validate_every=3", "checkpoint_minutes=0.00001", run=tmp_path)
    out = tmp_path / "detectron" / "fold0"
    pointer = out / "train" / "last_checkpoint"
    kill_when(argv, pointer.exists)
    checkpoint = pointer.read_text().strip()
    assert checkpoint == "model_timed.pth" and not (out / "weights.pth").exists()
    done = subprocess.run([sys.executable, "-m", "models", *argv], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Loading from" in log and checkpoint in log, log[-3000:]  # resumed from that checkpoint
    assert (out / "weights.pth").exists() and not (out / "train" / "model_timed.pth").exists()
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines][-2:] == ["2", "3"] and "val_map" in epoch_lines[-1], epoch_lines
    assert not any("nan" in line for line in epoch_lines), epoch_lines
    assert "Model:" not in log and f"layers in {out / 'model.txt'}" in done.stdout
    assert "and every 1e-05 min" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-3000:]  # pkg_resources, torch.jit.script, torch.meshgrid


# a zoo-like start: FrozenBN ResNet, stem + res2 frozen, no FPN/box-head norm, BGR 0-255 statistics
ZOO = ["norm=FrozenBN", "head_norm=''", "freeze_at=2", "pixel_mean=[103.53, 116.28, 123.675]", "pixel_std=[1, 1, 1]"]


def write_zoo_checkpoint(path: Path, cfg: Config, out: Path) -> dict[str, np.ndarray]:
    """A Faster R-CNN checkpoint of ``cfg``'s architecture with the COCO head (80 classes) in the
    model zoo's published format: a pickle of ``{'model': {name: ndarray}, '__author__': ...}``."""
    from detectron2.modeling import build_model

    d2 = build_cfg(cfg, out).clone()
    d2.defrost()
    d2.MODEL.ROI_HEADS.NUM_CLASSES = 80
    torch.manual_seed(1)
    state = {k: v.numpy() for k, v in build_model(d2).state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    return state


def test_zoo_checkpoint_transfers(tiny, tmp_path, capfd):
    """--set weights=FILE lr=1e-30 (too small to move a float32 weight): after a training iteration the backbone
    equals the file's, the class layer has 14 + 1 outputs (the COCO 81 re-initialised), and the load is
    reported in one line."""
    overrides = [*FAST, "batch=4", "epochs=1", *ZOO]  # 1 iteration
    cfg = load_cfg(*overrides)
    source = write_zoo_checkpoint(tmp_path / "zoo.pkl", cfg, tmp_path)
    main(args("train", tiny, "--set", *overrides, f"weights={tmp_path / 'zoo.pkl'}", "lr=1e-30",
              run=tmp_path / "run"))
    log = capfd.readouterr().out
    assert f"tensors from {tmp_path / 'zoo.pkl'}; re-initialised: roi_heads.box_predictor" in log
    state = torch.load(tmp_path / "run" / "detectron" / "fold0" / "weights.pth", weights_only=True)["model"]
    backbone = [k for k in state if k.startswith("backbone.")]
    assert len(backbone) > 100
    for k in backbone:
        np.testing.assert_allclose(state[k].numpy(), source[k], rtol=1e-6, atol=1e-20, err_msg=k)  # zeros move by ~1e-32
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 15
    assert source["roi_heads.box_predictor.cls_score.weight"].shape[0] == 81
    d2 = yaml.safe_load((tmp_path / "run" / "detectron" / "fold0" / "detectron2.yaml").read_text())
    assert d2["MODEL"]["RESNETS"]["NORM"] == "FrozenBN" and d2["MODEL"]["PIXEL_STD"] == [1, 1, 1]


def c2_name(key: str) -> str:
    """A detectron2 ResNet name in the MSRA/Caffe2 ImageNet R-50.pkl's spelling:
    ``res3.1.conv2.norm.weight`` -> ``res3_1_branch2b_bn_s``, ``stem.conv1.weight`` -> ``conv1_w``."""
    key = key.replace("stem.conv1.norm.", "res_conv1.norm.").replace("stem.conv1.", "conv1.")
    for ours, theirs in {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}.items():
        key = key.replace(f".{ours}.", f".{theirs}.")
    key = key.replace(".norm.weight", "_bn_s").replace(".norm.bias", "_bn_b")
    return key.replace(".weight", "_w").replace(".bias", "_b").replace(".", "_")


def test_imagenet_caffe2_backbone_loads(tmp_path, capsys):
    """An ImageNet R-50 in the format of the MSRA R-50.pkl (a pickle of {Caffe2 name: ndarray}: conv
    weights, BN scale and shift folded, no running statistics, a 1000-class fc) loads into the FrozenBN
    ResNet through detectron2's renaming; FPN and heads keep their init."""
    from detectron2.modeling import build_model

    from models.detectron.detectron import load_weights

    cfg = Config(depth=50, norm="FrozenBN", head_norm="", freeze_at=2, imgsz=128, fpn_channels=64, box_head_dim=64,
                 device="cpu")
    torch.manual_seed(1)
    source = build_model(build_cfg(cfg, tmp_path)).backbone.bottom_up.state_dict()
    learned = [k for k in source if not k.endswith(("running_mean", "running_var"))]
    blobs = {c2_name(k): source[k].numpy() for k in learned}
    blobs.update(fc1000_w=np.zeros((1000, 2048), np.float32), fc1000_b=np.zeros(1000, np.float32))
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(blobs, f)
    torch.manual_seed(2)
    model = build_model(build_cfg(cfg, tmp_path))
    load_weights(model, str(tmp_path / "R-50.pkl"))
    got = model.backbone.bottom_up.state_dict()
    assert len(learned) == 159  # 53 convolutions: weight, BN scale, BN shift
    for k in learned:
        torch.testing.assert_close(got[k], source[k], rtol=0, atol=0, msg=k)
    assert f"loaded {len(learned)} of " in capsys.readouterr().out


def test_missing_or_needed_checkpoint_is_one_line(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args("train", tiny, "--set", *FAST, f"weights={tmp_path / 'faster_rcnn_R_101_FPN_3x_f6e8b1.pkl'}",
                  run=tmp_path))
    assert e.value.code == 2 and "`make weights` downloads it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # FrozenBN from scratch would diverge: stop and say what to set
        main(args("train", tiny, "--set", *FAST, *ZOO, "weights=null", run=tmp_path))
    assert e.value.code == 2 and "set norm=GN" in capsys.readouterr().err
    assert not (tmp_path / "detectron" / "fold0" / "train").exists()


@pytest.mark.slow
@pytest.mark.full_profile
def test_full_profile_builds_steps_and_predicts(tmp_path, figures):
    """models/detectron/full.yaml as it is (R101-FPN FrozenBN at 1024 px, augmentation and zoo-checkpoint
    start), except epochs=1 and batch=1 on 1 training image (detectron2's sampler fills every batch, so the
    profile's batch of 4 would be four 1024-px R101 passes; the batch is checked against the solver in
    test_gpus_scale_the_solver_as_detectron2_would) and, as the zoo file is not here, weights = a zoo-format
    file of the same architecture: one iteration, validation on one image, then a prediction with flip TTA
    on that image and one test image."""
    data = generate(SynthConfig(out=str(tmp_path / "data"), n_train=2, n_test=1, size=128, seed=5))
    d = DataFolder(data)
    ids = sorted(d.train_sizes["image_id"])
    folds = tmp_path / "folds.csv"
    write_table(pd.DataFrame({"image_id": ids, "fold": [0, 1]}), folds)
    cfg = load(Config, PROFILES / "full.yaml")
    zoo = tmp_path / "zoo_r101.pkl"
    frozen_bn_checkpoint(zoo, cfg, [d.image("train", ids[1])])  # BatchNorm statistics of one image
    common = ["--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(tmp_path / "run"),
              "--profile", "full", "--set", "epochs=1", "batch=1", f"weights={zoo}", "device=cpu"]
    start = time.time()
    main(["detectron", "train", *common])
    train_s = time.time() - start
    out = tmp_path / "run" / "detectron" / "fold0"
    d2 = yaml.safe_load((out / "detectron2.yaml").read_text())
    assert d2["INPUT"]["MIN_SIZE_TEST"] == 1024 and d2["SOLVER"]["IMS_PER_BATCH"] == 1
    assert d2["MODEL"]["RESNETS"]["DEPTH"] == 101 and d2["MODEL"]["RESNETS"]["NORM"] == "FrozenBN"
    assert d2["SOLVER"]["MAX_ITER"] == 1 and cfg.tta
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].tolist() == [1] and m["val_map"].notna().all() and m["train_loss"].notna().all()
    start = time.time()
    main(["detectron", "predict", *common])
    predict_s = time.time() - start
    assert set(read_predictions(out / "test.csv", d.test_sizes)["image_id"]) == set(d.test_ids())
    assert set(read_predictions(out / "oof.csv", d.train_sizes)["image_id"]) == {ids[0]}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures(f"detectron full (1024 px, batch 1, CPU): train incl. validation on 1 image {train_s:.0f} s "
            f"for 1 step, predict {predict_s:.0f} s (1 test + 1 val image, TTA), peak RSS {rss:.1f} GiB")


def test_gpus_scale_the_solver_as_detectron2_would(tmp_path):
    """batch is per GPU and an epoch is every training image once: N GPUs run N x the images per iteration
    at N x lr for 1/N of the iterations (detectron2's auto_scale_workers rule), the same epochs. The full
    profile on a 12,000-image fold: 3000 iterations per epoch, 30000 in all, warmup 1000."""
    cfg = load(Config, PROFILES / "full.yaml", {"device": "cpu"})
    one, four = build_cfg(cfg, tmp_path, train_images=12000), build_cfg(cfg, tmp_path, gpus=4, train_images=12000)
    assert (one.SOLVER.IMS_PER_BATCH, one.SOLVER.BASE_LR, one.SOLVER.MAX_ITER) == (4, 0.005, 30000)
    assert (one.SOLVER.WARMUP_ITERS, one.SOLVER.STEPS, one.TEST.EVAL_PERIOD) == (1000, (21000, 27000), 3000)
    assert (four.SOLVER.IMS_PER_BATCH, four.SOLVER.MAX_ITER, four.SOLVER.WARMUP_ITERS) == (16, 7500, 250)
    assert four.SOLVER.BASE_LR == pytest.approx(0.02) and four.SOLVER.STEPS == (5250, 6750)
    assert (four.TEST.EVAL_PERIOD, four.SOLVER.CHECKPOINT_PERIOD) == (750, 750)  # validate_every 1: every epoch
    assert four.SOLVER.IMS_PER_BATCH * four.SOLVER.MAX_ITER == one.SOLVER.IMS_PER_BATCH * one.SOLVER.MAX_ITER


def test_demo_profile_keeps_its_schedule(tmp_path):
    """The demo profile in epochs is the run it was in iterations: 200 training images at batch 4 = 50
    iterations per epoch, 5 epochs = 250 iterations, warmup 30, LR steps at 75% and 90%, a checkpoint every
    epoch, validation every second epoch and at the end."""
    d2 = build_cfg(load(Config, PROFILES / "demo.yaml", {"device": "cpu"}), tmp_path, train_images=200)
    assert (d2.SOLVER.MAX_ITER, d2.SOLVER.WARMUP_ITERS, d2.SOLVER.STEPS) == (250, 30, (187, 225))
    assert (d2.SOLVER.CHECKPOINT_PERIOD, d2.TEST.EVAL_PERIOD, d2.SOLVER.BASE_LR) == (50, 100, 0.02)


def test_gpus_launch_on_a_free_local_port(monkeypatch, tmp_path):
    """gpus: N goes through detectron2's launch with dist_url=auto (a free port on 127.0.0.1); without a
    dist_url, launch died on "MASTER_ADDR expected" before training."""
    import models.detectron.detectron as d

    class Launched(Exception):
        pass

    def launch(fn, n, **kw):
        raise Launched(fn, n, kw)

    monkeypatch.setattr(d, "launch", launch)
    monkeypatch.setattr(d, "device", lambda requested="auto": "cuda")
    with pytest.raises(Launched) as e:
        d.train(Config(gpus=2, norm="GN"), None, None, 0, tmp_path)
    fn, n, kw = e.value.args
    assert fn is d._train_worker and n == 2 and kw["dist_url"] == "auto"
    monkeypatch.undo()
    with pytest.raises(DataError, match="detectron2 trains on several processes on CUDA only"):
        d.train(Config(gpus=2, device="cpu", norm="GN"), None, None, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_infer_takes_a_view_size(trained, tiny):
    import models.detectron.detectron as adapter
    from tests.conftest import assert_infer_takes_a_view_size

    assert_infer_takes_a_view_size(adapter, trained[0], tiny[0])


def test_a_snapshot_is_a_checkpoint_view(trained, tiny):
    """snapshots=1 of 3 epochs keeps epoch 2 (snapshot_e2.pth, the bare model as best.pth); with
    checkpoint_views the fold predicts with it and with the final weights, which differ."""
    import models.detectron.detectron as adapter
    from cxr.config import load
    from cxr.images import read_image
    from models.common import fold_infers

    out = trained[0]
    assert [p.name for p in out.glob("snapshot_*")] == ["snapshot_e2.pth"]
    cfg = load(Config, out / "config.yaml", {"checkpoint_views": True, "score_thr": 0.0})
    infers = fold_infers(adapter.load_infer, cfg, out)
    assert [name for name, _ in infers] == ["final", "snapshot_e2.pth"]
    image = read_image(DataFolder(tiny[0]).image("test", DataFolder(tiny[0]).test_ids()[0]))
    (a, _, _), (b, _, _) = (infer([image])[0] for _, infer in infers)
    assert a.shape != b.shape or not np.allclose(a, b)
