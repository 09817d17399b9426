"""Every model x fold job on a set of cards or a Ray cluster, then ``merge``: ``python -m models.scheduler``.

What ``make oof``, ``make all-oof`` and ``make pipeline`` run when ``DEVICES``, ``GPUS`` or
``RAY_ADDRESS`` is given (without them the Makefile runs the folds itself, as before)::

    python -m models.scheduler --models yolo classifier --data D --folds F --run-dir R [--profile P]
        [--set K=V ...] [--fold-fusion K=V ...] [--devices 0,1,2,3 | --gpus N] [--gpus-per-job G]
        [--address host:port] [--retries N]

Contract:

- A job is one fold of one model: ``python -m models MODEL train --fold K ...``, then ``predict``
  (the Makefile's fold rule), run as one Ray task that holds G cards (``--gpus-per-job``, default 1)
  from start to end. Ray
  gives a card to one job at a time and starts a waiting job as soon as ``G`` cards are free; all
  jobs of all models are submitted at once, so 20 jobs keep 8 cards busy. A job sees exactly its
  cards through ``CUDA_VISIBLE_DEVICES``; with G > 1 its verbs get ``--set gpus=G``, the adapter's own
  multi-GPU path over those cards (SET's ``gpus=G`` alone sets G too).
- Local (no ``--address``): a private Ray instance on loopback (nothing leaves the machine) with one
  logical GPU per card of ``--devices`` (``--gpus N``: cards 0..N-1); Ray's logical GPU i is the
  i-th card of that list. On a machine without GPUs the cards are just slots, which is how the tests
  run it.
- ``--address host:port``: the same jobs on an existing Ray cluster (``ray start`` on every node).
  Every node needs the repo checkout at the same path, the same venv, and DATA, the fold file and the
  run dir on a shared filesystem. A cluster with fewer cards than ``--gpus`` runs on what it has, with
  a warning.
- Every job gets this process's settings on every node (Ray's runtime_env: ``JOB_ENV``), and runs on
  its cards' share of its node's CPU cores (the node's cores split evenly over its cards) with
  ``OMP_NUM_THREADS`` = their number unless it is set.
- ``--models`` takes members (``yolo``, ``yolo@s640``: ``models/members.py``); a variant's jobs get
  ``--variant``. Before any job, each member's ``check`` verb compares its trained folds' saved
  settings and inputs with what is asked (``--force``: clears the ones that differ), as ``make oof``
  does; a difference stops the run with its one line, exit 2.
- A fold whose ``oof.csv`` exists and is not older than the fold file is finished and skipped; a
  model is merged when all its folds are finished and its ``oof.csv`` is missing or older than one
  of theirs (the Makefile's rules). The checks, and the merges after the jobs, run on this host one per
  core at once.
- Faults: a job whose node or Ray worker dies is retried by Ray (``--retries``, default 2) on any free
  cards and resumes from the fold's last checkpoint; its processes die with their worker. A job whose
  verb exits non-zero is reported with its log (path and last lines) and not retried; the other jobs go
  on; a model with a failed fold is not merged, and the exit code is then 1. After the jobs, every
  fold output the merge needs must be visible here: a missing or stale one is named with the host that
  ran it, exit 1. Bad input is one ``error: ...`` line, exit 2.
- Evidence: attempt N of a job logs each verb to ``RUN/logs/MODEL_foldK_VERB.N.log`` and is rows of
  ``RUN/jobs.csv`` (``JOB_COLUMNS``), written atomically as each job ends; a lost attempt's rows have
  exit code -1 and where it ran, Ctrl-C's 130; the rows of earlier runs are kept. Ray's own messages go to
  ``RUN/logs/ray.log``. Progress lines show jobs done / failed / running / waiting with an ETA from
  the mean job time.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pandas as pd

from cxr.args import Parser, positive_int
from cxr.data import read_folds
from cxr.io import DataError, one_line_errors, read_table, write_json, write_table
from models import MODELS, OFFLINE_ENV
from models.members import Member, parse_member

T, R = TypeVar("T"), TypeVar("R")

JOB_COLUMNS = ["model", "fold", "verb", "attempt", "cards", "host", "node", "start", "end", "exit_code", "log"]
LOST, INTERRUPTED = -1, 130  # exit_code of a verb whose node or Ray worker died / that Ctrl-C stopped
# The local Ray instance stays on this machine: loopback as its address (without it Ray asks a
# public DNS address for its own IP), no usage report, no auth token to set up, and no memory
# monitor killing a large training job (memory is the kernel's business, as without the scheduler).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
# What every job gets from this (the driver's) environment on every node, through Ray's runtime_env: a
# node's own environment is whatever its `ray start` had. The offline switches (their defaults when unset),
# thread, cache and NCCL settings, and any CXR_* variable. OMP_NUM_THREADS travels as run_job's argument
# (Ray's workers set it to 1 themselves).
JOB_ENV = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_HOME", "HF_HOME", "YOLO_CONFIG_DIR",
           "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")
JOB_ENV_PREFIXES = ("CXR_", "NCCL_", "GLOO_")
RETRIES = 2  # attempts after the first of a job whose node or Ray worker died (--retries)
PROGRESS_EVERY = 60.0  # seconds between progress lines while no job finishes
TAIL_LINES = 15  # of a failed job's log, printed with its path


def now() -> str:
    return datetime.now().isoformat(sep=" ", timespec="milliseconds")


def job_env() -> dict[str, str]:
    """The variables each job gets on every node (see JOB_ENV)."""
    env = {k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}
    env.update({k: v for k, v in os.environ.items() if k in JOB_ENV or k.startswith(JOB_ENV_PREFIXES)})
    return env


def _child_setup(cores: list[int] | None) -> Callable[[], None]:
    """The job process's start (subprocess ``preexec_fn``): its cards' cores, and death with its Ray worker
    (Linux PR_SET_PDEATHSIG), so a lost worker leaves no training behind to write into the fold a retry owns.
    libc is looked up here, in the parent, so the child only makes two system calls."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if cores:
            os.sched_setaffinity(0, cores)
    return setup


def run_step(argv: list[str], log: str, cwd: str, env: dict | None = None, where: str = "",
             cores: list[int] | None = None) -> int:
    """Run one verb's command in ``cwd`` with its output in ``cwd/log`` (``where``: the header's note on
    cards and cores, ``cores``: the CPU cores it may use); return its exit code."""
    path = Path(cwd, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {now()} on {socket.gethostname()}{where}: {shlex.join(argv)}\n")
        f.flush()
        return subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False,
                              preexec_fn=_child_setup(cores)).returncode


def attempt_record(cwd: str | Path, base: str, n: int) -> Path:
    """``RUN/logs/MODEL_foldK.N.json`` (``base`` = ``RUN/logs/MODEL_foldK``, under ``cwd``): where attempt N of a
    job ran and its verbs (jobs.csv's evidence)."""
    return Path(cwd, f"{base}.{n}.json")


def node_cards() -> int:
    """GPUs of the Ray node this task runs on (the cluster's table of nodes)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    return next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == me), 0)


def run_job(steps: list[tuple[str, list[str]]], base: str, first: int, cwd: str, card_names: list[str] | None,
            threads: str | None) -> dict:
    """One attempt of one job inside its Ray task: run each ``(verb, argv)`` in turn on this task's cards,
    stop at the first failure; return the attempt's record.

    The attempt is the first free number N from ``first``: its verbs log to ``BASE_VERB.N.log`` and its record
    ``BASE.N.json`` (host, node, cards, each verb's start, end and exit code) is written before each verb and
    after it, on the shared run dir, so an attempt whose node dies still says where it ran and since when.
    CPU share: the cores of this process (its node's) split evenly over the node's cards (``card_names``
    locally; Ray's table of nodes on a cluster); the job runs on its cards' share with OMP_NUM_THREADS =
    its size, which the adapters' loader workers follow too. ``threads``: the user's OMP_NUM_THREADS, which wins.
    """
    import ray

    ctx = ray.get_runtime_context()
    ids = ctx.get_accelerator_ids()["GPU"]
    cards = ",".join(card_names[int(i)] for i in ids) if card_names else ",".join(ids)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": cards}
    env.pop("OMP_NUM_THREADS", None)  # Ray's worker sets 1, which would starve a CPU job
    where, cores = f", CUDA_VISIBLE_DEVICES={cards}", None
    n_cards = len(card_names) if card_names else node_cards()
    shares = split_cores(max(n_cards, 1))
    if shares is not None:
        slot = [int(i) % len(shares) if str(i).isdigit() else 0 for i in ids]
        cores = sorted({c for i in slot for c in shares[i]})
        env["OMP_NUM_THREADS"] = str(len(cores))
        where += (f", cores {','.join(map(str, cores))} (its share of this node's {len(os.sched_getaffinity(0))} "
                  f"core(s) over {n_cards} card(s))")
    if threads:
        env["OMP_NUM_THREADS"] = threads
    n = first
    while True:  # exclusive creation: an attempt never takes an earlier one's number, logs or record
        try:
            attempt_record(cwd, base, n).parent.mkdir(parents=True, exist_ok=True)
            attempt_record(cwd, base, n).open("x").close()
            break
        except FileExistsError:
            n += 1
    record = {"attempt": n, "cards": cards, "host": socket.gethostname(), "node": ctx.get_node_id()[:8], "verbs": []}
    for verb, argv in steps:
        log = f"{base}_{verb}.{n}.log"
        record["verbs"].append({"verb": verb, "start": now(), "end": "", "exit_code": "", "log": log})
        write_json(record, attempt_record(cwd, base, n))
        code = run_step(argv, log, cwd, env, where, cores)
        record["verbs"][-1].update(end=now(), exit_code=code)
        write_json(record, attempt_record(cwd, base, n))
        if code:
            break
    return record


def split_cores(n_cards: int) -> list[list[int]] | None:
    """The CPU cores of each local card's jobs: this process's cores split evenly over the cards (one
    core each, round robin, when there are fewer cores than cards); None where affinity is unknown."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores)
    if n < n_cards:
        return [[cores[i % n]] for i in range(n_cards)]
    return [cores[i * n // n_cards:(i + 1) * n // n_cards] for i in range(n_cards)]


def cards_per_job(per_job: int | None, sets: list[str]) -> tuple[int, list[str]]:
    """Cards per job and the ``--set`` pairs of its verbs. A job on G > 1 cards runs the adapter's own
    multi-GPU path, which its config's ``gpus`` turns on: GPUS_PER_JOB=G adds ``gpus=G``, SET's
    ``gpus=G`` alone sets GPUS_PER_JOB, and the two must agree."""
    given = [value for key, _, value in (pair.partition("=") for pair in sets) if key == "gpus"]
    if not given:
        n = 1 if per_job is None else per_job
        return n, [*sets, f"gpus={n}"] if n > 1 else sets
    try:
        n = int(given[-1])
    except ValueError:
        raise DataError("SET", f"gpus={given[-1]} is not a whole number") from None
    if per_job is not None and per_job != n:
        raise DataError("GPUS_PER_JOB", f"{per_job}, but SET has gpus={n}: give one of them")
    return n, sets


def parse_cards(devices: str | None, gpus: int | None, per_job: int, cluster: bool) -> list[str] | None:
    """The local cards (``--devices`` or ``--gpus``), None on a cluster; DataError on bad input."""
    if per_job < 1:
        raise DataError("GPUS_PER_JOB", f"must be at least 1, got {per_job}")
    if gpus is not None and gpus < 1:
        raise DataError("GPUS", f"must be at least 1, got {gpus}")
    if devices is not None and gpus is not None:
        raise DataError("DEVICES", "give DEVICES (the cards) or GPUS (how many), not both")
    if cluster:
        if gpus is not None and per_job > gpus:
            raise DataError("GPUS_PER_JOB", f"{per_job} is more than GPUS={gpus}")
        if devices is not None:
            raise DataError("DEVICES", "names this machine's cards; on a Ray cluster give GPUS (how many cards)")
        return None
    if devices is not None:
        cards = [c.strip() for c in devices.split(",")]
        if not devices.strip() or any(not c for c in cards):
            raise DataError("DEVICES", f"expected card ids like 0,1,2,3, got {devices!r}")
        if len(set(cards)) < len(cards):
            raise DataError("DEVICES", f"a card is listed twice in {devices!r}")
    elif gpus is not None:
        cards = [str(i) for i in range(gpus)]
    else:
        raise DataError("DEVICES", "give DEVICES=0,1,... or GPUS=N (or RAY_ADDRESS for a cluster)")
    if per_job > len(cards):
        raise DataError("GPUS_PER_JOB", f"{per_job} is more than the {len(cards)} card(s) in {','.join(cards)}")
    return cards


def ray_messages_to(log: Path) -> None:
    """Ray's driver prints the cluster's error messages (a lost node's state dump: some 40 lines per job)
    straight to the console, whatever ``log_to_driver`` says; they go to ``log`` instead, and the scheduler
    prints its own line per lost attempt. (Ray has no switch for this: its printing function is replaced;
    where a Ray version has none of that name the messages stay in the console.)"""
    import ray._private.worker as ray_worker

    if not hasattr(ray_worker, "print_to_stdstream"):
        return
    log.parent.mkdir(parents=True, exist_ok=True)

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        with open(log, "a") as f:
            f.write(f"# {now()}\n" + "".join(f"{line}\n" for line in data.get("lines", [])))
    ray_worker.print_to_stdstream = to_log


def start_ray(cards: list[str] | None, address: str | None, gpus: int | None, per_job: int) -> int:
    """Start the local Ray instance (``cards``) or join the cluster at ``address``; return how many
    jobs can run at once. Every job of this driver gets :func:`job_env` (Ray's job-level runtime_env).
    A cluster with fewer cards than ``gpus`` (a node lost since the last run) runs on what it has, with a
    warning; one without ``per_job`` cards on any count stops with one line."""
    import ray

    runtime_env = {"env_vars": job_env()}
    if address is None:
        os.environ.update(LOCAL_RAY_ENV)
        # Ray's logical GPU i must be cards[i], not the i-th id of an inherited list.
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        slots = len(cards) // per_job
        # address="local": a new instance, never the cluster of RAY_ADDRESS or of an earlier `ray start`.
        # num_cpus: one worker process per running job (the jobs ask for cards only).
        ray.init(address="local", num_cpus=slots, num_gpus=len(cards), include_dashboard=False,
                 object_store_memory=100 * 2**20, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env=runtime_env)
        return slots
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=runtime_env)
    total = int(ray.cluster_resources().get("GPU", 0))
    if total < per_job:
        ray.shutdown()
        raise DataError("RAY_ADDRESS",
                        f"the cluster at {address} has {total} GPU(s), fewer than GPUS_PER_JOB={per_job}")
    if gpus and total < gpus:
        print(f"warning: the cluster at {address} has {total} GPU(s), fewer than GPUS={gpus}: the jobs run on "
              f"those {total}", file=sys.stderr, flush=True)
    return min(gpus or total, total) // per_job


def fold_oof(run: Path, model: str, fold: int) -> Path:
    """``RUN/MEMBER/foldK/oof.csv`` (``model``: a member's folder name, ``yolo`` or ``yolo@s640``)."""
    return run / model / f"fold{fold}" / "oof.csv"


def member_args(name: str) -> list[str]:
    """The adapter's words for member ``name``: ``[family]`` or ``[family, ..., "--variant", v]`` (see jobs)."""
    m = parse_member(name, "--models")
    return [m.family, *(["--variant", m.variant] if m.variant else [])]


def finished(run: Path, model: str, fold: int, folds_file: Path) -> bool:
    """The Makefile's rule: the fold's oof.csv exists and is not older than the fold file."""
    oof = fold_oof(run, model, fold)
    return oof.is_file() and oof.stat().st_mtime >= folds_file.stat().st_mtime


def needs_merge(run: Path, model: str, folds: list[int]) -> bool:
    merged = run / model / "oof.csv"
    newest = max(fold_oof(run, model, k).stat().st_mtime for k in folds)
    return not merged.is_file() or merged.stat().st_mtime < newest


def report_failure(row: dict, model: str, fold: int | str, cwd: Path) -> None:
    log = cwd / row["log"] if row["log"] else None
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log and log.is_file() else []
    print(f"FAILED {model} fold {fold} {row['verb']} (exit {row['exit_code']}) on {row['host'] or '-'} "
          f"cards {row['cards'] or '-'}: log {row['log'] or '-'}", *(f"  | {line}" for line in lines), sep="\n",
          flush=True)


def progress(done: int, failed: int, running: int, waiting: int, seconds: list[float], slots: int) -> str:
    """One progress line; the ETA assumes the jobs left take the mean time of the jobs done."""
    line = f"jobs: {done} done, {failed} failed, {running} running, {waiting} waiting"
    if not running + waiting:
        return line
    if not seconds:
        return f"{line}; ETA after the first job"
    eta = sum(seconds) / len(seconds) * math.ceil((running + waiting) / slots)
    return f"{line}; ETA {eta:.0f} s" if eta < 120 else f"{line}; ETA {eta / 60:.0f} min"


def attempt_numbers(cwd: Path, base: str) -> list[int]:
    """The numbers of a job's attempt records (every run's), from their file names, in order."""
    records = Path(cwd, base).parent.glob(f"{Path(base).name}.*.json")
    names = (p.name.removesuffix(".json").rpartition(".")[2] for p in records)
    return sorted(int(n) for n in names if n.isdigit())


def read_attempts(cwd: Path, base: str, first: int) -> list[dict]:
    """The records of a job's attempts from number ``first`` on (this run's), in order; an attempt that has
    only just taken its number (an empty record) is ``{"attempt": N}``."""
    found = []
    for n in (n for n in attempt_numbers(cwd, base) if n >= first):
        try:
            found.append(json.loads(attempt_record(cwd, base, n).read_text()))
        except (ValueError, OSError):
            found.append({"attempt": n})
    return found


def attempt_rows(model: str, fold: int, attempts: list[dict], unfinished: int) -> list[dict]:
    """jobs.csv rows of ``attempts``: one per verb started; a verb without an end gets the time now and
    exit code ``unfinished`` (LOST, or INTERRUPTED after Ctrl-C)."""
    return [{"model": model, "fold": fold, "verb": v["verb"], "attempt": r["attempt"], "cards": r["cards"],
             "host": r["host"], "node": r["node"], "start": v["start"], "end": v["end"] or now(),
             "exit_code": unfinished if v["exit_code"] == "" else v["exit_code"], "log": v["log"]}
            for r in attempts for v in r.get("verbs", [])]


def tell_retries(model: str, fold: int, attempts: list[dict], told: set) -> None:
    """One line for each attempt after the first (Ray's retry of a lost one) not told yet."""
    for before, r in itertools.pairwise(attempts):
        if "node" in r and (model, fold, r["attempt"]) not in told:
            told.add((model, fold, r["attempt"]))
            print(f"{model} fold {fold}: attempt {before['attempt']} on {before.get('host', '?')} (node "
                  f"{before.get('node', '?')}) lost; retried as attempt {r['attempt']} on {r['host']} (node "
                  f"{r['node']}, cards {r['cards']})", flush=True)


def seconds_of(record: dict) -> float:
    verbs = record["verbs"]
    return (datetime.fromisoformat(verbs[-1]["end"]) - datetime.fromisoformat(verbs[0]["start"])).total_seconds()


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m models.scheduler", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--models", nargs="+", required=True,
                   help=f"members: a family of {', '.join(MODELS)}, or FAMILY@VARIANT")
    p.add_argument("--data", required=True, help="folder in Kaggle's resized-PNG layout")
    p.add_argument("--folds", required=True, help="fold file (image_id,fold): every fold in it is a job")
    p.add_argument("--run-dir", required=True, help="run root (RUN/MODEL/foldK, RUN/jobs.csv, RUN/logs)")
    p.add_argument("--profile", default="demo")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="passed to every verb")
    p.add_argument("--fold-fusion", nargs="*", default=[], metavar="KEY=VALUE", help="passed to merge")
    p.add_argument("--devices", help="local cards, e.g. 0,1,2,3 (DEVICES)")
    p.add_argument("--gpus", type=positive_int, help="how many cards (GPUS): locally the first N, on a cluster a check")
    p.add_argument("--gpus-per-job", type=positive_int, help="cards each job holds (GPUS_PER_JOB; default: SET's gpus, or 1)")
    p.add_argument("--address", help="host:port of an existing Ray cluster (RAY_ADDRESS); default: local")
    p.add_argument("--force", action="store_true", help="redo the folds made with other settings (FORCE=1)")
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"attempts after the first of a job whose node or Ray worker died (RETRIES; default {RETRIES})")
    p.add_argument("--adapter", default=f"{shlex.quote(sys.executable)} -m models",
                   help="command that runs one verb (default: this Python's -m models; the tests give a stand-in)")
    a = p.parse_args(argv)
    try:
        with one_line_errors():
            code = schedule(a)
    except KeyboardInterrupt:  # ray.shutdown has stopped the running jobs (their processes die with their workers)
        print("interrupted: running jobs stopped (their rows in jobs.csv: exit 130); a re-run skips the finished "
              "folds and resumes the others from their last checkpoint", file=sys.stderr)
        code = 130
    sys.exit(code)


def schedule(a: argparse.Namespace) -> int:
    """Run every job of ``a`` (see the module docstring); return the exit code (0, or 1 when one failed)."""
    members = [parse_member(m, "--models") for m in a.models]
    borrowed = [str(m) for m in members if m.run]
    if borrowed:
        raise DataError("--models", f"{', '.join(borrowed)}: borrowed members are trained in their own run, not here")
    if a.retries < 0:
        raise DataError("RETRIES", f"must be 0 or more, got {a.retries}")
    a.gpus_per_job, sets = cards_per_job(a.gpus_per_job, a.set)
    cards = parse_cards(a.devices, a.gpus, a.gpus_per_job, cluster=a.address is not None)
    cwd, run, folds_file = Path.cwd(), Path(a.run_dir), Path(a.folds)
    folds = sorted(int(k) for k in read_folds(folds_file)["fold"].unique())
    models = list(dict.fromkeys(m.folder_name for m in members))
    adapter = shlex.split(a.adapter)
    common = ["--data", a.data, "--folds", a.folds, "--profile", a.profile, "--run-dir", a.run_dir,
              *(["--set", *sets] if sets else [])]
    stale_check(models, adapter, common, a.force, cwd)
    jobs_csv = run / "jobs.csv"
    rows = [] if not jobs_csv.is_file() else read_table(jobs_csv, dtype=str, keep_default_na=False).to_dict("records")

    def record(new: list[dict]) -> None:
        rows.extend(new)
        write_table(pd.DataFrame(rows, columns=JOB_COLUMNS).fillna(""), jobs_csv)

    todo = [(m, k) for m in models for k in folds if not finished(run, m, k, folds_file)]
    skipped = [f"{m} fold {k}" for m in models for k in folds if (m, k) not in todo]
    if skipped:
        print(f"skipped (finished): {', '.join(skipped)}", flush=True)
    failed, succeeded = run_jobs(todo, a, cards, adapter, common, cwd, record) if todo else (set(), {})
    here = socket.gethostname()
    for (m, k), attempt in succeeded.items():  # what the merge reads must be here, whoever wrote it
        if m not in failed and not finished(run, m, k, folds_file):
            oof = fold_oof(run, m, k)
            state = "missing" if not oof.is_file() else f"older than the fold file {folds_file}"
            print(f"MISSING {m} fold {k}: its job exited 0 on {attempt['host']} (node {attempt['node']}, attempt "
                  f"{attempt['attempt']}) but {oof} is {state} here on {here}: is {run} on a filesystem every node "
                  f"shares, and are the nodes' clocks in step?", flush=True)
            failed.add(m)
    to_merge = []
    for m in models:
        if m in failed:
            print(f"not merged: {m} (a fold failed or its output is missing)", flush=True)
        elif all(finished(run, m, k, folds_file) for k in folds) and needs_merge(run, m, folds):
            to_merge.append(m)

    def merge(m: str) -> dict:
        argv = [*adapter, *member_args(m), "merge", *common, *(["--fold-fusion", *a.fold_fusion] if a.fold_fusion else [])]
        log, start = str(run / "logs" / f"{m}_merge.log"), now()
        return {"model": m, "fold": "", "verb": "merge", "attempt": "", "cards": "", "host": here, "node": "",
                "start": start, "exit_code": run_step(argv, log, str(cwd)), "end": now(), "log": log}

    # the merges are independent single-process steps on this host: one per core at once (on the demo's 2 cores
    # 4 merges take 2 rounds instead of 4); their rows and lines come in model order
    for row in on_cores(merge, to_merge):
        m, log = row["model"], row["log"]
        record([row])
        if row["exit_code"]:
            failed.add(m)
            report_failure(row, m, "-", cwd)
        elif needs_merge(run, m, folds):
            print(f"MISSING {m}: merge exited 0 but {run / m / 'oof.csv'} is missing or older than its folds' "
                  f"(log {log})", flush=True)
            failed.add(m)
        else:
            print(f"merged {m}: {run / m / 'oof.csv'}", flush=True)
    if failed:
        print(f"failed: {', '.join(sorted(failed))} (see the lines above); finished folds are skipped on a re-run",
              flush=True)
    return 1 if failed else 0


def on_cores(step: Callable[[T], R], items: list[T]) -> list[R]:
    """``step`` of every item, as many at once as this host has cores (each ``step`` runs a subprocess), in
    ``items``' order."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), len(os.sched_getaffinity(0))))) as pool:
        return list(pool.map(step, items))


def stale_check(models: list[str], adapter: list[str], common: list[str], force: bool, cwd: Path) -> None:
    """Each member's ``check`` verb before any job (the Makefile runs the same before ``make oof``): a
    member whose trained folds were made with other settings stops the run with the check's line."""
    def check(m: str) -> subprocess.CompletedProcess:
        argv = [*adapter, *member_args(m), "check", *common, *(["--force"] if force else [])]
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)

    for m, done in zip(models, on_cores(check, models)):
        if done.stdout.strip():
            print(done.stdout.strip(), flush=True)
        if done.returncode:  # the check's own one line (it names the member's folder), then exit 2
            lines = done.stderr.strip().splitlines()
            print(lines[-1] if lines else f"error: {m}: check exited {done.returncode}", file=sys.stderr, flush=True)
            sys.exit(2)


def run_jobs(todo: list[tuple[str, int]], a: argparse.Namespace, cards: list[str] | None, adapter: list[str],
             common: list[str], cwd: Path, record: Callable[[list[dict]], None]) -> tuple[set[str], dict]:
    """Submit every (model, fold) job of ``todo`` to Ray at once, record each attempt as its job ends,
    print progress; return the models with a failed job and ``{(model, fold): last attempt's record}`` of
    the jobs that succeeded.

    A job whose node or Ray worker dies is retried by Ray (``a.retries`` times, on any free cards); its
    ``train`` resumes from the fold's last checkpoint on the shared run dir. A job whose verb exits non-zero
    is not retried: the same input would fail the same way."""
    import ray

    run = Path(a.run_dir)
    ray_messages_to(run / "logs" / "ray.log")
    slots = start_ray(cards, a.address, a.gpus, a.gpus_per_job)
    where = f"cards {','.join(cards)}" if cards else f"the Ray cluster at {a.address}"
    print(f"{len(todo)} job(s) on {where}, {a.gpus_per_job} card(s) per job, {slots} at once, up to {a.retries} "
          f"retries of a lost job; jobs in {run / 'jobs.csv'}, logs in {run / 'logs'}", flush=True)
    task = ray.remote(run_job).options(num_gpus=a.gpus_per_job, num_cpus=0, max_retries=a.retries,
                                       retry_exceptions=False)
    pending: dict = {}
    for m, k in todo:
        base = str(run / "logs" / f"{m}_fold{k}")
        first = 1 + max(attempt_numbers(cwd, base), default=0)
        steps = [(verb, [*adapter, *member_args(m), verb, *common, "--fold", str(k)]) for verb in ("train", "predict")]
        pending[task.remote(steps, base, first, str(cwd), cards, os.environ.get("OMP_NUM_THREADS"))] = (m, k, base, first)
    failed: set[str] = set()
    succeeded: dict = {}
    seconds: list[float] = []
    n_failed, last, told = 0, time.time(), set()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(PROGRESS_EVERY, 5.0))
            for ref in ready:
                m, k, base, first = pending.pop(ref)
                try:
                    final = ray.get(ref)
                    earlier = [r for r in read_attempts(cwd, base, first) if r["attempt"] != final["attempt"]]
                    tell_retries(m, k, [*earlier, final], told)
                    rows = attempt_rows(m, k, [*earlier, final], LOST)
                    ok = final["verbs"][-1]["exit_code"] == 0 and len(final["verbs"]) == 2
                    if ok:
                        succeeded[m, k] = final
                        seconds.append(seconds_of(final))
                except ray.exceptions.RayError as e:  # lost every time: its node or worker died
                    rows = attempt_rows(m, k, read_attempts(cwd, base, first), LOST) or [
                        {"model": m, "fold": k, "verb": "train", "attempt": "", "cards": "", "host": "", "node": "",
                         "start": "", "end": now(), "exit_code": LOST, "log": ""}]
                    print(f"{m} fold {k}: lost {1 + a.retries} time(s), not retried again: "
                          f"{str(e).strip().splitlines()[0]}", flush=True)
                    ok = False
                record(rows)
                if not ok:
                    failed.add(m)
                    n_failed += 1
                    report_failure(rows[-1], m, k, cwd)
            running = 0
            for m, k, base, first in pending.values():
                attempts = read_attempts(cwd, base, first)
                running += bool(attempts)
                tell_retries(m, k, attempts, told)
            if ready or time.time() - last >= PROGRESS_EVERY:
                print(progress(len(succeeded), n_failed, running, len(pending) - running, seconds, slots), flush=True)
                last = time.time()
    except KeyboardInterrupt:
        for m, k, base, first in pending.values():
            record(attempt_rows(m, k, read_attempts(cwd, base, first), INTERRUPTED))
        raise
    finally:
        ray.shutdown()
    return failed, succeeded


if __name__ == "__main__":
    main()
