"""Every model in the table keeps the adapter contract of models/README.md, and every profile loads."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import models
from cxr.config import from_dict, load, to_dict
from models.__main__ import check_run_config, main, parse_overrides
from models.common import cuda_problem
from tests.conftest import model_args

HERE = Path(models.__file__).parent
VERBS = ("prepare", "train", "predict", "load_infer")


@pytest.mark.parametrize("name", models.names())
def test_adapter_implements_the_contract(name):
    adapter = models.adapter(name)
    assert dataclasses.is_dataclass(adapter.Config)
    assert "weights" in {f.name for f in dataclasses.fields(adapter.Config)}, "every Config names its starting weights"
    for verb in VERBS:
        fn = getattr(adapter, verb, None)
        assert callable(fn), f"{name} lacks {verb}"
        params = list(inspect.signature(fn).parameters)
        expected = ["cfg", "out"] if verb == "load_infer" else ["cfg", "data", "folds", "fold", "out"]
        assert params == expected, f"{name}.{verb}{params}"


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("profile", ["demo", "full"])
def test_every_profile_loads(name, profile):
    Config = models.adapter(name).Config
    cfg = load(Config, HERE / name / f"{profile}.yaml")
    assert cfg.weights is None or isinstance(cfg.weights, str)
    assert from_dict(Config, to_dict(cfg)) == cfg  # every field in its range, the defaults included


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("profile", ["demo", "full"])
def test_profiles_say_how_they_use_gpus(name, profile):
    """Every profile names its GPU count (gpus: 1) and says that batch is per GPU; a full profile needs a
    GPU (device: cuda) and says so, a demo profile runs anywhere (device: auto)."""
    text = (HERE / name / f"{profile}.yaml").read_text()
    cfg = load(models.adapter(name).Config, HERE / name / f"{profile}.yaml")
    assert "\ngpus: 1\n" in text and "per GPU" in text
    if profile == "full":
        assert cfg.device == "cuda" and "Needs a GPU" in text and "DEVICE=cpu" in text
        assert "V100" not in text.replace("not V100", "")  # cards named are ones the pinned torch runs
    else:
        assert cfg.device == "auto"



@pytest.mark.parametrize("name", models.names())
def test_load_infer_of_an_untrained_fold_names_the_make_target(name, tmp_path):
    cfg = load(models.adapter(name).Config, HERE / name / "demo.yaml")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/weights\.pth?: train this fold first \(make train MODEL={name} FOLD=k\)"):
        models.adapter(name).load_infer(cfg, tmp_path)

def test_table_kinds_and_list_command():
    assert models.names("detector") + models.names("classifier") == models.names()
    out = subprocess.run([sys.executable, "-m", "models", "list", "--kind", "detector"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == models.names("detector")
    with pytest.raises(KeyError):
        models.adapter("nope")


def test_overrides_parse_yaml_and_reject_missing_equals():
    assert parse_overrides(["epochs=5", "weights=null", "labels={mode: nms}"]) == {
        "epochs": 5, "weights": None, "labels": {"mode": "nms"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["epochs"])


def test_fold_folder_with_another_config_is_not_reused(tmp_path):
    from cxr.config import save

    @dataclasses.dataclass
    class C:
        epochs: int = 10
        lr: float = 0.01
        weights: str | None = None

    out = tmp_path / "fold0"
    check_run_config(C(), out)  # nothing saved yet: fine
    save(C(), out / "config.yaml")
    (out / "train").mkdir()
    (out / "train" / "last.pt").write_bytes(b"checkpoint")  # training progress
    check_run_config(C(), out)  # same config: resume / skip as usual
    with pytest.raises(ValueError, match=r"epochs: 10 -> 5") as e:
        check_run_config(C(epochs=5), out)
    assert "lr" not in str(e.value)


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, capsys):
    """A config.yaml without any checkpoint beside it (a job that failed at its start) is no run to
    protect: the next run with another config removes the folder (its prepared labels may follow the
    old config) and starts clean."""
    from cxr.config import save

    @dataclasses.dataclass
    class C:
        epochs: int = 10

    out = tmp_path / "fold0"
    save(C(epochs=-1), out / "config.yaml")
    (out / "labels.csv").write_text("prepared with the old config\n")
    check_run_config(C(), out)
    assert not out.exists() and "stopped before its first checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("bad, message", [
    (["--set", "epochs=-1"], "--set: epochs: -1 is out of range: must be >= 1"),
    (["--set", "imgsz=0"], "--set: imgsz: 0 is out of range: must be a multiple of 32 >= 32"),
    (["--set", "batch=0"], "--set: batch: 0 is out of range: must be >= 1"),
    (["--set", "workers=-1"], "--set: workers: -1 is out of range: must be >= 0"),
    (["--set", "device=0,1"], "--set: device: '0,1' is not one of ['auto', 'cuda', 'cpu']"),
    (["--fold", "7"], "fold 7 is not in this fold file (its folds: 0, 1, 2)"),
])
def test_a_refused_run_is_one_line_and_leaves_nothing(name, bad, message, fold_setup, tmp_path, capsys):
    """Bad input stops with one line and exit 2 before anything is written: no fold folder, no config.yaml."""
    if "epochs" in message and name == "detectron":
        bad, message = ["--set", "max_iter=-1"], message.replace("epochs", "max_iter")
    argv = [a for a in model_args(name, "train", fold_setup, run=tmp_path) if a not in ("--fold", "0")]
    argv = [*argv, *(bad if bad[0] == "--fold" else ["--fold", "0", *bad])]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(cuda_problem() is None, reason="this machine has a usable GPU")
@pytest.mark.parametrize("name", models.names())
def test_a_full_profile_without_a_gpu_stops_and_says_how_to_run_on_the_cpu(name, fold_setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(model_args(name, "train", fold_setup, "--profile", "full", run=tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a GPU" in err and cuda_problem() in err and "DEVICE=cpu" in err, err
    assert list(tmp_path.iterdir()) == []


def test_gpus_beyond_the_visible_cards_or_on_the_cpu_for_yolo_are_one_line(fold_setup, tmp_path, capsys, monkeypatch):
    import torch

    from models import common

    monkeypatch.setattr(common, "device", lambda requested="auto": "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(SystemExit):
        main(model_args("effdet", "train", fold_setup, "--set", "gpus=4", run=tmp_path))
    assert "4 GPUs asked for, 2 visible (CUDA_VISIBLE_DEVICES=3,5)" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(model_args("yolo", "train", fold_setup, "--set", "gpus=2", "device=cpu", run=tmp_path))
    assert "ultralytics trains on several devices on CUDA only" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_merge_fuses_folds_with_the_given_settings_and_saves_them(synth_dir, tmp_path):
    """--fold-fusion reaches the fold merge, and predict-images reads back what merge used."""
    import numpy as np
    import pandas as pd

    from cxr.data import DataFolder
    from cxr.folds import make_folds
    from cxr.io import write_table
    from cxr.predictions import read_predictions, write_predictions
    from cxr.wbf import FOLD_MERGE, WBF, fuse_predictions
    from models.__main__ import fold_fusion, main

    data = DataFolder(synth_dir)
    folds = make_folds(data.labels, n_folds=2, seed=0)
    write_table(folds, tmp_path / "folds.csv")
    rng = np.random.default_rng(0)
    sizes = data.test_sizes.set_index("image_id")
    tests = []
    for k in (0, 1):
        rows = []
        for i in data.test_ids():
            w, h = sizes.loc[i, ["width", "height"]]
            for _ in range(3):
                x, y = rng.uniform(0, 0.5, 2)
                rows.append([i, int(rng.integers(14)), rng.uniform(), x * w, y * h, (x + 0.3) * w, (y + 0.3) * h])
        t = pd.DataFrame(rows, columns=["image_id", "class_id", "score", "x_min", "y_min", "x_max", "y_max"])
        out = tmp_path / "run" / "yolo" / f"fold{k}"
        write_predictions(t, out / "test.csv", data.test_sizes)
        write_predictions(t.iloc[:0], out / "oof.csv", data.train_sizes)
        tests.append(read_predictions(out / "test.csv"))
    run = tmp_path / "run"
    assert fold_fusion(run, "yolo") == FOLD_MERGE
    main(["yolo", "merge", "--data", str(synth_dir), "--folds", str(tmp_path / "folds.csv"), "--run-dir", str(run),
          "--fold-fusion", "iou_thr=0.3", "conf_type=max"])
    assert fold_fusion(run, "yolo") == WBF(0.3, 0.0, "max")
    merged = read_predictions(run / "yolo" / "test.csv")
    expected = fuse_predictions(tests, data.test_sizes, iou_thr=0.3, conf_type="max")
    assert len(merged) == len(expected) != len(fuse_predictions(tests, data.test_sizes))
    key = ["image_id", "class_id", "score"]
    np.testing.assert_allclose(merged.sort_values(key)["score"].to_numpy(), expected.sort_values(key)["score"].to_numpy(),
                               atol=1e-6)
