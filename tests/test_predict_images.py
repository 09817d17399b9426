"""The tuned ensemble on a folder of new images: ``python -m ensemble.predict_images``.

The slow tests share one tiny trained run (every demo model, 2 folds, 1 epoch, on 40 synthetic
images at 128 px: about a minute on 2 cores) with a hard gate and unequal model weights, and check
that predicting on its test PNGs gives ``python -m ensemble submit``'s submission, number for number.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, NO_FINDING
from cxr.io import write_json
from cxr.synth import SynthConfig, generate
from ensemble.ensemble import params_path
from ensemble.overlays import PALETTE, draw
from ensemble.predict_images import main
from tests.conftest import MANIFEST, real

# Tiny, fast versions of the demo profiles; TTA on for one detector and the classifier.
TINY = {
    "yolo": ["epochs=1", "workers=0", "max_det=10", "score_thr=0.01", "tta=true"],
    "detectron": ["epochs=1", "batch=2", "workers=0", "max_det=10", "score_thr=0.01"],
    "effdet": ["epochs=1", "workers=0", "max_det=10", "score_thr=0.01"],
    "classifier": ["epochs=1", "workers=0", "batch=16", "tta=true"],
}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict | None, str]:
    """(exit code, printed summary, stderr) of one command line."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def train_tiny_run(root: Path, n_train: int = 40, n_test: int = 10, n_folds: int = 2,
                   sets: dict[str, list[str]] = TINY) -> dict:
    """A tiny run through the real entry points (models train/predict/merge, ensemble tune), a hard
    gate and unequal weights written into its params.json, then ``ensemble submit``. ``sets``: the
    ``--set`` overrides of the demo profiles per model (bench/predict_images_bench.py uses it too)."""
    from cxr.data import DataFolder
    from cxr.folds import make_folds
    from cxr.io import write_table
    from ensemble.__main__ import main as ensemble_main
    from models.__main__ import main as models_main

    data = generate(SynthConfig(out=str(root / "data"), n_train=n_train, n_test=n_test, size=128, seed=5))
    folds = root / "folds.csv"
    write_table(make_folds(DataFolder(data).labels, n_folds=n_folds, seed=0), folds)
    run = root / "run"
    common = ["--data", str(data), "--folds", str(folds), "--run-dir", str(run)]
    for model, overrides in sets.items():
        for k in map(str, range(n_folds)):
            models_main([model, "train", *common, "--fold", k, "--set", *overrides])
            models_main([model, "predict", *common, "--fold", k, "--set", *overrides])
        models_main([model, "merge", *common, "--set", *overrides])
    ensemble_main(["tune", *common, "--jobs", "1"])
    params = json.loads((run / "ensemble" / "params.json").read_text())
    params["fusion"].update(weights=[1.0, 2.0, 1.0], iou_thr=0.5)
    params["gate"] = {"rule": "hard", "low": 0.005, "high": 0.4}
    # submit applies (and copies to RUN/ensemble/params.json) the parameters of its model set
    write_json(params, params_path(run, params["fusion"]["models"], "classifier"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ensemble_main(["submit", *common, "--name", "tiny"])
    return {"root": root, "data": data, "folds": folds, "run": run, "submission": root / "submissions" / "tiny.csv"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def predicted(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The command on the run's test PNGs (already squashed: original sizes from test_meta.csv)."""
    out = tmp_path_factory.mktemp("predicted") / "out"
    argv = ["--src", str(trained["data"] / "test"), "--run-dir", str(trained["run"]), "--out", str(out),
            "--data", str(trained["data"]), "--meta", str(trained["data"] / "test_meta.csv"),
            "--folds", str(trained["folds"]), "--threshold", "0.01", "--workers", "1"]
    try:
        main(argv)
    except SystemExit as e:
        pytest.fail(f"predict_images exited {e.code}")
    return {**trained, "out": out, "argv": argv}


@pytest.mark.slow
def test_test_pngs_reproduce_the_submission(predicted: dict) -> None:
    ours = pd.read_csv(predicted["out"] / "submission.csv", dtype=str, keep_default_na=False).set_index("image_id")
    theirs = pd.read_csv(predicted["submission"], dtype=str, keep_default_na=False).set_index("image_id")
    assert sorted(ours.index) == sorted(theirs.index)
    different = [i for i in theirs.index if ours.loc[i, "PredictionString"] != theirs.loc[i, "PredictionString"]]
    assert not different, f"{len(different)} image(s) differ, e.g. {different[0]}"
    n_boxes = sum(len(s.split()) // 6 - 1 for s in theirs["PredictionString"])
    assert n_boxes > 0, "the comparison must cover finding boxes, not only No-finding rows"


@pytest.mark.slow
def test_a_detector_of_weight_0_is_not_loaded(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The tuned fusion leaves a weight-0 detector out (ensemble.fuse), so the command neither loads nor runs it:
    with its weights gone it still gives the submission made with that weight, number for number."""
    from ensemble.__main__ import main as ensemble_main

    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root, ignore=shutil.ignore_patterns("submissions", "reports"))
    run, data, folds = root / "run", root / trained["data"].name, root / trained["folds"].name
    params = json.loads((run / "ensemble" / "params.json").read_text())
    params["fusion"]["weights"][params["fusion"]["models"].index("detectron")] = 0.0
    write_json(params, params_path(run, params["fusion"]["models"], "classifier"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ensemble_main(["submit", "--data", str(data), "--folds", str(folds), "--run-dir", str(run), "--name", "zero"])
    gone = sorted((run / "detectron").glob("fold*/*.pth"))
    assert gone, "the detectron folds must have weights to remove"
    for f in gone:
        f.unlink()
    code, summary, err = run_cli(["--src", str(data / "test"), "--run-dir", str(run), "--out", str(tmp_path / "out"),
                                  "--data", str(data), "--meta", str(data / "test_meta.csv"), "--folds", str(folds),
                                  "--workers", "1"], capsys)
    assert code == 0, err
    ours = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False).set_index("image_id")
    theirs = pd.read_csv(root / "submissions" / "zero.csv", dtype=str, keep_default_na=False).set_index("image_id")
    assert ours.sort_index().equals(theirs.sort_index())
    with_detectron = pd.read_csv(trained["submission"], dtype=str, keep_default_na=False).set_index("image_id")
    assert not theirs.sort_index().equals(with_detectron.sort_index()), "weight 0 must change the submission"


@pytest.mark.slow
def test_every_model_and_fold_keeps_curves_a_log_and_its_prediction_settings(trained: dict) -> None:
    """What a user opens after a run, the same for all four models: log.txt (every verb run on the fold; what
    it prints is checked through the real command line in test_models_contract),
    metrics.csv (the shared columns), TensorBoard events under the same tags, the final and best
    weights, and predict.yaml (how the fold's tables were made)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for model in TINY:
        score = "val_auc" if model == "classifier" else "val_map"
        folds = sorted(p for p in trained["run"].joinpath(model).glob("fold*") if p.is_dir())
        assert [f.name for f in folds] == ["fold0", "fold1"], model
        for fold in folds:
            log = (fold / "log.txt").read_text()
            assert f"python -m models {model} train" in log and f"python -m models {model} predict" in log, fold
            metrics = pd.read_csv(fold / "metrics.csv")
            assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", score, "lr", "seconds"], fold
            assert metrics[score].notna().iloc[-1], fold  # the last epoch always validates
            events = EventAccumulator(str(fold / "tensorboard")).Reload()
            assert {"loss/train", "lr", "val/AUC" if model == "classifier" else "val/mAP@0.4"} <= set(events.Tags()["scalars"])
            suffix = ".pth" if model == "detectron" else ".pt"
            assert (fold / f"weights{suffix}").is_file() and (fold / f"best{suffix}").is_file(), fold
            assert yaml.safe_load((fold / "predict.yaml").read_text())["checkpoint"] == "last"


@pytest.mark.slow
def test_findings_overlays_and_page(predicted: dict) -> None:
    out, data = predicted["out"], predicted["data"]
    ids = sorted(p.stem for p in (data / "test").glob("*.png"))
    findings = pd.read_csv(out / "findings.csv", dtype={"image_id": str})
    assert sorted(findings["image_id"].unique()) == ids
    boxes = findings[findings["class_id"].notna() & (findings["class_id"] != NO_FINDING)]
    assert len(boxes) and (boxes["score"] >= 0.01).all()
    named = findings[findings["class_id"].notna()]
    assert (named["class_name"] == [CLASS_NAMES[int(c)] for c in named["class_id"]]).all()
    assert (findings.loc[findings["class_id"] == NO_FINDING, "score"] >= 0.01).all(), "No finding is never below the threshold"
    # what made the predictions, on every row: the run, its models and weights, profiles, the training data
    assert (findings["run"] == str(predicted["run"].resolve())).all()
    assert findings["models"].str.contains("yolo x1 + detectron x2 + effdet x1", regex=False).all()
    assert findings["models"].str.contains("gate hard", regex=False).all()
    assert findings["profile"].str.contains("yolo: demo with epochs", regex=False).all()
    assert findings["trained_on"].str.contains("SYNTHETIC", regex=False).all()
    # with the gate on, p_abnormal is the classifier's fold average, as merge wrote it for the test set
    merged = pd.read_csv(predicted["run"] / "classifier" / "test.csv", dtype={"image_id": str}).set_index("image_id")
    p = findings.groupby("image_id")["p_abnormal"].first()
    np.testing.assert_allclose(p.to_numpy(), merged.loc[p.index, "p_abnormal"].to_numpy(), atol=1e-6)
    meta = pd.read_csv(data / "test_meta.csv", dtype={"image_id": str}).set_index("image_id")
    for i in ids:
        overlay = cv2.imread(str(out / "overlays" / f"{i}.png"))
        h, w = overlay.shape[:2]
        assert max(h, w) == 1024
        assert abs(w / h - meta.loc[i, "dim1"] / meta.loc[i, "dim0"]) < 0.01, "overlay keeps the original aspect ratio"
        assert (out / "thumbs" / f"{i}.jpg").is_file()
    page = (out / "index.html").read_text()
    assert '<div class="warn">These models were trained on SYNTHETIC demo images' in page
    for text in (str(predicted["run"].resolve()), "yolo 1, detectron 2, effdet 1", "iou_thr 0.5", "hard: p_normal"):
        assert text in page, text
    assert re.search(r"demo profile \(epochs \d+ -&gt; 1\b[^)]*\), 2 folds", page), "the yolo line names its profile"
    assert json.loads((out / "run.json").read_text())["warning"].startswith("These models were trained on SYNTHETIC")
    order = re.findall(r'href="overlays/([0-9a-f]+)\.png"', page)
    assert sorted(order) == ids
    assert list(p.loc[order]) == sorted(p, reverse=True), "grid sorted by p_abnormal, highest first"
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not load anything from the network"
    assert pd.read_csv(out / "failed.csv").empty


@pytest.mark.slow
def test_rerun_redoes_nothing_and_settings_redo_all(predicted: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)  # a copy: the module's output stays as the other tests expect it
    argv = list(predicted["argv"])
    argv[argv.index("--out") + 1] = str(out)
    before = (out / "predictions.csv").read_bytes()
    code, summary, _ = run_cli(argv, capsys)
    assert code == 0 and summary["skipped_done"] == summary["images"] == 10
    assert (out / "predictions.csv").read_bytes() == before
    argv = [*argv, "--overlay-px", "512"]  # other settings: the finished batches no longer count
    code, summary, _ = run_cli(argv, capsys)
    assert code == 0 and summary["skipped_done"] == 0
    assert max(cv2.imread(str(next((out / "overlays").glob("*.png")))).shape[:2]) == 512


@pytest.mark.slow
def test_a_killed_run_resumes_batch_by_batch(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["--src", str(trained["data"] / "test"), "--run-dir", str(trained["run"]), "--out", str(out), "--size", "128",
            "--batch", "4", "--workers", "0"]
    code, summary, _ = run_cli(argv, capsys)
    assert code == 0 and summary["images"] == 10
    complete = (out / "predictions.csv").read_text()
    (out / ".parts" / "part-000001.ids.csv").unlink()  # as if killed while its 4 images were running
    (out / "predictions.csv").unlink()
    code, summary, _ = run_cli(argv, capsys)
    assert code == 0 and summary["images"] == 10 and summary["skipped_done"] == 6
    assert (out / "predictions.csv").read_text() == complete


@pytest.mark.slow
def test_bad_files_are_listed_and_the_rest_predicted(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Unreadable files and an id found twice (both files, each naming the other) go to failed.csv and the rest
    is predicted. THRESHOLD=1: the console and page say no finding reaches it and give the best score; the
    console repeats the synthetic-data warning; LABELS draws the ground truth beside the image it covers."""
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "again").mkdir()
    good = sorted((trained["data"] / "test").glob("*.png"))[:4]
    for p in good:
        shutil.copy(p, src / "nested" / p.name)
    shutil.copy(good[3], src / "again" / good[3].name)  # the same id in two folders: which one is meant?
    (src / "empty.png").write_bytes(b"")
    (src / "notes.dcm").write_text("not a DICOM file\n")
    labels = tmp_path / "annotations_test.csv"
    labels.write_text(f"image_id,class_name,x_min,y_min,x_max,y_max\n{good[1].stem},Nodule/Mass,20,30,60,70\n")
    out = tmp_path / "out"
    code, summary, err = run_cli(["--src", str(src), "--run-dir", str(trained["run"]), "--out", str(out), "--size", "128",
                                  "--batch", "2", "--workers", "2", "--threshold", "1", "--labels", str(labels)], capsys)
    assert code == 0
    assert summary["images"] == 3 and summary["failed"] == 4
    failed = pd.read_csv(out / "failed.csv")
    assert sorted(Path(f).name for f in failed["file"]) == sorted(["empty.png", "notes.dcm", good[3].name, good[3].name])
    twice = failed[failed["file"].str.endswith(good[3].name)]
    assert {Path(f).parent.name for f in twice["file"]} == {"nested", "again"}
    assert all(f"is also at {other}" in reason for other, reason in zip(twice["file"][::-1], twice["reason"]))
    assert failed["reason"].str.len().gt(0).all()
    assert "skipped" in err and "notes.dcm" in err
    preds = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    assert sorted(preds["image_id"].unique()) == sorted(p.stem for p in good[:3])
    assert preds.loc[preds["class_id"] != NO_FINDING, "x_max"].max() <= 128 + 1, "no meta: the files' own size"
    # nothing reaches THRESHOLD=1: said, with the best score, in the console and on the page
    best = preds.loc[preds["class_id"] != NO_FINDING, "score"].max()
    assert summary["findings"] == 0 and summary["best_finding_score"] == pytest.approx(best, abs=1e-4)
    assert "No finding reaches THRESHOLD=1: the best is" in err and f"{best:.3f}" in err, err
    assert "No finding reaches THRESHOLD=1" in (out / "index.html").read_text()
    assert "warning: These models were trained on SYNTHETIC" in err, err  # demo models: said in the console too
    # ground truth beside the predictions of the one image LABELS covers
    widths = {p.stem: cv2.imread(str(out / "overlays" / f"{p.stem}.png")).shape[1] for p in good[:3]}
    assert summary["ground_truth_images"] == 1 and widths[good[1].stem] > 1.9 * widths[good[0].stem], widths


@pytest.mark.slow
def test_all_files_bad_is_one_line(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG broken")
    code, _, err = run_cli(["--src", str(src), "--run-dir", str(trained["run"]), "--out", str(tmp_path / "out"),
                            "--size", "128", "--workers", "0"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error:") and "could be read" in err
    assert (tmp_path / "out" / "failed.csv").is_file()


def _fake_run(root: Path, folds: dict[str, list[int]], gate: str = "none") -> Path:
    """A run folder with params.json and empty fold folders: enough for the checks made before loading."""
    detectors = [m for m in folds if m != "classifier"]
    write_json({"fusion": {"models": detectors, "weights": [1.0] * len(detectors), "iou_thr": 0.55, "skip_box_thr": 0.0,
                           "conf_type": "avg"}, "gate": {"rule": gate, "low": 0.0, "high": 1.0}},
               root / "ensemble" / "params.json")
    for m, ks in folds.items():
        for k in ks:
            (root / m / f"fold{k}").mkdir(parents=True)
    return root


def _one_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "a.png"), np.full((64, 64), 100, np.uint8))
    return folder


@pytest.mark.parametrize("case, expected", [
    ("empty_src", "no DICOM/PNG/JPEG files found"),
    ("no_params", "params.json: no tuned ensemble parameters"),
    ("missing_fold", "model 'effdet' has no fold(s) [1]"),
    ("missing_classifier_fold", "model 'classifier' has no fold(s) [2]"),
    ("fold_file", "model 'yolo' has no fold(s) [2]"),
    ("untrained_fold", "fold 0 of 'yolo' is not trained"),
    ("out_inside_src", "must not lie inside SRC"),
])
def test_bad_setups_are_one_line_and_exit_2(case: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _one_image(tmp_path / "src")
    run, out, extra = tmp_path / "run", tmp_path / "out", []
    if case == "empty_src":
        shutil.rmtree(src)
        src.mkdir()
        _fake_run(run, {"yolo": [0, 1]})
    elif case == "no_params":
        (run / "yolo" / "fold0").mkdir(parents=True)
    elif case == "missing_fold":
        _fake_run(run, {"yolo": [0, 1], "effdet": [0]})
    elif case == "missing_classifier_fold":
        _fake_run(run, {"yolo": [0, 1, 2], "classifier": [0, 1]}, gate="soft")
    elif case == "fold_file":
        _fake_run(run, {"yolo": [0, 1]})
        pd.DataFrame({"image_id": ["x", "y", "z"], "fold": [0, 1, 2]}).to_csv(tmp_path / "folds.csv", index=False)
        extra = ["--folds", str(tmp_path / "folds.csv")]
    elif case == "untrained_fold":
        _fake_run(run, {"yolo": [0]})
        shutil.copy(Path(__file__).parents[1] / "models" / "yolo" / "demo.yaml", run / "yolo" / "fold0" / "config.yaml")
    elif case == "out_inside_src":
        _fake_run(run, {"yolo": [0]})
        out = src / "out"
    code, _, err = run_cli(["--src", str(src), "--run-dir", str(run), "--out", str(out), "--size", "64", *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err


def test_overlay_draws_each_class_in_its_colour_above_the_threshold() -> None:
    image = np.full((200, 100), 60, np.uint8)  # 100 wide, 200 tall (original 1000 x 2000)
    preds = pd.DataFrame({"image_id": "a", "class_id": [3, 10, 0, NO_FINDING], "score": [0.9, 0.5, 0.1, 0.2],
                          "x_min": [100.0, 500.0, 0.0, 0.0], "y_min": [1000.0, 200.0, 0.0, 0.0],
                          "x_max": [400.0, 900.0, 900.0, 1.0], "y_max": [1800.0, 600.0, 1900.0, 1.0]})
    out = draw(image, preds, (1000, 2000), threshold=0.3, title="a")
    assert out.shape == (200, 100, 3)
    # box edges at original/10 px, in the class colour: class 3 left edge x=10, class 10 bottom edge y=60
    assert tuple(out[150, 10]) == PALETTE[3]
    assert tuple(out[60, 70]) == PALETTE[10]
    assert not (out == np.array(PALETTE[0])).all(axis=2).any(), "a finding under the threshold is not drawn"


def chromium() -> str:
    """The headless browser the offline pages are checked in; skips (fails under CI) without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "chromium not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def screenshot(page: Path, path: Path, height: int = 900) -> np.ndarray:
    """``page`` rendered by headless Chromium (a fresh profile, no network services) as a grayscale
    image 1280 px wide and ``height`` tall; the PNG stays at ``path`` to be looked at."""
    profile = path.with_name(path.stem + "-profile")
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size=1280,{height}",
                    f"--screenshot={path}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


@pytest.mark.slow
def test_page_shows_the_grid_in_headless_chromium(predicted: dict, tmp_path: Path) -> None:
    chromium()
    page = tmp_path / "page"
    shutil.copytree(predicted["out"], page, ignore=shutil.ignore_patterns(".parts"))
    shot = screenshot(page / "index.html", tmp_path / "shot.png", height=1100)
    # the page is light grey and white; the radiograph thumbnails are the dark pixels, in rows of cards
    # under the run's table
    dark = shot < 90
    assert dark.mean() > 0.1, f"only {dark.mean():.1%} dark pixels: the thumbnails did not render"
    rows = np.flatnonzero(dark.mean(axis=1) > 0.2)
    bands = [r for r in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(r) > 50]
    assert bands, "no band of thumbnails"
    columns = np.flatnonzero(dark[bands[0]].mean(axis=0) > 0.3)
    assert len(np.split(columns, np.flatnonzero(np.diff(columns) > 5) + 1)) >= 3, "several thumbnails side by side"
    # the red warning (models trained on the synthetic data) is drawn above them
    red = (cv2.imread(str(tmp_path / "shot.png"))[: bands[0][0]] == (32, 0, 176)).all(axis=2)
    assert red.sum() > 500, "the red warning box is not on the page"
    shutil.rmtree(page / "thumbs")  # the same page without its pictures: the check must notice
    assert (screenshot(page / "index.html", tmp_path / "broken.png", height=1100) < 90).mean() < 0.05


@pytest.mark.slow
def test_real_dicoms_pngs_and_jpegs(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = pd.read_csv(real(MANIFEST), dtype={"image_id": str})
    picks = manifest[manifest["format"].str.startswith("DICOM")]
    picks = pd.concat([picks, manifest[manifest["file"].str.contains("Tuprott991/fd1952|nguyenquocduongqnu/static/0a08")]])
    src = tmp_path / "src"
    src.mkdir()
    for f in picks["file"]:  # links, not copies: the real data stays in ../shared/data
        (src / Path(f).name).symlink_to(real(f))
    out = tmp_path / "out"
    code, summary, err = run_cli(["--src", str(src), "--run-dir", str(trained["run"]), "--out", str(out), "--size", "128",
                                  "--threshold", "0.01", "--workers", "2"], capsys)
    assert code == 0, err
    assert summary["images"] == len(picks) == 7 and summary["failed"] == 0
    preds = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    assert set(preds["image_id"]) == set(picks["image_id"])
    for r in picks.itertuples():
        overlay = cv2.imread(str(out / "overlays" / f"{r.image_id}.png"), cv2.IMREAD_GRAYSCALE)
        assert max(overlay.shape) == 1024 and abs(overlay.shape[1] / overlay.shape[0] - r.width / r.height) < 0.01
        assert overlay.std() > 20, "a radiograph, not a blank picture"
        boxes = preds[(preds["image_id"] == r.image_id) & (preds["class_id"] != NO_FINDING)]
        assert (boxes["x_max"] <= r.width + 1).all() and (boxes["y_max"] <= r.height + 1).all()
    dicoms = picks.loc[picks["format"].str.startswith("DICOM"), "image_id"]
    assert preds.loc[preds["image_id"].isin(set(dicoms)), BOX_COLUMNS[2]].max() > 128, "boxes in original DICOM pixels"
    page = (out / "index.html").read_text()
    assert all(f"overlays/{i}.png" in page for i in picks["image_id"])


def test_findings_never_say_no_finding_below_the_threshold() -> None:
    """An image without a finding at the threshold is listed once: as No finding only when that score
    (1 - p_abnormal) reaches the threshold too, else without a class, its note naming P(abnormal) and
    the best box (the demo run on real radiographs read 'p_abnormal 1.0, No finding, score 0.0')."""
    from ensemble.predict_images import findings_table

    rows = [["hit", 3, 0.8, 10, 10, 50, 50], ["hit", 14, 0.1, 0, 0, 1, 1],
            ["normal", 5, 0.05, 10, 10, 50, 50], ["normal", 14, 0.9, 0, 0, 1, 1],
            ["unsure", 7, 0.12, 10, 10, 50, 50],  # no No-finding row: p_abnormal 1
            ["low", 14, 0.2, 0, 0, 1, 1]]  # p_abnormal 0.8, no box at all
    preds = pd.DataFrame(rows, columns=["image_id", "class_id", "score", *BOX_COLUMNS])
    table = findings_table(preds, ["hit", "normal", "unsure", "low"], threshold=0.3).set_index("image_id")
    assert table.loc["hit", "class_name"] == "Cardiomegaly" and table.loc["hit", "score"] == 0.8
    assert table.loc["normal", "class_name"] == "No finding" and table.loc["normal", "score"] == pytest.approx(0.9)
    assert "no finding box scored >= 0.3 (best box ILD 0.05)" in table.loc["normal", "note"]
    for image_id, p, note in (("unsure", 1.0, "best box Lung Opacity 0.12"), ("low", 0.8, "no box at all")):
        r = table.loc[image_id]
        assert pd.isna(r["class_id"]) and r["class_name"] == "" and pd.isna(r["score"]) and r["p_abnormal"] == pytest.approx(p)
        assert r["note"].startswith(f"P(abnormal) {p:.2f} but no finding box scored >= 0.3") and note in r["note"]
    assert not ((table["class_name"] == "No finding") & ~(table["score"] >= 0.3)).any()
    assert len(table) == 4
