"""Every model x fold job on a set of cards or a Ray cluster, then ``merge``: ``python -m models.scheduler``.

What ``make oof``, ``make all-oof`` and ``make pipeline`` run when ``DEVICES``, ``GPUS`` or
``RAY_ADDRESS`` is given (without them the Makefile runs the folds itself, as before)::

    python -m models.scheduler --models yolo classifier --data D --folds F --run-dir R [--profile P]
        [--set K=V ...] [--fold-fusion K=V ...] [--devices 0,1,2,3 | --gpus N] [--gpus-per-job G]
        [--address host:port]

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
  run it. Each card has an equal share of the CPU cores: a job runs pinned to its cards' cores, with
  ``OMP_NUM_THREADS`` = their number unless it is set.
- ``--address host:port``: the same jobs on an existing Ray cluster (``ray start`` on every node).
  Every node needs the repo checkout at the same path, the same venv, and DATA, the fold file and the
  run dir on a shared filesystem. ``--gpus N`` there checks that the cluster has N cards.
- ``--models`` takes members (``yolo``, ``yolo@s640``: ``models/members.py``); a variant's jobs get
  ``--variant``. Before any job, each member's ``check`` verb compares its trained folds' saved
  settings and inputs with what is asked (``--force``: clears the ones that differ), as ``make oof``
  does; a difference stops the run with its one line, exit 2.
- A fold whose ``oof.csv`` exists and is not older than the fold file is finished and skipped; a
  model is merged when all its folds are finished and its ``oof.csv`` is missing or older than one
  of theirs (the Makefile's rules).
- Each verb of a job logs to ``RUN/logs/MODEL_foldK_VERB.log`` (``MODEL_merge.log``) and is one row
  of ``RUN/jobs.csv`` (model, fold, verb, cards, host, start, end, exit_code, log), written atomically
  after every job; the rows of earlier runs are kept. Progress lines show jobs done / running /
  waiting with an ETA from the mean job time.
- A failed job is reported with its log (path and last lines) and the other jobs go on; a model with
  a failed fold is not merged; the exit code is then 1. Bad input is one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd

from cxr.args import Parser, positive_int
from cxr.data import read_folds
from cxr.io import DataError, one_line_errors, read_table, write_table
from models import MODELS
from models.members import Member, parse_member

JOB_COLUMNS = ["model", "fold", "verb", "cards", "host", "start", "end", "exit_code", "log"]
# The local Ray instance stays on this machine: loopback as its address (without it Ray asks a
# public DNS address for its own IP), no usage report, no auth token to set up, and no memory
# monitor killing a large training job (memory is the kernel's business, as without the scheduler).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
PROGRESS_EVERY = 60.0  # seconds between progress lines while no job finishes
TAIL_LINES = 15  # of a failed job's log, printed with its path


def now() -> str:
    return datetime.now().isoformat(sep=" ", timespec="milliseconds")


def run_step(verb: str, argv: list[str], log: str, cwd: str, env: dict | None = None, cards: str = "",
             where: str = "") -> dict:
    """Run one verb's command in ``cwd`` with its output in ``cwd/log`` (``where``: the header's note on
    cards and cores); return its jobs.csv row (without model and fold)."""
    path, host, start = Path(cwd, log), socket.gethostname(), now()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {start} on {host}{where}: {shlex.join(argv)}\n")
        f.flush()
        code = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    return {"verb": verb, "cards": cards, "host": host, "start": start, "end": now(), "exit_code": code, "log": log}


def run_job(steps: list[tuple[str, list[str], str]], cwd: str, card_names: list[str] | None,
            card_cores: list[list[int]] | None, threads: str | None) -> tuple[list[dict], float]:
    """One job inside its Ray task: run each ``(verb, argv, log)`` in turn on this task's cards, stop
    at the first failure. Returns one jobs.csv row per verb run and the job's seconds.

    Local: ``card_names[i]`` is the card of Ray's logical GPU i and ``card_cores[i]`` its CPU cores;
    the job runs on its cards' cores, with OMP_NUM_THREADS = their number. Cluster (None): Ray's ids
    are the node's cards, no pinning. ``threads``: the user's OMP_NUM_THREADS, which wins.
    """
    import ray

    ids = [int(i) if card_names else i for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]]
    cards = ",".join(card_names[i] for i in ids) if card_names else ",".join(ids)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": cards}
    env.pop("OMP_NUM_THREADS", None)  # Ray's worker sets 1, which would starve a CPU job
    where = f", CUDA_VISIBLE_DEVICES={cards}"
    if card_cores and hasattr(os, "sched_setaffinity"):
        cores = sorted({c for i in ids for c in card_cores[i]})
        os.sched_setaffinity(0, cores)  # this thread's mask, which the job's processes inherit
        env["OMP_NUM_THREADS"] = str(len(cores))
        where += f", cores {','.join(map(str, cores))}"
    if threads:
        env["OMP_NUM_THREADS"] = threads
    rows, started = [], time.time()
    for verb, argv, log in steps:
        rows.append(run_step(verb, argv, log, cwd, env, cards, where))
        if rows[-1]["exit_code"]:
            break
    return rows, time.time() - started


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


def start_ray(cards: list[str] | None, address: str | None, gpus: int | None, per_job: int) -> int:
    """Start the local Ray instance (``cards``) or join the cluster at ``address``; return how many
    jobs can run at once."""
    import ray

    if address is None:
        os.environ.update(LOCAL_RAY_ENV)
        # Ray's logical GPU i must be cards[i], not the i-th id of an inherited list.
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        slots = len(cards) // per_job
        # address="local": a new instance, never the cluster of RAY_ADDRESS or of an earlier `ray start`.
        # num_cpus: one worker process per running job (the jobs ask for cards only).
        ray.init(address="local", num_cpus=slots, num_gpus=len(cards), include_dashboard=False,
                 object_store_memory=100 * 2**20, logging_level=logging.WARNING, log_to_driver=False)
        return slots
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    total = int(ray.cluster_resources().get("GPU", 0))
    if total < max(per_job, gpus or 0):
        ray.shutdown()
        raise DataError("RAY_ADDRESS", f"the cluster at {address} has {total} GPU(s), fewer than "
                                       f"{'GPUS=' + str(gpus) if gpus else 'GPUS_PER_JOB=' + str(per_job)}")
    return (gpus or total) // per_job


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
    log = cwd / row["log"]
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.is_file() else []
    print(f"FAILED {model} fold {fold} {row['verb']} (exit {row['exit_code']}) on {row['host']} "
          f"cards {row['cards'] or '-'}: log {row['log']}", *(f"  | {line}" for line in lines), sep="\n", flush=True)


def progress(done: int, running: int, waiting: int, failed: int, seconds: list[float], slots: int) -> str:
    """One progress line; the ETA assumes the jobs left take the mean time of the jobs done."""
    line = f"jobs: {done} done, {running} running, {waiting} waiting" + (f", {failed} failed" if failed else "")
    if not running + waiting:
        return line
    if not seconds:
        return f"{line}; ETA after the first job"
    eta = sum(seconds) / len(seconds) * math.ceil((running + waiting) / slots)
    return f"{line}; ETA {eta:.0f} s" if eta < 120 else f"{line}; ETA {eta / 60:.0f} min"


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
    p.add_argument("--adapter", default=f"{shlex.quote(sys.executable)} -m models",
                   help="command that runs one verb (default: this Python's -m models; the tests give a stand-in)")
    a = p.parse_args(argv)
    try:
        with one_line_errors():
            code = schedule(a)
    except KeyboardInterrupt:  # ray.shutdown has stopped the running jobs (Ray ends their processes)
        print("interrupted: running jobs stopped; a re-run skips the finished folds", file=sys.stderr)
        code = 130
    sys.exit(code)


def schedule(a: argparse.Namespace) -> int:
    """Run every job of ``a`` (see the module docstring); return the exit code (0, or 1 when one failed)."""
    members = [parse_member(m, "--models") for m in a.models]
    borrowed = [str(m) for m in members if m.run]
    if borrowed:
        raise DataError("--models", f"{', '.join(borrowed)}: borrowed members are trained in their own run, not here")
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
        write_table(pd.DataFrame(rows, columns=JOB_COLUMNS), jobs_csv)

    todo = [(m, k) for m in models for k in folds if not finished(run, m, k, folds_file)]
    skipped = [f"{m} fold {k}" for m in models for k in folds if (m, k) not in todo]
    if skipped:
        print(f"skipped (finished): {', '.join(skipped)}", flush=True)
    failed = run_jobs(todo, a, cards, adapter, common, cwd, record) if todo else set()
    for m in models:
        if m in failed:
            print(f"not merged: {m} (a fold failed)", flush=True)
        elif all(finished(run, m, k, folds_file) for k in folds) and needs_merge(run, m, folds):
            argv = [*adapter, *member_args(m), "merge", *common, *(["--fold-fusion", *a.fold_fusion] if a.fold_fusion else [])]
            row = {"model": m, "fold": "", **run_step("merge", argv, str(run / "logs" / f"{m}_merge.log"), str(cwd))}
            record([row])
            if row["exit_code"]:
                failed.add(m)
                report_failure(row, m, "-", cwd)
            else:
                print(f"merged {m}: {run / m / 'oof.csv'}", flush=True)
    if failed:
        print(f"failed: {', '.join(sorted(failed))} (see the logs above); finished folds are skipped on a re-run",
              flush=True)
    return 1 if failed else 0


def stale_check(models: list[str], adapter: list[str], common: list[str], force: bool, cwd: Path) -> None:
    """Each member's ``check`` verb before any job (the Makefile runs the same before ``make oof``): a
    member whose trained folds were made with other settings stops the run with the check's line."""
    for m in models:
        argv = [*adapter, *member_args(m), "check", *common, *(["--force"] if force else [])]
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        if done.stdout.strip():
            print(done.stdout.strip(), flush=True)
        if done.returncode:  # the check's own one line (it names the member's folder), then exit 2
            lines = done.stderr.strip().splitlines()
            print(lines[-1] if lines else f"error: {m}: check exited {done.returncode}", file=sys.stderr, flush=True)
            sys.exit(2)


def run_jobs(todo: list[tuple[str, int]], a: argparse.Namespace, cards: list[str] | None, adapter: list[str],
             common: list[str], cwd: Path, record: Callable[[list[dict]], None]) -> set[str]:
    """Submit every (model, fold) job of ``todo`` to Ray at once, record each as it ends, print
    progress; return the models with a failed job."""
    import ray

    run = Path(a.run_dir)
    slots = start_ray(cards, a.address, a.gpus, a.gpus_per_job)
    where = f"cards {','.join(cards)}" if cards else f"the Ray cluster at {a.address}"
    print(f"{len(todo)} job(s) on {where}, {a.gpus_per_job} card(s) per job, {slots} at once; "
          f"jobs in {run / 'jobs.csv'}, logs in {run / 'logs'}", flush=True)
    card_cores = split_cores(len(cards)) if cards else None
    task = ray.remote(run_job).options(num_gpus=a.gpus_per_job, num_cpus=0, max_retries=0)
    pending = {}
    for m, k in todo:
        steps = [(verb, [*adapter, *member_args(m), verb, *common, "--fold", str(k)], str(run / "logs" / f"{m}_fold{k}_{verb}.log"))
                 for verb in ("train", "predict")]
        for _, _, log in steps:  # a job is running once its train log exists (progress lines)
            (cwd / log).unlink(missing_ok=True)
        pending[task.remote(steps, str(cwd), cards, card_cores, os.environ.get("OMP_NUM_THREADS"))] = (m, k, steps[0][2])
    failed: set[str] = set()
    seconds: list[float] = []
    n_failed, last = 0, time.time()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY)
            for ref in ready:
                m, k, log = pending.pop(ref)
                try:
                    rows, took = ray.get(ref)
                    seconds.append(took)
                except ray.exceptions.RayError as e:  # the task itself died (node lost, worker killed)
                    rows = [{"verb": "train", "cards": "", "host": "", "start": "", "end": now(), "exit_code": -1,
                             "log": log}]
                    print(f"{m} fold {k}: Ray task failed: {str(e).strip().splitlines()[0]}", flush=True)
                record([{"model": m, "fold": k, **row} for row in rows])
                if rows[-1]["exit_code"]:
                    failed.add(m)
                    n_failed += 1
                    report_failure(rows[-1], m, k, cwd)
            if ready or time.time() - last >= PROGRESS_EVERY:
                running = sum((cwd / log).is_file() for _, _, log in pending.values())
                print(progress(len(todo) - len(pending), running, len(pending) - running, n_failed, seconds, slots),
                      flush=True)
                last = time.time()
    finally:
        ray.shutdown()
    return failed


if __name__ == "__main__":
    main()
