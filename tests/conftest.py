"""Shared fixtures: the real VinDr files in ../shared/data (never copied into the repo), a small
synthetic benchmark generated once per session, the fold-0 training runs of the quality tests, and
how `make test`'s pytest-xdist workers share the work.

Real-data tests skip with a reason when the files are absent, except under CI (``CI=true``),
where a missing file is a failure: CI must never go green by skipping them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# `make test` runs one pytest-xdist worker per core: each worker's torch gets its share of the cores
# instead of every worker starting one thread per core. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pandas as pd
import pytest

from cxr.dataset import NO_FINDING
from cxr.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
# Files that train models, longest first (see pytest_collection_modifyitems).
LONG_FILES = ["test_every_class.py", "test_demo_quality.py", "test_experiments.py", "test_detectron.py", "test_yolo.py",
              "test_effdet.py", "test_classifier.py", "test_gpu_check.py", "test_scheduler.py", "test_distributed.py",
              "test_predict_images.py"]
ONE_UNIT_EACH = {"test_every_class.py", "test_demo_quality.py"}
TRAIN_FOLDS = "vindr-cxr-train-annotations/nhtlongcs/data/folds"
TRAIN_INFO = "vindr-cxr-train-annotations/nhtlongcs/datasets/train_info.csv"
TEST_LABELS = "vindr-cxr-test-annotations/Tuprott991/vindr_physionet_384/annotations_test.csv"
TEST_SIZES = "kaggle-competition-files/aqx95/data/csv/test.csv"
SAMPLE_SUBMISSION = "kaggle-competition-files/aqx95/data/csv/sample_submission.csv"
MANIFEST = "vindr-cxr-images/manifest.csv"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Work units of `make test`'s workers (``--dist loadgroup``): one per file, so a file's module
    fixtures are built once, except the tests marked ``full_profile``, which form one unit: each
    holds 5-8 GiB, so they run one after another; and the quality trainings (:data:`ONE_UNIT_EACH`), which
    share nothing and are the longest tests. Long units first, so the workers finish together."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: -1 if item.get_closest_marker("full_profile") else rank.get(item.path.name, len(rank)))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(work_unit(item)))
        if item.get_closest_marker("full_profile") or item.path.name in ONE_UNIT_EACH:
            # minutes of CPU each, 20 of the suite's 42 worker-minutes: `make test-heavy` (CI runs both), so
            # `make test` stays within its 12 minutes on 2 cores
            item.add_marker(pytest.mark.heavy)


def work_unit(item: pytest.Item) -> str:
    if item.get_closest_marker("full_profile"):
        return "full_profiles"
    if item.path.name in ONE_UNIT_EACH:
        # no "]" in a group name: pytest-xdist reads the text after the last "@" as the group only when no "]"
        # follows it
        return f"{item.path.name}:{item.name}".replace("[", ":").replace("]", "")
    return item.path.name


GROUPS_LOST: list[str] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a worker, note when its tests lack their group in their ids, where pytest-xdist reads it: pytest 9.2
    keeps node ids where pytest-xdist 3.8 does not write, so every test became its own unit, module
    fixtures were built on both workers and the full-profile tests ran side by side. A pytest or xdist
    upgrade that breaks it again fails every test (:func:`groups_applied`) instead of only running slower."""
    items = session.items
    if getattr(session.config.option, "loadgroup", False) and items:  # set on pytest-xdist workers only
        group = items[0].get_closest_marker("xdist_group").args[0]
        if not items[0].nodeid.endswith("@" + group):
            GROUPS_LOST.append(f"pytest-xdist did not apply the xdist_group markers (pytest {pytest.__version__}): "
                               f"{items[0].nodeid} has no @{group}; pin the versions in requirements.txt")


@pytest.fixture(autouse=True)
def groups_applied() -> None:
    if GROUPS_LOST:  # an exception in a worker's collection would only crash it, without this message
        pytest.fail(GROUPS_LOST[0], pytrace=False)


@pytest.fixture
def figures(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """``figures(text)`` prints a measured figure (time, memory, score) in the run's summary; plain
    prints would be lost under pytest-xdist, whose workers have no terminal."""
    return lambda text: record_property("figure", text)


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [f"{report.nodeid.split('@')[0]}: {value}" for key in ("passed", "failed") for report in terminalreporter.stats.get(key, [])
             if report.when == "call" for name, value in report.user_properties if name == "figure"]
    if lines:
        terminalreporter.section("measured figures")
        for line in lines:
            terminalreporter.write_line(line)


def real(relpath: str) -> Path:
    """Path of a file in ../shared/data; skip (or fail under CI) when it is missing."""
    path = SHARED / relpath
    if not path.exists():
        message = f"real VinDr data not found: {path} (set CXR_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def real_train_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle's train.csv (67,914 rows), rebuilt from the five staged fold files, in a temp dir."""
    folds = real(TRAIN_FOLDS)
    parts = [pd.read_csv(p, dtype={"image_id": str}) for p in sorted(folds.glob("*/*_val.csv"))]
    df = pd.concat(parts, ignore_index=True)
    path = tmp_path_factory.mktemp("real") / "train.csv"
    df[["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def real_labels(real_train_csv: Path) -> pd.DataFrame:
    from cxr.labels import read_sizes, read_train_labels

    return read_train_labels(real_train_csv, read_sizes(real(TRAIN_INFO)))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return generate(SynthConfig(out=str(out), n_train=150, n_test=40, size=128, seed=3))


@pytest.fixture(scope="module")
def fold_setup(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data folder, 3-fold file, run root) shared by the tests of one model module."""
    from cxr.data import DataFolder
    from cxr.folds import make_folds
    from cxr.io import write_table

    run = tmp_path_factory.mktemp("run")
    folds = run / "folds.csv"
    write_table(make_folds(DataFolder(synth_dir).labels, n_folds=3, seed=0), folds)
    return synth_dir, folds, run


def images_by_finding(data: Path) -> tuple[list[str], list[str]]:
    """(images with a finding, images without) of ``data``'s fused labels, each in label order: what the
    adapter tests' small fold files are drawn from."""
    from cxr.data import DataFolder

    fused = DataFolder(data).fused()
    abnormal = fused["class_id"] != NO_FINDING
    return (list(dict.fromkeys(fused.loc[abnormal, "image_id"])),
            list(dict.fromkeys(fused.loc[~abnormal, "image_id"])))


def model_args(model: str, verb: str, setup: tuple[Path, Path, Path], *extra: str, fold: int = 0,
               run: Path | None = None) -> list[str]:
    """argv for ``python -m models MODEL VERB`` on ``setup`` (see :func:`fold_setup`)."""
    data, folds, default_run = setup
    return [model, verb, "--data", str(data), "--folds", str(folds), "--fold", str(fold),
            "--run-dir", str(run or default_run), *extra]


# The CLI in a child process that reports its own peak RSS (resource.getrusage) on its last line.
WITH_PEAK_RSS = ("import resource, sys\nfrom models.__main__ import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
                 "    print('peak_rss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")


def kill_when(argv: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``python -m models ARGV`` in its own process group and SIGKILL the group as soon as
    ``ready()`` holds (poll it for a COMPLETE checkpoint, never a sleep: a fast run would race it).

    Fails the test if the run ends or times out before ``ready()``.
    """
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "models", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"run ended (rc {proc.returncode}) or timed out before the kill point: {argv}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# The "every class" synthetic variant: 80% abnormal images, each with 1-3 of the 14 finding classes
# drawn uniformly, boxes at least a quarter of the side (32 px at 128 px), so every class is frequent
# and visible at the demo size (at 0.15 the faint Lung Opacity haze stays at AP 0 in short runs).
EVERY_CLASS = {"normal_share": 0.2, "balanced_min_box": 0.25}


def fold0_against_prior(model: str, root: Path, *overrides: str, every_class: bool = False
                        ) -> tuple[float, float, float, list[int]]:
    """Train ``model``'s demo profile (with ``--set OVERRIDES``) on fold 0 of 3 of 300 synthetic images
    at 128 px, the `make demo` data or the :data:`EVERY_CLASS` variant, through the real entry point;
    return (model OOF mAP, prior-box OOF mAP, minutes, the finding classes where the model's fold-0
    AP is above 0)."""
    import contextlib
    import io
    import json
    import time

    from cxr.cli import main as cxr_main
    from cxr.data import DataFolder
    from cxr.folds import make_folds
    from cxr.io import write_table
    from models.__main__ import main

    data = generate(SynthConfig(out=str(root / "data"), n_train=300, n_test=20, size=128, seed=1,
                                **(EVERY_CLASS if every_class else {})))
    folds = root / "folds.csv"
    write_table(make_folds(DataFolder(data).labels, n_folds=3, seed=0), folds)
    # validation at the last epoch only: with checkpoint: last it draws the curves but never picks the weights
    # that predict, so the OOF figure is the demo profile's while the run skips the demo's mid-run validations
    overrides = ("validate_every=1000", *overrides)
    common = ["--data", str(data), "--folds", str(folds), "--fold", "0", "--run-dir", str(root / "run"),
              "--set", *overrides]
    start = time.time()
    main([model, "train", *common])
    main([model, "predict", *common])
    minutes = (time.time() - start) / 60
    cxr_main(["baseline", "--labels", str(data / "train.csv"), "--train-sizes", str(data / "train_meta.csv"),
              "--folds", str(folds), "--out", str(root / "prior.csv")])
    results = []
    for path in (root / "run" / model / "fold0" / "oof.csv", root / "prior.csv"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cxr_main(["evaluate", "--labels", str(data / "train.csv"), "--submission", str(path), "--folds", str(folds),
                      "--fold", "0", "--json"])
        results.append(json.loads(buf.getvalue()))
    found = sorted(int(c) for c, ap in results[0]["ap"].items() if int(c) != NO_FINDING and ap)
    return results[0]["map"], results[1]["map"], minutes, found


def assert_infer_takes_a_view_size(adapter: Any, out: Path, data: Path) -> None:
    """A trained fold's ``infer`` runs the network at a TTA view's input side (here twice the profile's, rounded
    to the adapter's stride): boxes still normalized to the image given, and not the plain view's boxes."""
    from cxr.config import load
    from cxr.data import DataFolder
    from cxr.images import read_image
    from models.common import view_size

    cfg = load(adapter.Config, out / "config.yaml", {"score_thr": 0.0, "device": "cpu"})
    infer = adapter.load_infer(cfg, out)
    folder = DataFolder(data)
    image = read_image(folder.image("test", folder.test_ids()[0]))
    size = view_size(cfg.imgsz, 2.0, adapter.stride(cfg) if hasattr(adapter, "stride") else 32)
    (plain, _, _), (larger, _, _) = infer([image])[0], infer([image], size)[0]
    assert size > cfg.imgsz and len(larger) > 0
    # raw boxes of an untrained model may cross the border (the table clips them); boxes divided by the wrong
    # side would put the typical center near 0.5 x or 2 x where it is
    centers = (larger[:, :2] + larger[:, 2:]) / 2
    assert 0.2 < float(np.median(centers)) < 0.8, larger
    assert plain.shape != larger.shape or not np.allclose(plain, larger), "the view's size was ignored"
