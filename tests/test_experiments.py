"""Experiments at a competitor's pace (models/members.py): the settings decide whether a finished fold is
reused, variants of one family live side by side, members are borrowed from runs with the same folds,
and the fold count follows the data.

The checks here work on fold folders as training leaves them (the resolved ``config.yaml``, a weights
file, ``inputs.json``, ``predict.yaml``, ``oof.csv``), written by the tests without training: what is
under test is the comparison, which reads only those files. The loop as a user types it, with real
training through make, is :func:`test_the_experiment_loop_through_make`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr.config import load, save
from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import DataError, write_table
from models import adapter as import_adapter
from models.__main__ import main, profile_path
from models.members import (Member, check_same_folds, fold_inputs, fold_start, parse_member, read_record,
                            read_scores, record_settings, start_input, write_inputs)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, 3-fold file) of the session's synthetic data."""
    folds = tmp_path_factory.mktemp("folds") / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds


def fake_trained(run: Path, member: Member, data: Path, folds: Path, overrides: dict, predicted: dict | None = None,
                 ks: tuple[int, ...] = (0, 1, 2)) -> None:
    """Fold folders as a finished training and prediction of ``member`` with ``overrides`` leave them."""
    adapter = import_adapter(member.family)
    cfg = load(adapter.Config, profile_path(member.family, "demo"), overrides)
    table = pd.read_csv(folds)
    folder = member.folder(run)
    record_settings(folder, member, "demo", overrides)
    for k in ks:
        out = folder / f"fold{k}"
        save(cfg, out / "config.yaml")
        (out / "weights.pt").write_bytes(b"final weights")
        write_inputs(out, fold_inputs(data, folds, table, k), 12.5)
        (out / "oof.csv").write_text("image_id\n")
        (out / "predict.yaml").write_text(yaml.safe_dump({"tta": False, **(predicted or {})}))


def check(data: Path, folds: Path, run: Path, model: str, *extra: str) -> None:
    main([model, "check", "--data", str(data), "--folds", str(folds), "--run-dir", str(run), *extra])


def test_member_names() -> None:
    assert parse_member("yolo") == Member("yolo")
    assert parse_member("yolo@s640") == Member("yolo", "s640")
    assert parse_member("demo:detectron") == Member("detectron", None, "demo")
    assert str(parse_member("demo:yolo@r2.b")) == "demo:yolo@r2.b"
    assert Member("yolo", "s640").folder(Path("runs/x")) == Path("runs/x/yolo@s640")
    assert Member("detectron", None, "demo").folder(Path("runs/x")) == Path("runs/demo/detectron")
    for bad in ("yolo@", "../x:yolo", "yolo@a/b", "resnet", "demo:resnet@a", "@s640"):
        with pytest.raises(DataError):
            parse_member(bad)


def test_a_fold_start_names_its_own_weights_or_passes_through(tmp_path) -> None:
    """``weights``: a member of the same family or a ``{fold}`` path is that fold's file (and a fold input); a
    public checkpoint or none passes as given (no input); another family's member or a missing fold is an error."""
    run = tmp_path / "runs" / "x"
    (run / "yolo@s1" / "fold0").mkdir(parents=True)
    (run / "yolo@s1" / "fold0" / "weights.pt").write_bytes(b"w")
    own = str(run / "yolo@s1" / "fold0" / "weights.pt")
    assert fold_start("yolo@s1", run, 0, "yolo") == own
    assert fold_start(str(run / "yolo@s1" / "fold{fold}" / "weights.pt"), run, 0, "yolo") == own
    assert set(start_input("yolo@s1", run, 0, "yolo")) == {"start_sha256"}
    for public in ("yolov8x.pt", None):
        assert fold_start(public, run, 0, "yolo") == public and start_input(public, run, 0, "yolo") == {}
    for value, family, fold, words in (("yolo@s1", "effdet", 0, "a effdet fold cannot start from it"),
                                       ("yolo@s1", "yolo", 1, "no final weights for fold 1"),
                                       (str(run / "yolo@s1" / "fold{fold}" / "weights.pt"), "yolo", 1, "fold 1")):
        with pytest.raises(DataError, match=words):
            fold_start(value, run, fold, family)


def test_a_changed_setting_is_never_up_to_date(setup, tmp_path, capsys) -> None:
    """The issue's case: folds trained with epochs=2, asked epochs=3: one line naming the key (trained,
    asked) and the ways on, exit 2, nothing removed; where a job runs never counts; the member's recorded
    settings are what a command without SET asks."""
    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("yolo"), data, folds, {"epochs": 2})
    check(data, folds, run, "yolo")  # no SET: the member's own settings (member.yaml)
    check(data, folds, run, "yolo", "--set", "epochs=2", "device=cpu", "workers=0", "gpus=1")
    with pytest.raises(SystemExit) as e:
        check(data, folds, run, "yolo", "--set", "epochs=3")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "epochs: trained 2, asked 3" in err and "VARIANT=" in err and "FORCE=1 to retrain fold(s) 0, 1, 2" in err
    assert all((run / "yolo" / f"fold{k}" / "weights.pt").is_file() for k in range(3))


def test_force_retrains_and_a_prediction_setting_only_predicts_again(setup, tmp_path, capsys) -> None:
    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("yolo"), data, folds, {"epochs": 2})
    (run / "yolo" / "oof.csv").write_text("merged\n")
    with pytest.raises(SystemExit):
        check(data, folds, run, "yolo", "--set", "tta=true")
    assert "tta: predicted False, asked True" in capsys.readouterr().err
    check(data, folds, run, "yolo", "--set", "tta=true", "--force")
    fold0 = run / "yolo" / "fold0"
    assert (fold0 / "weights.pt").is_file() and not (fold0 / "oof.csv").exists()  # weights kept, predictions redone
    assert not (run / "yolo" / "oof.csv").exists()  # the merge follows
    assert "fold 0 predicts again" in capsys.readouterr().out
    check(data, folds, run, "yolo", "--set", "epochs=3", "--force", "--fold", "1")
    assert not (run / "yolo" / "fold1").exists() and (run / "yolo" / "fold2" / "weights.pt").is_file()


def test_changed_inputs_are_named(setup, tmp_path, capsys) -> None:
    """Another split of the same fold (a new fold file under the same NAME) stops reuse like a setting."""
    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("effdet", "b"), data, folds, {"epochs": 1})
    other = tmp_path / "other.csv"
    write_table(make_folds(DataFolder(data).labels, n_folds=3, seed=1), other)
    with pytest.raises(SystemExit):
        check(data, other, run, "effdet", "--variant", "b")
    err = capsys.readouterr().err
    assert "fold split" in err and "changed since training" in err and "effdet@b" in err


def test_a_fold_made_with_the_asked_key_is_checked_without_the_framework(setup, tmp_path) -> None:
    """Equal profile file and overrides resolve to equal configs: check then imports no framework (a make
    target stays quick); any other SET goes the full way, through the adapter's Config."""
    from models.members import asked_key, mark_predicted, read_inputs

    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("yolo"), data, folds, {"epochs": 2})
    key = asked_key("demo", profile_path("yolo", "demo"), {"epochs": 2, "device": "cpu"})
    for k in range(3):
        write_inputs(run / "yolo" / f"fold{k}", {**read_inputs(run / "yolo" / f"fold{k}"), "asked": key})
        mark_predicted(run / "yolo" / f"fold{k}", key)
    probe = ("import sys; from models.__main__ import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('exit', e.code)\nprint('framework imported:', 'models.yolo.yolo' in sys.modules)")
    argv = [sys.executable, "-c", probe, "yolo", "check", "--data", str(data), "--folds", str(folds), "--run-dir", str(run)]
    same = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "framework imported: False" in same.stdout and "exit" not in same.stdout, same.stdout + same.stderr
    other = subprocess.run([*argv, "--set", "epochs=3"], capture_output=True, text=True, check=True)
    assert "exit 2" in other.stdout and "framework imported: True" in other.stdout
    assert "epochs: trained 2, asked 3" in other.stderr


def test_variants_keep_their_own_settings(setup, tmp_path) -> None:
    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("yolo"), data, folds, {"epochs": 2})
    fake_trained(run, Member("yolo", "s96"), data, folds, {"epochs": 2, "imgsz": 96, "device": "cpu"})
    assert read_record(run / "yolo@s96").set == {"epochs": 2, "imgsz": 96}  # where it runs is not recorded
    check(data, folds, run, "yolo", "--variant", "s96")  # its own settings, no SET needed
    check(data, folds, run, "yolo")


def test_borrowing_needs_the_same_fold_file(setup, tmp_path) -> None:
    data, folds = setup
    run = tmp_path / "runs" / "demo"
    fake_trained(run, Member("detectron"), data, folds, {"epochs": 1})
    table = pd.read_csv(folds)
    check_same_folds(run / "detectron", table, folds, Member("detectron", None, "demo"))
    other = make_folds(DataFolder(data).labels, n_folds=3, seed=1)
    with pytest.raises(DataError, match=r"was trained on .*folds\.csv, whose fold 0 is not fold 0 of other\.csv"):
        check_same_folds(run / "detectron", other, Path("other.csv"), Member("detectron", None, "demo"))


def test_fold_count_follows_the_data(synth_dir, tmp_path, capsys) -> None:
    """`cxr folds` without --n-folds: 3 on the synthetic demo data (synth.yaml beside the labels), 5 elsewhere
    (never from the run's NAME)."""
    from cxr.cli import main as cxr_main

    cxr_main(["folds", "--labels", str(synth_dir / "train.csv"), "--out", str(tmp_path / "a.csv")])
    assert sorted(pd.read_csv(tmp_path / "a.csv")["fold"].unique()) == [0, 1, 2]
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(synth_dir / "train.csv", plain / "train.csv")
    cxr_main(["folds", "--labels", str(plain / "train.csv"), "--out", str(tmp_path / "b.csv")])
    assert sorted(pd.read_csv(tmp_path / "b.csv")["fold"].unique()) == [0, 1, 2, 3, 4]
    assert "3 folds (the synthetic demo data" in capsys.readouterr().out


def make(*args: str) -> subprocess.CompletedProcess:
    """``make ARGS`` in the repo as a user types it (not as a sub-make of `make test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=900, check=False)


@pytest.mark.slow
def test_the_experiment_loop_through_make(synth_dir, figures, tmp_path: Path) -> None:
    """The loop of issue 28 on the synthetic data, through make: train a member; change SET: `make oof`
    refuses by key; FORCE=1 retrains; add a variant (one that keeps no finding box); `make submission`
    fuses both, names the empty one and may leave it out (weight 0 is searched); `make runs` lists both
    with the setting that differs and their figures."""
    import time

    name = f"pytest-exp-{os.getpid()}"
    base = [f"NAME={name}", f"DATA={synth_dir}", "PROFILE=demo", "N_FOLDS=2", "MODEL=yolo"]
    made = [REPO / "runs" / name, REPO / "folds" / f"{name}.csv", REPO / "reports" / name]
    start = time.perf_counter()
    try:
        first = make("oof", *base, "SET=epochs=2 imgsz=64")
        assert first.returncode == 0, first.stderr[-3000:]
        assert sorted(pd.read_csv(REPO / "folds" / f"{name}.csv")["fold"].unique()) == [0, 1]
        changed = make("oof", *base, "SET=epochs=3")
        assert changed.returncode == 2, changed.stderr[-3000:]
        assert "epochs: trained 2, asked 3" in changed.stderr and "FORCE=1" in changed.stderr
        assert "up to date" not in changed.stdout
        forced = make("oof", *base, "SET=epochs=3", "FORCE=1")
        assert forced.returncode == 0, forced.stderr[-3000:]
        run = REPO / "runs" / name
        assert yaml.safe_load((run / "yolo" / "fold0" / "config.yaml").read_text())["epochs"] == 3
        again = make("oof", *base)  # no SET: the member's recorded settings, up to date
        assert again.returncode == 0 and "is up to date" in again.stdout, again.stderr[-3000:]
        variant = make("oof", *base, "VARIANT=strict", "SET=epochs=1 imgsz=64 score_thr=0.999")
        assert variant.returncode == 0, variant.stderr[-3000:]
        assert read_scores(run / "yolo@strict")["finding_boxes"] == 0
        sub = make("submission", f"NAME={name}", f"DATA={synth_dir}", "PROFILE=demo", "MODELS=yolo yolo@strict",
                   "EXCLUDE=classifier")
        assert sub.returncode == 0, sub.stderr[-3000:]
        assert "yolo@strict has no finding boxes" in sub.stdout
        params = json.loads((run / "ensemble" / "params.json").read_text())
        assert params["fusion"]["models"] == ["yolo", "yolo@strict"]
        search = pd.read_csv(run / "ensemble" / "yolo-yolo@strict" / "search.csv")
        assert (search["weights"].astype(str).str.contains(r"\b0\.0\b")).any()  # leaving a member out was searched
        assert (REPO / "submissions" / f"{name}.csv").is_file()
        # the page goes to tmp_path: the checkout's own reports/index.html is the user's
        runs = make("runs", f"DATA={synth_dir}", f"RUNS_ARGS=--json --html {tmp_path / 'runs.html'}")
        assert runs.returncode == 0, runs.stderr[-3000:]
        rows = [r for r in json.loads(runs.stdout[runs.stdout.index("["):runs.stdout.rindex("]") + 1])
                if r.get("run") == name]
        members = {r["member"]: r for r in rows}
        assert {"yolo", "yolo@strict"} <= set(members), rows
        assert "score_thr" in str(members["yolo@strict"]["settings"]) and "epochs" in str(members["yolo"]["settings"])
        assert members["yolo"]["fold_mean"] not in (None, "-")
        assert name in (tmp_path / "runs.html").read_text()
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for path in (REPO / "submissions").glob(f"{name}*.csv"):
            path.unlink()
    figures(f"experiment loop through make: {time.perf_counter() - start:.0f} s")


def test_a_borrowed_member_joins_the_ensemble_and_another_fold_file_is_refused(setup, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    """MODELS="yolo other:yolo": the member of run `other` is fused as it is (never trained here) and the
    report names the run it comes from; borrowing from a run of another fold file stops by name."""
    from cxr.predictions import write_predictions
    from ensemble.__main__ import main as ensemble_main

    data, folds = setup
    folder = DataFolder(data)
    runs = tmp_path / "runs"
    fake_trained(runs / "other", Member("yolo"), data, folds, {"epochs": 1})
    truth = folder.fused()
    truth.loc[truth["class_id"] == 14, ["x_min", "y_min", "x_max", "y_max"]] = [0.0, 0.0, 1.0, 1.0]
    test_rows = pd.DataFrame({"image_id": folder.test_ids(), "class_id": 14, "score": 0.5,
                              "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0})
    for run in (runs / "other", runs / "main"):
        write_predictions(truth.assign(score=0.9), run / "yolo" / "oof.csv", folder.train_sizes)
        write_predictions(test_rows, run / "yolo" / "test.csv", folder.test_sizes)
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(data), "--folds", str(folds), "--run-dir", str(runs / "main"), "--jobs", "1",
              "--classifier", "none", "--models", "yolo other:yolo"]
    ensemble_main(["tune", *common])
    params = json.loads((runs / "main" / "ensemble" / "params.json").read_text())
    assert params["fusion"]["models"] == ["yolo", "other:yolo"]
    ensemble_main(["submit", *common, "--name", "main"])
    report = (tmp_path / "reports" / "main" / "index.md").read_text()
    assert "3 folds of " in report and f"{runs}/other/yolo" in report  # the run it really comes from
    other = tmp_path / "other.csv"
    write_table(make_folds(folder.labels, n_folds=3, seed=1), other)
    with pytest.raises(SystemExit) as e:
        ensemble_main(["tune", *[other.as_posix() if a == str(folds) else a for a in common]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "member other:yolo was trained on" in err and "other.csv" in err


def test_the_scheduler_checks_before_any_job(setup, tmp_path) -> None:
    """`make oof DEVICES=...` goes through the scheduler: the same check stops it before Ray starts."""
    data, folds = setup
    run = tmp_path / "run"
    fake_trained(run, Member("yolo", "b"), data, folds, {"epochs": 2})
    done = subprocess.run([sys.executable, "-m", "models.scheduler", "--models", "yolo@b", "--devices", "0",
                           "--data", str(data), "--folds", str(folds), "--run-dir", str(run), "--set", "epochs=3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "epochs: trained 2, asked 3" in done.stderr and "yolo@b" in done.stderr and "job(s) on" not in done.stdout
