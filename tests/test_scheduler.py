"""models/scheduler.py: every model x fold job through Ray, on cards that are slots here (no GPU).

A stand-in adapter (a small script with the adapter's command line that sleeps a different time per
fold and records CUDA_VISIBLE_DEVICES) shows the scheduling: never two jobs on one card, no card idle
while jobs wait, a failed job reported with its log while the others finish, a re-run that skips
finished folds, several cards per job, an existing Ray cluster. One real run: the classifier's demo
profile for one epoch on every fold of two cards, then merge. Ray stays on loopback throughout.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from cxr.data import DataFolder
from cxr.folds import make_folds
from cxr.io import write_table
from cxr.synth import SynthConfig, generate
from models.scheduler import JOB_COLUMNS, LOCAL_RAY_ENV, main

REPO = Path(__file__).resolve().parents[1]

# The adapter's command line (python -m models MODEL VERB --run-dir R [--set K=V ...] [--fold K]):
# train sleeps SLEEP x 1, 2 or 3 by fold and model and fails for --set fail=MODEL:FOLD; predict
# writes the fold's oof.csv, merge the model's; each run appends its cards, threads and CPU cores to RUN/trace.txt.
STAND_IN = '''
import os, sys, time
from pathlib import Path
model, verb, *args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
sets = {}
for item in args[args.index("--set") + 1:] if "--set" in args else []:
    if item.startswith("--"):
        break
    sets[item.split("=")[0]] = item.split("=", 1)[1]
run, fold = Path(opt("--run-dir")), int(opt("--fold")) if "--fold" in args else -1
if verb == "check":  # the real check compares saved settings; the stand-in has none
    sys.exit(0)
start = time.time()
if verb == "train":
    time.sleep(float(sets.get("sleep", "0.2")) * (1 + (fold + len(model)) % 3))
    if sets.get("fail") == f"{model}:{fold}":
        sys.exit(f"{model} fold {fold}: stand-in failure")
elif verb == "predict":
    (run / model / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    (run / model / f"fold{fold}" / "oof.csv").write_text("image_id\\n")
elif verb == "merge":
    (run / model / "oof.csv").write_text("image_id\\n")
print(verb, model, fold, "done")
cores = " ".join(map(str, sorted(os.sched_getaffinity(0))))
with open(run / "trace.txt", "a") as f:
    f.write(f"{model}|{fold}|{verb}|{os.environ.get('CUDA_VISIBLE_DEVICES')}|{os.environ.get('OMP_NUM_THREADS')}|{cores}\\n")
'''


def schedule(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m models.scheduler ARGS`` in ``cwd`` with a local Ray kept on loopback; ``env``: variables
    to set (None: to unset)."""
    env = {**os.environ, **LOCAL_RAY_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "models.scheduler", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, env={k: v for k, v in env.items() if v is not None})


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    """Scheduler arguments for the stand-in adapter on a 3-fold file, run dir ``tmp_path/run``."""
    (tmp_path / "adapter.py").write_text(STAND_IN)
    (tmp_path / "folds.csv").write_text("image_id,fold\na,0\nb,1\nc,2\n")
    return ["--data", "data", "--folds", "folds.csv", "--run-dir", "run", "--adapter", f"{sys.executable} adapter.py"]


def jobs_table(run: Path) -> pd.DataFrame:
    jobs = pd.read_csv(run / "jobs.csv", dtype={"cards": str, "fold": str}, keep_default_na=False)
    assert list(jobs.columns) == JOB_COLUMNS
    return jobs.assign(start=pd.to_datetime(jobs["start"]), end=pd.to_datetime(jobs["end"]))


def card_spans(jobs: pd.DataFrame) -> dict[str, list[tuple]]:
    """card -> [(start, end, model, fold)] of every job (train start to its last verb's end) that held it."""
    spans: dict[str, list[tuple]] = {}
    for (model, fold), rows in jobs[jobs["verb"] != "merge"].groupby(["model", "fold"]):
        assert rows["cards"].nunique() == 1, f"{model} fold {fold} changed cards between verbs"
        for card in rows["cards"].iloc[0].split(","):
            spans.setdefault(card, []).append((rows["start"].min(), rows["end"].max(), model, fold))
    return {card: sorted(s) for card, s in spans.items()}


def assert_one_job_per_card(jobs: pd.DataFrame) -> dict[str, list[tuple]]:
    spans = card_spans(jobs)
    for card, s in spans.items():
        for (_, end, *job), (start, _, *nxt) in itertools.pairwise(s):
            assert start >= end, f"card {card}: {nxt} started at {start} before {job} ended at {end}"
    return spans


@pytest.mark.parametrize("args, message", [
    (["--models", "nope", "--devices", "0"], "'nope' is not a model family"),
    (["--models", "classifier", "--devices", ""], "DEVICES: expected card ids"),
    (["--models", "classifier", "--devices", "0,,1"], "DEVICES: expected card ids"),
    (["--models", "classifier", "--devices", "0,1,0"], "a card is listed twice"),
    (["--models", "classifier", "--gpus", "0"], "--gpus: 0 is not an integer >= 1"),
    (["--models", "classifier", "--devices", "0,1", "--gpus-per-job", "3"], "GPUS_PER_JOB: 3 is more than the 2 card"),
    (["--models", "classifier", "--devices", "0", "--gpus-per-job", "0"], "--gpus-per-job: 0 is not an integer >= 1"),
    (["--models", "classifier", "--devices", "0", "--gpus", "1"], "not both"),
    (["--models", "classifier"], "give DEVICES=0,1,... or GPUS=N"),
    (["--models", "classifier", "--devices", "0", "--address", "h:6379"], "on a Ray cluster give GPUS"),
    (["--models", "classifier", "--gpus", "1", "--gpus-per-job", "2", "--address", "h:6379"], "2 is more than GPUS=1"),
    (["--models", "classifier", "--devices", "0,1", "--set", "gpus=3"], "GPUS_PER_JOB: 3 is more than the 2 card"),
    (["--models", "classifier", "--devices", "0,1", "--gpus-per-job", "2", "--set", "gpus=1"],
     "GPUS_PER_JOB: 2, but SET has gpus=1"),
    (["--models", "classifier", "--devices", "0,1", "--set", "gpus=two"], "SET: gpus=two is not a whole number"),
])
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([*args, "--data", "d", "--folds", str(tmp_path / "folds.csv"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cards_never_shared_failure_reported_rerun_skips(tmp_path: Path, stand_in: list[str]) -> None:
    """6 jobs of unequal length on cards 3 and 5; yolo fold 1 fails: reported with its log, the others
    finish, classifier is merged and yolo not; a re-run only runs yolo fold 1, then merges yolo."""
    run = tmp_path / "run"
    first = schedule(tmp_path, *stand_in, "--models", "classifier", "yolo", "--devices", "3,5",
                     "--set", "sleep=1.5", "fail=yolo:1", env={"OMP_NUM_THREADS": "3"})
    assert first.returncode == 1, first.stdout + first.stderr
    out = first.stdout
    assert "FAILED yolo fold 1 train (exit 1)" in out and "log run/logs/yolo_fold1_train.log" in out
    assert "yolo fold 1: stand-in failure" in out  # the log's last lines
    assert "merged classifier" in out and "not merged: yolo" in out and "jobs: 6 done, 0 running, 0 waiting" in out

    jobs = jobs_table(run)
    assert len(jobs) == 6 + 5 + 1  # 6 trains, 5 predicts (not after the failed train), classifier's merge
    failed = jobs[jobs["exit_code"] != 0]
    assert failed[["model", "fold", "verb"]].values.tolist() == [["yolo", "1", "train"]]
    assert all((tmp_path / log).is_file() for log in jobs["log"])
    spans = assert_one_job_per_card(jobs)
    assert sorted(spans) == ["3", "5"]
    # No card idles while jobs wait: both start together (give or take a Ray worker's start-up) and the
    # next job follows the last at once (jobs last 1.5-4.5 s; measured gaps: 0.01 s).
    first_start = jobs["start"].min()
    for card, s in spans.items():
        assert (s[0][0] - first_start).total_seconds() < 5, f"card {card} started late"
        gaps = [(nxt[0] - prev[1]).total_seconds() for prev, nxt in itertools.pairwise(s)]
        assert max(gaps) < 2, f"card {card} idle between jobs: {gaps}"
    trace = pd.read_csv(run / "trace.txt", sep="|", names=["model", "fold", "verb", "cards", "threads", "cores"],
                        dtype=str)
    trace = trace[trace["verb"] != "merge"]  # merge runs in the scheduler's own process, on no card
    assert set(trace["cards"]) == {"3", "5"} and set(trace["threads"]) == {"3"}  # not Ray's OMP_NUM_THREADS=1
    # Each card's jobs run on their own share of the cores (here: half of them each).
    cores = {card: set(group["cores"]) for card, group in trace.groupby("cards")}
    assert all(len(c) == 1 for c in cores.values()), cores
    three, five = ({int(c) for c in cores[card].pop().split()} for card in ("3", "5"))
    assert three | five <= os.sched_getaffinity(0) and (not three & five or len(os.sched_getaffinity(0)) < 2)

    again = schedule(tmp_path, *stand_in, "--models", "classifier", "yolo", "--devices", "3,5", "--set", "sleep=0.1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("skipped (finished): classifier fold 0, classifier fold 1, classifier fold 2, yolo fold 0, yolo fold 2"
            in again.stdout), again.stdout
    new = jobs_table(run).iloc[len(jobs):]
    assert new[["model", "fold", "verb", "exit_code"]].values.tolist() == [
        ["yolo", "1", "train", 0], ["yolo", "1", "predict", 0], ["yolo", "", "merge", 0]]
    assert (run / "yolo" / "oof.csv").is_file()

    done = schedule(tmp_path, *stand_in, "--models", "classifier", "yolo", "--devices", "3,5")
    assert done.returncode == 0 and "job(s)" not in done.stdout and len(jobs_table(run)) == len(jobs) + 3


def test_several_cards_per_job(tmp_path: Path, stand_in: list[str]) -> None:
    """GPUS_PER_JOB=2 on 4 cards: two jobs at once, each sees its own two cards, is told gpus=2 (the
    adapter's multi-GPU path) and runs on their cores with as many threads."""
    result = schedule(tmp_path, *stand_in, "--models", "effdet", "classifier", "--gpus", "4", "--gpus-per-job", "2",
                      "--set", "sleep=0.5", env={"OMP_NUM_THREADS": None})
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = jobs_table(tmp_path / "run")
    assert (jobs["exit_code"] == 0).all()
    work = jobs[jobs["verb"] != "merge"]
    assert all(len(set(c.split(","))) == 2 and set(c.split(",")) <= {"0", "1", "2", "3"} for c in work["cards"])
    assert all("--set sleep=0.5 gpus=2" in (tmp_path / log).read_text().splitlines()[0] for log in jobs["log"])
    assert_one_job_per_card(jobs)
    trace = pd.read_csv(tmp_path / "run" / "trace.txt", sep="|", names=["model", "fold", "verb", "cards", "threads",
                                                                         "cores"], dtype=str)
    work = trace[trace["verb"] != "merge"]
    assert (work["threads"] == work["cores"].str.split().str.len().astype(str)).all(), work


def test_existing_cluster(tmp_path: Path, stand_in: list[str]) -> None:
    """RAY_ADDRESS: the jobs run on a Ray cluster started with `ray start` (here one node on loopback
    with 2 logical GPUs; its own temp dir, so no other Ray user sees it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **LOCAL_RAY_ENV}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-gpus=2", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not Path(temp, "ray_current_cluster").is_file():  # written once the head is up
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        result = schedule(tmp_path, *stand_in, "--models", "classifier", "--address", f"127.0.0.1:{port}",
                          "--gpus", "2", "--set", "sleep=0.3")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 job(s) on the Ray cluster at 127.0.0.1" in result.stdout
        jobs = jobs_table(tmp_path / "run")
        assert (jobs["exit_code"] == 0).all() and set(jobs["host"]) == {socket.gethostname()}
        assert set(jobs.loc[jobs["verb"] != "merge", "cards"]) <= {"0", "1"}
        assert_one_job_per_card(jobs)
        too_many = schedule(tmp_path, *stand_in, "--models", "yolo", "--address", f"127.0.0.1:{port}", "--gpus", "3")
        assert too_many.returncode == 2 and "has 2 GPU(s), fewer than GPUS=3" in too_many.stderr, too_many.stderr
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head stops its own processes
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_make_routes_oof_and_all_oof_through_the_scheduler() -> None:
    """With DEVICES/GPUS/RAY_ADDRESS, `make oof` and `make all-oof` are one scheduler call (all-oof: every
    model in it); without them the Makefile runs the folds itself as before."""
    def dry(*args: str) -> str:
        done = subprocess.run(["make", "-n", *args, "NAME=scheduler-dry-run", "N_FOLDS=3", "-o", ".venv/.installed"],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        return done.stdout

    oof = dry("oof", "MODEL=classifier", "DEVICES=0,1", "SET=epochs=1")
    assert "-m models.scheduler --data data/demo --folds folds/scheduler-dry-run.csv --profile demo " \
           "--run-dir runs/scheduler-dry-run --set epochs=1 --devices 0,1 --models classifier" in oof, oof
    every = dry("all-oof", "GPUS=8", "GPUS_PER_JOB=2", "RAY_ADDRESS=node1:6379", "EXCLUDE=detectron")
    assert "--gpus 8 --gpus-per-job 2 --address node1:6379 --models yolo effdet classifier" in every, every
    plain = dry("oof", "MODEL=classifier", "DEVICE=1")
    assert "models.scheduler" not in plain and "CUDA_VISIBLE_DEVICES=1 .venv/bin/python -m models classifier train" in plain


@pytest.mark.slow
def test_classifier_on_two_cards(tmp_path: Path, figures) -> None:
    """The real adapter: the classifier's demo profile, one epoch at 64 px, every fold of a 2-fold file of
    24 images on cards 0 and 1 (the two trainings side by side), then merge; a re-run skips every fold and
    the merge. Scheduling is what is tested, so the data is small (the 150 images of the model tests took
    30 s more)."""
    data = generate(SynthConfig(out=str(tmp_path / "data"), n_train=24, n_test=6, size=128, seed=3))
    run = tmp_path / "run"
    folds = tmp_path / "folds_2.csv"
    write_table(make_folds(DataFolder(data).labels, n_folds=2, seed=0), folds)
    args = ["--models", "classifier", "--data", str(data), "--folds", str(folds), "--run-dir", str(run),
            "--devices", "0,1", "--set", "epochs=1", "imgsz=64"]
    start = time.time()
    result = schedule(REPO, *args)
    seconds = time.time() - start
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = jobs_table(run)
    pairs = [tuple(r) for r in jobs[["fold", "verb"]].values.tolist()]
    assert sorted(pairs[:-1]) == [(str(k), v) for k in range(2) for v in ("predict", "train")] and pairs[-1] == ("", "merge")
    assert (jobs["exit_code"] == 0).all() and set(jobs.loc[jobs["verb"] != "merge", "cards"]) == {"0", "1"}
    assert_one_job_per_card(jobs)
    oof = pd.read_csv(run / "classifier" / "oof.csv")
    assert len(oof) == pd.read_csv(folds)["image_id"].nunique() and oof["p_abnormal"].between(0, 1).all()
    figures(f"scheduler: classifier demo, 1 epoch at 64 px, 2 folds on 2 slots + merge: {seconds:.0f} s")

    again = schedule(REPO, *args)
    assert again.returncode == 0 and "skipped (finished): classifier fold 0, classifier fold 1" \
        in again.stdout and len(jobs_table(run)) == len(jobs)
