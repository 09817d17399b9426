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
import re
import shutil
import signal
import socket
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
from models.scheduler import JOB_COLUMNS, LOCAL_RAY_ENV, job_env, main

REPO = Path(__file__).resolve().parents[1]

# The adapter's command line (python -m models MODEL VERB --run-dir R [--set K=V ...] [--fold K]):
# train sleeps SLEEP x 1, 2 or 3 by fold and model in checkpointed 0.25 s steps (RUN/steps.txt) and fails for
# --set fail=MODEL:FOLD; predict writes the fold's oof.csv (not for --set nooof=MODEL:FOLD), merge the model's;
# each run appends its cards, threads and CPU cores to RUN/trace.txt and the probed variables to RUN/env.txt.
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
node = os.environ.get("TEST_NODE_NAME", "")  # set by the multi-node test's `ray start` of each node
with open(run / "env.txt", "a") as f:
    f.write("|".join([model, str(fold), verb, node] + [os.environ.get(k, "") for k in ENV_PROBES]) + "\\n")
if verb == "train":  # 0.25 s steps, each one checkpointed: a retried job resumes from the last
    ckpt = run / model / f"fold{fold}" / "ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    step = int(ckpt.read_text()) if ckpt.is_file() else 0
    if step:
        print(f"resuming from step {step}", flush=True)
    steps = round(float(sets.get("sleep", "0.2")) * (1 + (fold + len(model)) % 3) / 0.25)
    while step < steps:
        time.sleep(0.25)
        step += 1
        ckpt.write_text(str(step))
        with open(run / "steps.txt", "a") as f:
            f.write(f"{model}|{fold}|{node}|{step}|{time.time()}\\n")
    if sets.get("fail") == f"{model}:{fold}":
        sys.exit(f"{model} fold {fold}: stand-in failure")
elif verb == "predict" and sets.get("nooof") != f"{model}:{fold}":  # nooof: exit 0 and write nothing
    (run / model / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    (run / model / f"fold{fold}" / "oof.csv").write_text("image_id\\n")
elif verb == "merge":
    (run / model / "oof.csv").write_text("image_id\\n")
print(verb, model, fold, "done")
cores = " ".join(map(str, sorted(os.sched_getaffinity(0))))
with open(run / "trace.txt", "a") as f:
    f.write(f"{model}|{fold}|{verb}|{os.environ.get('CUDA_VISIBLE_DEVICES')}|{os.environ.get('OMP_NUM_THREADS')}|{cores}\\n")
'''
ENV_PROBES = ["YOLO_OFFLINE", "HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "CXR_PROBE"]


def schedule(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m models.scheduler ARGS`` in ``cwd`` with a local Ray kept on loopback; ``env``: variables
    to set (None: to unset)."""
    env = {**os.environ, **LOCAL_RAY_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "models.scheduler", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, env={k: v for k, v in env.items() if v is not None})


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    """Scheduler arguments for the stand-in adapter on a 3-fold file, run dir ``tmp_path/run``."""
    (tmp_path / "adapter.py").write_text(f"ENV_PROBES = {ENV_PROBES!r}\n" + STAND_IN)
    (tmp_path / "folds.csv").write_text("image_id,fold\na,0\nb,1\nc,2\n")
    return ["--data", "data", "--folds", "folds.csv", "--run-dir", "run", "--adapter", f"{sys.executable} adapter.py"]


def jobs_table(run: Path) -> pd.DataFrame:
    jobs = pd.read_csv(run / "jobs.csv", dtype={"cards": str, "fold": str, "attempt": str}, keep_default_na=False)
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
    (["--models", "classifier", "--devices", "0", "--retries", "-1"], "RETRIES: must be 0 or more, got -1"),
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
    assert "FAILED yolo fold 1 train (exit 1)" in out and "log run/logs/yolo_fold1_train.1.log" in out
    assert "yolo fold 1: stand-in failure" in out  # the log's last lines
    assert "merged classifier" in out and "not merged: yolo" in out
    assert "jobs: 5 done, 1 failed, 0 running, 0 waiting" in out, out

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
    # the retry is attempt 2 of yolo fold 1, in its own logs; attempt 1's log still shows the failure
    assert new["attempt"].tolist()[:2] == ["2", "2"] and new["log"].iloc[0] == "run/logs/yolo_fold1_train.2.log"
    assert "stand-in failure" in (run / "logs" / "yolo_fold1_train.1.log").read_text()
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_lost_node_retried_same_environment_no_silent_success(tmp_path: Path, stand_in: list[str]) -> None:
    """A Ray cluster of two nodes on this machine, made with the README's commands (`ray start --head`, then
    `ray start --address` as a second node), each with 2 logical GPUs and an environment WITHOUT the offline
    switches. 6 jobs spread over both nodes and see the driver's variables (Ray's runtime_env). The second
    node is killed mid-run (its process group, SIGKILL): its jobs are retried on the head, resume from their
    checkpoints, and every fold is trained and merged without a re-run; the lost attempts are jobs.csv rows
    with host, node, cards and start; no training goes on on the dead node; Ray's state dumps stay out of
    the console. Then on the one node left, GPUS=4 runs with a warning, and a fold whose job exits 0 without
    its oof.csv is named, exit 1."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths <= 107 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if k not in {*ENV_PROBES, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}}
    # a lost node is noticed in ~4 s instead of ~15-30 (the head's health checks)
    base.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0",
                 "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                 "RAY_health_check_failure_threshold": "8", "RAY_health_check_initial_delay_ms": "0"})
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-gpus=2", "--num-cpus=2", "--disable-usage-stats"]
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", *common], env={**base, "TEST_NODE_NAME": "head"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not Path(temp, "ray_current_cluster").is_file():  # written once the head is up
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        second = subprocess.Popen([ray_bin, "start", f"--address={address}", *common],
                                  env={**base, "TEST_NODE_NAME": "second"}, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-c", "import ray, time; ray.init(address='" + address + "', "
                        "logging_level='ERROR'); [time.sleep(0.2) for _ in range(600) "
                        "if ray.cluster_resources().get('GPU', 0) < 4]"], env=base, timeout=150, check=True)

        env = {"YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "CXR_PROBE": "probe"}
        driver = subprocess.Popen([sys.executable, "-m", "models.scheduler", *stand_in, "--models", "classifier", "yolo",
                                   "--address", address, "--gpus", "4", "--set", "sleep=1.5"], cwd=tmp_path,
                                  env={**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
                                       **LOCAL_RAY_ENV, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        steps = tmp_path / "run" / "steps.txt"
        deadline = time.time() + 120
        while not (steps.is_file() and any(line.split("|")[2] == "second" and int(line.split("|")[3]) >= 2
                                           for line in steps.read_text().splitlines())):
            assert driver.poll() is None and time.time() < deadline, "no job reached step 2 on the second node"
            time.sleep(0.1)
        killed = kill_node(second.pid)
        out, err = driver.communicate(timeout=300)
        check_lost_node_run(tmp_path, out, err, driver.returncode, env, killed)

        # One node left: GPUS=4 goes on with a warning; a job that exits 0 without its oof.csv fails the run.
        missing = schedule(tmp_path, *stand_in[:5], "run2", *stand_in[6:], "--models", "classifier",
                           "--address", address, "--gpus", "4", "--set", "sleep=0.1", "nooof=classifier:1")
    finally:
        for node in (second, head):
            if node is not None and node.poll() is None:
                node.send_signal(signal.SIGTERM)  # --block: the node stops its own processes
                node.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "has 2 GPU(s), fewer than GPUS=4: the jobs run on those 2" in missing.stderr, missing.stderr
    assert f"MISSING classifier fold 1: its job exited 0 on {socket.gethostname()}" in missing.stdout, missing.stdout
    assert "not merged: classifier" in missing.stdout and not (tmp_path / "run2" / "classifier" / "oof.csv").exists()


def kill_node(session: int) -> float:
    """SIGKILL every process of the Ray node started as session leader ``session`` (``ray start``, its
    raylet, its Ray workers: they run in process groups of their own) except the jobs' own processes, which
    must die with their worker; return the time."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            if proc.name.isdigit() and int(stat.rpartition(")")[2].split()[3]) == session \
                    and b"adapter.py" not in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile
            pass
    return time.time()


def check_lost_node_run(tmp_path: Path, out: str, err: str, code: int, env: dict, killed: float) -> None:
    """The two-node run whose second node was killed at ``killed`` (see the test above)."""
    assert code == 0, out + err
    run = tmp_path / "run"
    assert (run / "classifier" / "oof.csv").is_file() and (run / "yolo" / "oof.csv").is_file()
    jobs = jobs_table(run)
    lost = jobs[jobs["exit_code"] == -1]
    assert len(lost) >= 1 and (lost["verb"] == "train").all(), jobs
    assert (lost["host"] != "").all() and (lost["node"] != "").all() and (lost["cards"] != "").all(), lost
    assert lost["start"].notna().all()
    assert jobs["node"].replace("", None).dropna().nunique() == 2, jobs  # both nodes ran jobs
    for _, row in lost.iterrows():  # the retry: a later attempt of the same job, on the other node, resumed
        retry = jobs[(jobs["model"] == row["model"]) & (jobs["fold"] == row["fold"]) & (jobs["verb"] == "train")
                     & (pd.to_numeric(jobs["attempt"]) > int(row["attempt"]))]
        assert len(retry) == 1 and retry["exit_code"].iloc[0] == 0 and retry["node"].iloc[0] != row["node"], jobs
        assert "resuming from step" in (tmp_path / retry["log"].iloc[0]).read_text()
        assert f"{row['model']} fold {row['fold']}: attempt {row['attempt']} on" in out, out
    # nothing trained on on the dead node once the retry began (a job's processes die with their Ray worker)
    retried = jobs[(jobs["node"] != "") & (jobs["verb"] == "train") & (pd.to_numeric(jobs["attempt"]) > 1)]
    first_retry = retried["start"].min().timestamp()
    last_step = max(float(line.split("|")[4]) for line in (run / "steps.txt").read_text().splitlines()
                    if line.split("|")[2] == "second")
    assert last_step < min(first_retry, killed + 1), f"the dead node trained on {last_step - killed:.1f} s after the kill"
    probes = pd.read_csv(run / "env.txt", sep="|", names=["model", "fold", "verb", "node", *ENV_PROBES], dtype=str,
                         keep_default_na=False)
    jobs_env = probes[probes["verb"] != "merge"]
    assert set(jobs_env["node"]) == {"head", "second"}, probes
    assert (jobs_env[ENV_PROBES] == pd.Series(env)).all().all(), jobs_env
    assert "(raylet)" not in out + err and "marked dead" not in out + err, out + err
    assert "marked dead" in (run / "logs" / "ray.log").read_text()  # Ray's own account, kept
    # CPU share on a cluster node: the node's cores over its 2 cards, as many threads, said in the log header
    trace = pd.read_csv(run / "trace.txt", sep="|", names=["model", "fold", "verb", "cards", "threads", "cores"], dtype=str)
    work = trace[trace["verb"] != "merge"]
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert (work["cores"].str.split().str.len() == share).all() and (work["threads"] == str(share)).all(), work
    header = (tmp_path / jobs.loc[jobs["verb"] == "train", "log"].iloc[0]).read_text().splitlines()[0]
    assert "its share of this node's" in header and "over 2 card(s)" in header, header
    assert "jobs: 6 done, 0 failed, 0 running, 0 waiting" in out, out


def test_interrupted_run_keeps_its_rows(tmp_path: Path, stand_in: list[str]) -> None:
    """Ctrl-C while jobs run: exit 130, and each stopped job is a jobs.csv row (exit 130, host, cards, start, its
    log); a re-run resumes them from their checkpoints as attempt 2."""
    driver = subprocess.Popen([sys.executable, "-m", "models.scheduler", *stand_in, "--models", "effdet",
                               "--devices", "0,1", "--set", "sleep=3"], cwd=tmp_path,
                              env={**os.environ, **LOCAL_RAY_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps, deadline = tmp_path / "run" / "steps.txt", time.time() + 120
    while not (steps.is_file() and len(steps.read_text().splitlines()) >= 2):
        assert driver.poll() is None and time.time() < deadline, "no job started"
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "interrupted: running jobs stopped" in err, out + err
    jobs = jobs_table(tmp_path / "run")
    stopped = jobs[jobs["exit_code"] == 130]
    assert len(stopped) >= 1 and (stopped["host"] == socket.gethostname()).all() and (stopped["cards"] != "").all()
    assert all((tmp_path / log).is_file() for log in stopped["log"]), stopped
    again = schedule(tmp_path, *stand_in, "--models", "effdet", "--devices", "0,1", "--set", "sleep=3")
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = jobs_table(tmp_path / "run").iloc[len(jobs):]
    # a job stopped after its predict wrote oof.csv is finished (the re-run reuses it): only the stopped
    # trainings must resume; sleep=3 keeps both first folds training well past the interrupt
    stopped = stopped[stopped["verb"] == "train"]
    assert len(stopped) >= 1, jobs
    for _, row in stopped.iterrows():
        train = resumed[(resumed["fold"] == row["fold"]) & (resumed["verb"] == "train")]
        assert train["attempt"].tolist() == ["2"] and "resuming from step" in (tmp_path / train["log"].iloc[0]).read_text()


def test_jobs_get_what_the_makefile_exports() -> None:
    """Every variable the Makefile exports reaches the jobs on every node (the scheduler's runtime_env), even
    where the driver's environment lacks it (the offline defaults)."""
    exported = re.findall(r"^export (\w+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert exported
    saved = {k: os.environ.pop(k) for k in exported if k in os.environ}
    try:
        assert set(exported) <= set(job_env()), set(exported) - set(job_env())
    finally:
        os.environ.update(saved)


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
