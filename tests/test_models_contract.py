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
        # a detector's load_infer also loads one of the fold's snapshots (checkpoint views)
        infer_args = ["cfg", "out", "snapshot"] if models.kind(name) == "detector" else ["cfg", "out"]
        expected = infer_args if verb == "load_infer" else ["cfg", "data", "folds", "fold", "out"]
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


# The keys every model's Config has, with the same type and meaning (models.common.VOCABULARY), so one
# SET serves `make all-oof`; the detectors also share the DETECTOR_KEYS.
SHARED_KEYS = ["imgsz", "epochs", "warmup_epochs", "batch", "lr", "validate_every", "checkpoint", "workers", "amp", "tta",
               "seed", "device", "gpus", "weights", "fliplr", "translate", "scale", "degrees", "brightness_contrast"]
DETECTOR_KEYS = ["labels", "score_thr", "max_det"]


def test_every_model_speaks_one_vocabulary():
    import typing

    from cxr.config import type_text
    from models.common import VOCABULARY

    assert set(SHARED_KEYS + DETECTOR_KEYS) <= set(VOCABULARY)
    types: dict[str, set[str]] = {}
    for name in models.names():
        hints = typing.get_type_hints(models.adapter(name).Config, include_extras=True)
        wanted = SHARED_KEYS + (DETECTOR_KEYS if models.kind(name) == "detector" else [])
        assert not set(wanted) - set(hints), f"{name} lacks {sorted(set(wanted) - set(hints))}"
        for key in wanted:
            types.setdefault(key, set()).add(type_text(hints[key]).replace(" or null", ""))
    assert {k: t for k, t in types.items() if len(t) > 1} == {}, "a shared key has another type in some model"


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_one_set_serves_every_model(profile):
    """SET="epochs=2 lr=0.001 imgsz=256 degrees=5 ..." means the same to all four models (make all-oof)."""
    one_set = {"epochs": 2, "lr": 1e-3, "imgsz": 256, "batch": 2, "warmup_epochs": 0.5, "validate_every": 2,
               "checkpoint": "best", "fliplr": 0.5, "translate": 0.1, "scale": 0.2, "degrees": 5, "brightness_contrast": 0.1,
               "tta": True, "amp": False, "workers": 1}
    for name in models.names():
        cfg = load(models.adapter(name).Config, HERE / name / f"{profile}.yaml", one_set)
        assert {k: getattr(cfg, k) for k in one_set} == one_set, name


@pytest.mark.parametrize("name", models.names())
def test_config_command_prints_every_key_with_type_and_meaning_as_a_loadable_profile(name, tmp_path, capsys):
    """`python -m models MODEL config` lists every key, its type and a one-line meaning; its output is YAML
    that loads back into the same config (a profile to start from). In-process: a child would spend 5 s
    importing the frameworks this worker has loaded (the CLI in a child: test_every_verb_on_a_fold_...)."""
    from cxr.config import describe
    from models.__main__ import config_text, main
    from models.common import VOCABULARY

    Config = models.adapter(name).Config
    assert [k for k, _, meaning in describe(Config, VOCABULARY) if not meaning] == [], "fields without a meaning"
    main([name, "config", "--profile", "full", "--set", "epochs=3"])
    stdout = capsys.readouterr().out
    cfg = load(Config, HERE / name / "full.yaml", {"epochs": 3})
    assert stdout.strip() == config_text(name, cfg)
    keys = [line.split(":")[0] for line in stdout.splitlines() if not line.startswith("#")]
    assert keys == [f.name for f in dataclasses.fields(Config)]
    assert all("  # " in line for line in stdout.splitlines() if not line.startswith("#"))
    (tmp_path / "p.yaml").write_text(stdout)
    assert load(Config, tmp_path / "p.yaml") == cfg
    assert "epochs: 3  # int >= 1; passes over the fold's training images" in stdout


@pytest.mark.parametrize("name, key, hint", [
    ("yolo", "epoch", "did you mean 'epochs'?"),
    ("detectron", "max_iter", "did you mean 'epochs'?"),
    ("yolo", "lr0", "did you mean 'lr'?"),
    ("yolo", "mixup", "train_args"),
    ("detectron", "MODEL.RPN.NMS_THRESH", "opts"),
    ("effdet", "lr0", "did you mean 'lr'?"),
])
def test_an_unknown_key_names_the_closest_one_and_where_framework_keys_go(name, key, hint, fold_setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(model_args(name, "train", fold_setup, "--set", f"{key}=1", run=tmp_path))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and f"unknown key '{key}'" in err and hint in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", models.names())
def test_predict_keeps_the_trained_settings_and_only_changes_prediction_ones(name, tmp_path):
    """predict runs with the fold's saved config: a model-defining key that differs (imgsz) stops it, naming
    the key; the adapter's PREDICT_ONLY keys and where it runs may change."""
    from cxr.config import save
    from models.__main__ import predict_config

    adapter = models.adapter(name)
    trained = load(adapter.Config, HERE / name / "demo.yaml")
    save(trained, tmp_path / "config.yaml")
    assert {"tta", "checkpoint"} <= adapter.PREDICT_ONLY
    assert not adapter.PREDICT_ONLY & {"imgsz", "epochs", "lr", "batch", "weights"}
    changed = dataclasses.replace(trained, tta=not trained.tta, checkpoint="best", workers=0)
    assert predict_config(adapter, changed, tmp_path) == changed
    with pytest.raises(ValueError, match=rf"config.yaml: this fold was trained with other settings \(imgsz: trained "
                                         rf"{trained.imgsz}, asked 64\)"):
        predict_config(adapter, dataclasses.replace(changed, imgsz=64), tmp_path)
    other = dataclasses.replace(trained, epochs=trained.epochs + 1)  # a profile edited since: the fold keeps its own
    with pytest.raises(ValueError, match="epochs: trained"):
        predict_config(adapter, other, tmp_path)


def test_every_verb_on_a_fold_appends_to_its_log_children_and_errors_included(fold_setup, tmp_path, capfd):
    from models.__main__ import fold_log

    done = subprocess.run([sys.executable, "-m", "models", *model_args("effdet", "prepare", fold_setup, run=tmp_path)],
                          capture_output=True, text=True, cwd=HERE.parent)
    assert done.returncode == 0 and "effdet fold 0 prepared" in done.stdout, done.stderr
    log = tmp_path / "effdet" / "fold0" / "log.txt"
    first = log.read_text()
    assert "python -m models effdet prepare" in first and "effdet fold 0 prepared" in first
    with pytest.raises(RuntimeError):
        with fold_log(log.parent, ["effdet", "train"]):
            subprocess.run(["sh", "-c", "echo from a child; echo child error >&2"], check=True)
            raise RuntimeError("stopped")
    text = log.read_text()
    assert text.startswith(first) and "from a child" in text and "child error" in text
    assert "RuntimeError: stopped" in text
    console = capfd.readouterr()
    assert "from a child" in console.out and "child error" in console.err  # the console still sees both, apart
