"""Every model in the table keeps the adapter contract of models/README.md, and every profile loads."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import models
from cxr.config import load
from models.__main__ import check_run_config, parse_overrides

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
    cfg = load(models.adapter(name).Config, HERE / name / f"{profile}.yaml")
    assert cfg.weights is None or isinstance(cfg.weights, str)



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

    check_run_config(C(), tmp_path)  # nothing saved yet: fine
    save(C(), tmp_path / "config.yaml")
    check_run_config(C(), tmp_path)  # same config: resume / skip as usual
    with pytest.raises(ValueError, match=r"epochs: 10 -> 5") as e:
        check_run_config(C(epochs=5), tmp_path)
    assert "lr" not in str(e.value)


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
