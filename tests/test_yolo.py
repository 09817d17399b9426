"""YOLOv8 adapter through its real entry point (python -m models yolo ...), offline, on the synthetic benchmark."""
from __future__ import annotations

import resource
import time
import zipfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr.config import load
from cxr.data import DataFolder
from cxr.io import write_table
from cxr.predictions import read_predictions
from cxr.synth import SynthConfig, generate
from models.__main__ import main
from tests.conftest import images_by_finding, kill_when, model_args

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PROFILES = Path(__file__).resolve().parents[1] / "models" / "yolo"


def args(verb, setup, *extra, run=None):
    return model_args("yolo", verb, setup, *extra, run=run)


@pytest.fixture(scope="module")
def trained(fold_setup):
    """Fold 0 trained for one epoch and predicted (with flip TTA) once, shared by the tests below."""
    main(args("train", fold_setup, "--set", "epochs=1"))
    main(args("predict", fold_setup, "--set", "epochs=1", "tta=true"))  # predict: the training settings + tta
    return fold_setup[2] / "yolo" / "fold0"


@pytest.fixture(scope="module")
def small(fold_setup):
    """(data, fold file, run root) of 12 images, 9 to train on (one batch per epoch) and 3 with findings to
    validate on: for the tests of epochs, curves, checkpoints, resume and weight transfer, not of learning."""
    data, _, run = fold_setup
    found = images_by_finding(data)[0][:3]
    rest = [i for i in sorted(DataFolder(data).train_sizes["image_id"]) if i not in found][:9]
    folds = run / "small_folds.csv"
    write_table(pd.DataFrame({"image_id": rest + found, "fold": [1] * 9 + [0] * 3}), folds)
    return data, folds, run


def _label_lines(root: Path, part: str) -> list[str]:
    return [l for p in (root / "labels" / part).glob("*.txt") for l in p.read_text().splitlines()]


def test_prepare_writes_yolo_dataset(fold_setup):
    main(args("prepare", fold_setup))
    _, folds, run = fold_setup
    root = run / "yolo" / "fold0" / "dataset"
    f = pd.read_csv(folds)
    val = f.loc[f["fold"] == 0, "image_id"]
    assert len(list((root / "images" / "val").glob("*.png"))) == len(val)
    assert len(list((root / "labels" / "train").glob("*.txt"))) == (f["fold"] != 0).sum()
    values = np.array([[float(v) for v in l.split()] for l in _label_lines(root, "train")])
    assert values[:, 0].max() <= 13 and (values[:, 1:] >= 0).all() and (values[:, 1:] <= 1).all()
    assert any(p.read_text() == "" for p in (root / "labels" / "train").glob("*.txt"))  # normal = background


def test_prepare_uses_the_profiles_reader_fusion(fold_setup, tmp_path):
    """``labels:`` picks the training labels' fusion: keep_all writes every reader's box, and
    dropping readers removes theirs (the default WBF writes fewer boxes than keep_all)."""
    data, folds, _ = fold_setup
    d = DataFolder(data)
    val = set(pd.read_csv(folds, dtype={"image_id": str}).query("fold == 0")["image_id"])
    counts = {}
    dropped = tuple(d.labels["rad_id"].value_counts().index[:2])  # the two busiest readers
    for name, labels in {"default": None, "keep_all": "{mode: keep_all}",
                         "drop": f"{{mode: keep_all, drop_readers: [{', '.join(dropped)}]}}"}.items():
        extra = ["--set", f"labels={labels}"] if labels else []
        main(args("prepare", fold_setup, *extra, run=tmp_path / name))
        counts[name] = len(_label_lines(tmp_path / name / "yolo" / "fold0" / "dataset", "train"))
    train_labels = d.labels[~d.labels["image_id"].isin(val) & (d.labels["class_id"] != 14)]
    assert counts["keep_all"] == len(train_labels)
    assert counts["drop"] == (~train_labels["rad_id"].isin(dropped)).sum() < counts["keep_all"]
    assert counts["default"] < counts["keep_all"]


def test_train_one_epoch_and_predict(fold_setup, trained):
    data, folds, _ = fold_setup
    assert (trained / "weights.pt").exists() and (trained / "config.yaml").exists()
    assert (trained / "train" / "results.csv").exists()  # per-epoch metrics log
    d = DataFolder(data)
    oof = read_predictions(trained / "oof.csv", d.train_sizes)  # validates format and in-image boxes
    test = read_predictions(trained / "test.csv", d.test_sizes)
    f = pd.read_csv(folds, dtype={"image_id": str})
    assert set(oof["image_id"]) == set(f.loc[f["fold"] == 0, "image_id"])  # a No-finding row per image at least
    assert set(test["image_id"]) == set(d.test_ids())


def test_curves_and_validate_every(small, tmp_path, capfd, recwarn):
    """validate_every=2, epochs=3: ultralytics validates at epochs 2 and 3 only (mAP@0.4 its fitness, beside
    its own metrics in results.csv); metrics.csv has the shared columns with empty validation cells at epoch
    1, TensorBoard events sit in tensorboard/, plots=true leaves the PR curves, the printed epoch lines never
    say nan, and Ray's get_trial_id warning (ultralytics' raytune callback) is gone."""
    from models.curves import COLUMNS
    from models.yolo.yolo import MAP_KEY

    main(args("train", small, "--set", "epochs=3", "validate_every=2", "plots=true", "snapshots=1", run=tmp_path))
    out = tmp_path / "yolo" / "fold0"
    assert [p.name for p in out.glob("snapshot_*")] == ["snapshot_e2.pt"]  # epoch 2 of 3: the second half
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == [c for c in COLUMNS if c != "val_auc"]
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics.loc[0, ["val_loss", "val_map"]].isna().all()
    assert metrics.loc[1:, ["val_loss", "val_map"]].notna().all().all()
    assert metrics[["train_loss", "lr", "seconds"]].notna().all().all() and (metrics["seconds"] > 0).all()
    results = pd.read_csv(out / "train" / "results.csv")
    assert results["epoch"].tolist() == [1, 2, 3] and results[MAP_KEY].isna().tolist() == [True, False, False]
    assert np.allclose(results[MAP_KEY].iloc[1:], metrics["val_map"].iloc[1:], atol=1e-5)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # plots: true draws the last validation's PR curves, though epoch 2's validation (not the last) drew none
    assert (out / "train" / "BoxPR_curve.png").exists() and (out / "train" / "results.png").exists()
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1", "2", "3"], lines
    assert "val_map" not in lines[0] and "val_map" in lines[1] and not any("nan" in line for line in lines)
    assert not [w for w in recwarn if "get_trial_id" in str(w.message)]


def test_best_is_the_best_validation_and_weights_the_final(small, tmp_path, monkeypatch):
    """The fitness is our mAP@0.4 (scripted here: 0.5 then 0.1): best.pt is the epoch-1 EMA, weights.pt the
    final one (ultralytics' last.pt), patience=1 stops after one epoch without a better mAP@0.4, and
    ``checkpoint=best`` predicts from best.pt."""
    from models.yolo import yolo

    scores = iter([0.5, 0.1])
    monkeypatch.setattr(yolo.PretrainedTrainer, "validation_map", lambda self, net: next(scores))
    main(args("train", small, "--set", "epochs=3", "patience=1", "validate_every=1", run=tmp_path))
    out = tmp_path / "yolo" / "fold0"
    assert pd.read_csv(out / "metrics.csv")["val_map"].tolist() == [0.5, 0.1]  # stopped early by patience
    weights = out / "train" / "weights"
    assert not list(weights.glob("*.pt")), "ultralytics' last.pt and best.pt are moved, not copied: one file each"
    assert torch.load(out / "weights.pt", weights_only=False).get("optimizer") is None  # stripped: nothing to resume
    fitness = {name: torch.load(out / name, weights_only=False)["train_metrics"][yolo.MAP_KEY]
               for name in ("best.pt", "weights.pt")}
    assert fitness == {"best.pt": 0.5, "weights.pt": 0.1}
    loaded = []
    real_yolo = yolo.YOLO
    monkeypatch.setattr(yolo, "YOLO", lambda path, **kw: loaded.append(Path(path)) or real_yolo(path, **kw))
    main(args("predict", small, "--set", "epochs=3", "patience=1", "validate_every=1", "checkpoint=best", run=tmp_path))
    yolo.load_infer(load(yolo.Config, PROFILES / "demo.yaml"), out)
    assert loaded == [out / "best.pt", out / "weights.pt"]
    assert read_predictions(out / "oof.csv", DataFolder(small[0]).train_sizes)["image_id"].nunique() > 1


def _complete(path: Path) -> bool:
    """A torch zip checkpoint whose central directory (written last) is there: fully written."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def test_resume_after_kill(small, tmp_path):
    """The rerun is in this process (only the killed run needs one of its own). It resumed rather than
    restarted: results.csv keeps the killed run's epoch-1 row (its elapsed time) and goes on from it."""
    weights = tmp_path / "yolo" / "fold0" / "train" / "weights"
    argv = args("train", small, "--set", "epochs=3", "validate_every=1", run=tmp_path)
    # epoch 1 always writes last.pt and then best.pt (first fitness is the best): kill once both are complete
    kill_when(argv, lambda: _complete(weights / "last.pt") and _complete(weights / "best.pt"))
    assert not (tmp_path / "yolo" / "fold0" / "weights.pt").exists()
    results_csv = tmp_path / "yolo" / "fold0" / "train" / "results.csv"
    killed = pd.read_csv(results_csv)  # ultralytics writes an epoch's row before its checkpoints
    assert killed["epoch"].tolist() == [1]
    main(argv)
    results = pd.read_csv(results_csv)
    assert results["epoch"].tolist() == [1, 2, 3] and results.iloc[:1].equals(killed)
    metrics = pd.read_csv(tmp_path / "yolo" / "fold0" / "metrics.csv")  # the epochs before the kill kept
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics["val_map"].notna().all()


def write_ultralytics_checkpoint(path: Path, nc: int = 80) -> dict[str, torch.Tensor]:
    """A YOLOv8n checkpoint with ``nc`` classes in the format ultralytics publishes (yolov8x.pt):
    saved with torch.save, then stripped by ultralytics' own strip_optimizer (FP16 network under
    'model', no optimizer, epoch -1). Returns the network's tensors as they are in the file."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import strip_optimizer

    torch.manual_seed(1)
    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    torch.save({"model": deepcopy(model), "ema": None, "optimizer": None, "epoch": 0, "train_args": {}}, path)
    strip_optimizer(path)
    return {k: v.float() for k, v in torch.load(path, weights_only=False)["model"].state_dict().items()}


def test_pretrained_checkpoint_transfers(small, tmp_path, capfd):
    """--set weights=FILE lr=1e-30 (too small to move a float32 weight; lr must be > 0): backbone (and neck)
    conv weights after a training step equal the file's; the class branch is re-initialised with 14 outputs;
    the augmentation fields reach ultralytics under its names, other ultralytics keys pass through."""
    source = write_ultralytics_checkpoint(tmp_path / "coco80.pt")
    main(args("train", small, "--set", f"weights={tmp_path / 'coco80.pt'}", "lr=1e-30", "warmup_epochs=0",
              "epochs=1", "degrees=7.0", "translate=0.2", "brightness_contrast=0.3",
              "train_args={shear: 2.0, mixup: 0.1}", run=tmp_path / "run"))
    out = tmp_path / "run" / "yolo" / "fold0"
    log = capfd.readouterr().out
    assert f"tensors from {tmp_path / 'coco80.pt'}; re-initialised: " in log and "model.22.cv3" in log
    trained = torch.load(out / "weights.pt", weights_only=False)
    net = (trained.get("ema") or trained["model"]).float()
    state = net.state_dict()
    convs = [k for k in state if k.endswith("conv.weight") and int(k.split(".")[1]) < 22]  # backbone + neck
    assert len(convs) >= 45
    for k in convs:
        torch.testing.assert_close(state[k], source[k], rtol=0, atol=0, msg=k)
    assert net.model[-1].nc == 14 and state["model.22.cv3.0.2.weight"].shape[0] == 14
    assert source["model.22.cv3.0.2.weight"].shape[0] == 80
    train_args = yaml.safe_load((out / "train" / "args.yaml").read_text())
    assert (train_args["degrees"], train_args["translate"], train_args["hsv_v"]) == (7.0, 0.2, 0.3)
    assert train_args["shear"] == 2.0 and train_args["mixup"] == 0.1 and train_args["lr0"] == 1e-30
    assert train_args["plots"] is False  # the demo profile's plots: false
    assert train_args["pretrained"] == str(tmp_path / "coco80.pt")


def test_train_args_are_checked(fold_setup, tmp_path, capsys):
    """Unknown ultralytics keys, keys that have their own field, bad types and a missing
    checkpoint each stop with one line (exit 2) before any work."""
    for bad, says in [("train_args={mixupp: 0.1}", "unknown ultralytics train key(s) ['mixupp']"),
                      ("train_args={lr0: 0.1}", ("['lr0'] are set by their own field or by the adapter, not in "
                                                 "train_args (lr0: field lr)")),
                      ("train_args={hsv_v: 0.1}", "(hsv_v: field brightness_contrast)"),
                      ("train_args={conf: 0.1}", "(conf: field score_thr)"),
                      ("train_args={degrees: 5}", "['degrees'] are set by their own field"),
                      ("train_args={val: false}", "['val'] are set by their own field or by the adapter"),
                      ("train_args={mixup: high}", "mixup"),
                      (f"weights={tmp_path / 'yolov8x.pt'}", "`make weights` downloads it")]:
        with pytest.raises(SystemExit) as e:
            main(args("train", fold_setup, "--set", bad, run=tmp_path))
        assert e.value.code == 2 and says in capsys.readouterr().err, bad
    assert not (tmp_path / "yolo" / "fold0" / "dataset").exists()


@pytest.mark.slow
@pytest.mark.full_profile
def test_full_profile_builds_steps_and_predicts(tmp_path, figures):
    """models/yolo/full.yaml as it is (YOLOv8x at 1024 px, its batch, augmentation, plots and train_args),
    except epochs=1 and weights=null (the COCO file is not here): 1 training image = one optimizer
    step (one batch of one image: the profile's batch is only capped by the data, and a 1024-px step of
    YOLOv8x is most of the test's time), a validation (ultralytics' and our mAP@0.4) on one image, then a
    prediction with TTA on one validation and one test image. Prints seconds per step and peak memory."""
    data = generate(SynthConfig(out=str(tmp_path / "data"), n_train=2, n_test=1, size=128, seed=5))
    ids = sorted(DataFolder(data).train_sizes["image_id"])
    labelled = set(DataFolder(data).labels.query("class_id != 14")["image_id"])
    val = next(i for i in ids if i in labelled)  # a validation image with findings
    folds = tmp_path / "folds.csv"
    write_table(pd.DataFrame({"image_id": ids, "fold": [0 if i == val else 1 for i in ids]}), folds)
    cfg = load(__import__("models.yolo.yolo", fromlist=["Config"]).Config, PROFILES / "full.yaml")
    n_train = len(ids) - 1
    assert n_train <= cfg.batch, "one batch = one optimizer step (ultralytics caps accumulation at the epoch)"
    common = ["--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(tmp_path / "run"),
              "--profile", "full", "--set", "epochs=1", "weights=null", "device=cpu"]
    start = time.time()
    main(["yolo", "train", *common])
    train_s = time.time() - start
    out = tmp_path / "run" / "yolo" / "fold0"
    saved = yaml.safe_load((out / "train" / "args.yaml").read_text())
    assert saved["imgsz"] == 1024 and saved["batch"] == cfg.batch and saved["model"] == "yolov8x.yaml"
    assert saved["plots"] is True and (out / "train" / "results.png").exists()  # the profile's plots
    assert pd.read_csv(out / "metrics.csv")["val_map"].notna().all()  # validated
    start = time.time()
    main(["yolo", "predict", *common])
    predict_s = time.time() - start
    d = DataFolder(data)
    assert set(read_predictions(out / "test.csv", d.test_sizes)["image_id"]) == set(d.test_ids())
    assert set(read_predictions(out / "oof.csv", d.train_sizes)["image_id"]) == {val}
    assert yaml.safe_load((out / "predict.yaml").read_text())["tta"] is True
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures(f"yolo full (1024 px, batch {cfg.batch}, CPU): train incl. validation {train_s:.0f} s for 1 step of "
            f"{n_train} image(s), "
            f"predict {predict_s:.0f} s (1 test + 1 val image, TTA), peak RSS {rss:.1f} GiB")


def test_gpus_reach_ultralytics_ddp_with_batch_per_gpu(tmp_path, monkeypatch):
    """gpus: N -> ultralytics device=0,...,N-1 (its DDP over the visible cards) and batch x N (ultralytics
    divides its batch by the device count); the nominal batch nbs holds, so lr stays until the GPUs
    outgrow it. Before, a make DEVICE list trained on one card and batch 4 on 8 GPUs was 0 per card."""
    from models.yolo import yolo

    monkeypatch.setattr(yolo, "device", lambda requested="auto": "cuda")
    cfg = load(yolo.Config, PROFILES / "full.yaml", {"weights": None})
    one = yolo.train_kwargs(cfg, tmp_path / "data.yaml", tmp_path)
    assert (one["device"], one["batch"], one["lr0"]) == ("0", 4, cfg.lr)
    four = yolo.train_kwargs(load(yolo.Config, PROFILES / "full.yaml", {"weights": None, "gpus": 4}),
                             tmp_path / "data.yaml", tmp_path)
    assert (four["device"], four["batch"], four["lr0"]) == ("0,1,2,3", 16, cfg.lr)  # 16 x accumulate 4 = nbs 64
    sixteen = load(yolo.Config, PROFILES / "full.yaml", {"weights": None, "gpus": 32})
    assert yolo.lr_factor(sixteen) == 2.0  # 32 x 4 = 128 images per step: twice nbs, twice lr
    assert "yolo: 4 x batch 4 = 16 per step, ultralytics accumulates 4 (nbs 64) = nominal batch 64" in yolo.plan(
        load(yolo.Config, PROFILES / "full.yaml", {"gpus": 4}))


def test_amp_check_downloads_nothing(monkeypatch):
    """ultralytics' AMP check fetches yolo26n.pt at every GPU start; ours keeps only its list of cards
    with broken fp16 (and is what ultralytics' trainer calls, in DDP workers too: they import this module)."""
    from types import SimpleNamespace

    import ultralytics.engine.trainer

    from models.yolo import yolo

    assert ultralytics.engine.trainer.check_amp is yolo.check_amp

    class OnCuda(torch.nn.Module):
        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", 0))])

    for name, amp in (("NVIDIA H200", True), ("NVIDIA GeForce GTX 1660 SUPER", False), ("Tesla T4", True)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert yolo.check_amp(OnCuda()) is amp, name
    assert yolo.check_amp(torch.nn.Linear(1, 1)) is False  # the CPU: no AMP


def test_infer_takes_a_view_size(trained, fold_setup):
    import models.yolo.yolo as yolo_adapter
    from tests.conftest import assert_infer_takes_a_view_size

    assert_infer_takes_a_view_size(yolo_adapter, trained, fold_setup[0])


def test_checkpoint_views_fuse_the_snapshots(small, tmp_path, capsys):
    """snapshots=1 keeps epoch 1 of 2; checkpoint_views predicts with it and the final weights, fused."""
    main(args("train", small, "--set", "epochs=2", "snapshots=1", run=tmp_path))
    main(args("predict", small, "--set", "epochs=2", "snapshots=1", "checkpoint_views=true", run=tmp_path))
    out = tmp_path / "yolo" / "fold0"
    assert "checkpoint views: final, snapshot_e1.pt: 2 checkpoints' predictions fused" in capsys.readouterr().out
    assert yaml.safe_load((out / "predict.yaml").read_text())["checkpoint_views"] is True
