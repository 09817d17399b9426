"""bench/gpu_check.sh, the GPU check, run the only way a CPU can: ``--smoke`` (every path of the check at 128 px,
figures meaningless) with one model made to fail; and its figures' pure functions checked by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from bench import gpu_check
from bench.gpu_check import RealRun, Schedule, five_fold_hours, shm_need, shm_warning, train_speed

REPO = Path(__file__).resolve().parents[1]


def profile_schedule(name: str) -> Schedule:
    """The 5-fold schedule read from ``models/NAME/full.yaml`` itself; validations: 2 passes for a detector (loss,
    then mAP@0.4), 1 for the classifier (loss and AUC from one pass)."""
    p = yaml.safe_load((REPO / "models" / name / "full.yaml").read_text())
    return Schedule(p["epochs"], p["validate_every"], p["tta"], 1 if name == "classifier" else 2)


def test_five_fold_hours_by_hand() -> None:
    # effdet's full profile: 40 epochs, a validation (2 passes) every epoch, flip TTA
    assert profile_schedule("effdet") == Schedule(40, 1, True, 2)
    h = five_fold_hours(Schedule(40, 1, True, 2), train_ips=20.0, predict_ips=10.0)
    assert h.train_s == 40 * 12_000 / 20  # 24,000 s
    assert h.validations == 40
    assert h.validation_s == 40 * 2 * 3_000 / (2 * 10)  # 2 passes, each one view at 2 x 10 img/s: 12,000 s
    assert h.predict_s == (3_000 + 3_000) / 10  # OOF + test with TTA: 600 s
    assert h.total_h == pytest.approx(5 * (24_000 + 12_000 + 600) / 3600)  # 50.83 h
    # every 3rd epoch and the last: epochs 3, 6, 9 and 10, one pass each (the classifier's); no TTA; less data
    h = five_fold_hours(Schedule(10, 3, False, 1), train_ips=100.0, predict_ips=50.0, real=RealRun(1_200, 300, 600, 4))
    assert (h.train_s, h.validations, h.validation_s, h.predict_s) == (120.0, 4, 24.0, 18.0)
    assert h.total_h == pytest.approx(4 * 162 / 3600)
    with pytest.raises(ValueError):
        five_fold_hours(Schedule(10, 1, False, 2), 0.0, 1.0)


def test_train_speed_times_the_steps_after_the_warmup() -> None:
    # starts of 5 micro-batches; the first (loader start, cuDNN tuning) and the last (its end holds validation) out
    ips, images, seconds = train_speed([0.0, 5.0, 6.0, 7.5, 8.0], [4, 4, 4, 4, 2], warmup=1)
    assert (images, seconds, ips) == (12, 3.0, 4.0)
    with pytest.raises(RuntimeError, match="at least 4"):
        train_speed([0.0, 1.0, 2.0], [4, 4, 4], warmup=2)


def test_shm_warning_names_the_fixes() -> None:
    need = shm_need(batch=4, imgsz=768, workers=8, float_tensors=True)  # the classifier's full profile
    assert need == 8 * 2 * 4 * 3 * 768 * 768 * 4  # 432 MiB
    warning = shm_warning(64 * 2**20, need, workers=8)  # a container's default /dev/shm
    assert warning and "--shm-size" in warning and "--ipc=host" in warning and "--workers 1" in warning
    assert "no /dev/shm" in shm_warning(None, need, workers=8)
    assert shm_warning(2 * 2**30, need, workers=8) is None
    assert shm_warning(64 * 2**20, 0, workers=0) is None


@pytest.mark.parametrize("argv, message", [
    (["--models", "yolo,nosuch"], "error: --models: unknown model(s) ['nosuch']"),
    (["--models", "yolo", "--fail", "effdet"], "error: --fail: 'effdet' is not among the models checked (yolo)"),
    (["--fail", "yolo:crash"], "error: --fail: 'yolo:crash': the mode after ':' is raise"),
    (["--limit", "yolo=-3"], "error: --limit: 'yolo=-3': expected SECONDS or MODEL=SECONDS"),
    (["--budget", "0"], "error: --budget: must be more than 0 seconds"),
])
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def smoke(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict, float]:
    """``bash bench/gpu_check.sh --smoke ARGS`` with this interpreter; (process, its --json results, seconds)."""
    results = tmp_path / "results.json"
    started = time.perf_counter()
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", *args, "--work", str(tmp_path), "--json",
                           str(results)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})
    return done, json.loads(results.read_text()), time.perf_counter() - started


@pytest.mark.slow
def test_smoke_run_survives_a_failing_model(tmp_path: Path, figures) -> None:
    """Each model in its own process, the first made to fail in its first training step: the others still run
    and report, the exit is 1, the failed model's log and run folder are kept, and each OK model's 5-fold hours
    are the formula applied to its own profile's schedule (not the check's one epoch). Three of the four models
    (detectron2's R101 costs another ~70 s of CPU; `bash bench/gpu_check.sh --smoke` runs it too)."""
    names = ["yolo", "effdet", "classifier"]
    done, results, seconds = smoke(tmp_path, "--models", ",".join(names), "--fail", "yolo")
    out = done.stdout
    figures(f"gpu_check --smoke (yolo failing on purpose, effdet, classifier): {seconds:.0f} s")
    assert done.returncode == 1, out + done.stderr
    assert out.count("5-fold hours =") == 1  # the formula, printed once
    assert "device: CPU" in out and "/dev/shm:" in out and "checkout" in out
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == names
    failed = rows["yolo"]
    assert failed["status"] == "FAIL" and "forced failure of yolo" in failed["error"]
    assert "FAIL yolo" in out
    root = Path(results["root"])
    assert results["kept"] and root.is_dir()
    log = (root / "yolo" / "log.txt").read_text()
    assert "Traceback" in log and "forced failure of yolo" in log
    assert (root / "yolo" / "run" / "yolo" / "fold0" / "dataset" / "data.yaml").exists()  # what it got to write
    summary = out[out.index("gpu_check summary"):]
    for name in names[1:]:
        row = rows[name]
        assert row["status"] == "OK", (name, row["error"], out)
        r = row["result"]
        schedule = profile_schedule(name)
        assert r["schedule"] == asdict(schedule)
        assert r["hours"] == pytest.approx(asdict(five_fold_hours(schedule, r["train"]["ips"], r["predict"]["ips"])))
        assert r["train"]["images"] > 0 and r["predict"]["images"] > 0 and r["predict"]["batches"] >= 2
        line = next(x for x in summary.splitlines() if x.startswith(name))
        assert " OK " in line and f" {r['hours']['total_h']:.1f} " in line
    assert "gpu_check FAILED (yolo)" in out and str(root) in out
    # kept for the failure: the passing models' logs and curves, without their checkpoints
    assert (root / "effdet" / "log.txt").exists()
    assert (root / "effdet" / "run" / "effdet" / "fold0" / "metrics.csv").exists()
    assert not [p for p in root.rglob("*") if p.suffix in (".pt", ".pth", ".pkl")]


@pytest.mark.slow
def test_smoke_run_kills_a_hung_model_at_its_limit(tmp_path: Path) -> None:
    done, results, seconds = smoke(tmp_path, "--models", "classifier", "--fail", "classifier:hang", "--limit", "15")
    assert done.returncode == 1, done.stdout + done.stderr
    row = results["rows"][0]
    assert row["status"] == "FAIL" and "killed at its time limit of 15 s" in row["error"]
    assert 15 <= row["seconds"] < 30 and seconds < 120
    assert "FAIL classifier" in done.stdout and (Path(results["root"]) / "classifier" / "log.txt").exists()
    # the hung child went with its process group: nothing started for this check's folder is left
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert not [line for line in left if results["root"] in line]
