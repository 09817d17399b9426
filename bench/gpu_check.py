"""GPU check of every full profile at its own size, each model in its own process and time limit: AMP training
steps, a prediction pass, and the figures that size a real run (prints figures; not a test).

    bash bench/gpu_check.sh                                 # every model (= $PYTHON bench/gpu_check.py)
    bash bench/gpu_check.sh --models yolo,effdet            # some (the old form `gpu_check.sh yolo,effdet` too)
    bash bench/gpu_check.sh --smoke --fail classifier       # CPU, 128 px: the check's own paths, one model failing
    PYTHON=/opt/env/bin/python bash bench/gpu_check.sh      # another interpreter (default: the checkout's .venv)

How long: every model has its own limit (:data:`LIMITS`, ``--limit``), cut to what is left of the whole check's
``--budget`` (6 minutes with the data and the device probe); a model that no longer fits is SKIP. On one
H100/H200-class card we expect 3-4 minutes (an estimate: no GPU was lent while this was written), so a
15-minute rental holds the machine's start, the check and a rerun.

Per model, in a child process (``gpu_check.py --child MODEL``), so that an exception, a crash, a hang (killed
with its process group at the limit) or memory the framework keeps alive belongs to that model alone; a failure
prints the error, ``FAIL <model>`` and the kept folder, and the next model runs:

* the profile ``models/<name>/full.yaml`` as written (image size, batch, accumulation, AMP, TTA, loader
  workers) except the schedule: one epoch of the synthetic train images at 1024 px, validated at its end on
  as many images as one validation batch, so that validation decodes them in-process (the adapters decode a
  single batch without loader workers). Without the ``make weights`` file yolo/effdet/classifier start from
  scratch and detectron2 from a FrozenBN zoo-format checkpoint built here, so the full FrozenBN path runs;
* training through the adapter's own ``train``. Train images/s: a forward pre-hook on the network being trained
  stamps the start of every training micro-batch; the rate runs from the start of micro-batch ``warmup`` to the
  start of the last one, so loader start, cuDNN tuning and ultralytics' first plots (the warm-up steps) and
  validation and checkpoints (after the last step) stay out of it, while data waits, backward, optimizer steps
  and EMA updates stay in;
* AMP asserted on the GPU: at least 95 % of the convolutions of the warm-up steps and of the first prediction
  batch ran under autocast or in fp16 (a global forward hook, removed before the timed steps: it costs Python
  time in every module call);
* prediction through ``load_infer`` over the test images with the profile's TTA and batch, decoded in loader
  workers as ``predict`` does, timed from the end of the first batch (model load and worker start aside) to the
  end (the TTA views' fusion included);
* memory: the allocator's peaks (allocated, reserved) and the card's peak use, sampled from
  ``torch.cuda.mem_get_info`` of the device torch computes on (CUDA context included; the use before the phase
  is printed beside it), NVML's per-process figure where NVML can see this process (not on a MIG slice or
  from a PID namespace); training and prediction apart, with ``gc.collect()`` and ``empty_cache()`` between;
  the host's peak RSS;
* the hours of a 5-fold run of the profile on this card: :func:`five_fold_hours` (:data:`FORMULA`, printed once).

The header prints the checkout and interpreter, the card, driver, CUDA, cuDNN and torch versions, and /dev/shm
against what the loader workers move through it (a warning with the fix when it is too small). With two or more
cards it also runs one 2-GPU effdet job. ``--smoke`` runs all of it on the CPU at 128 px (figures meaningless);
``--fail MODEL`` makes that model's first training step raise, ``--fail MODEL:hang`` makes it hang.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
# `python bench/gpu_check.py` puts bench/ first on sys.path, and the venv's editable install may point at another
# checkout: the checkout this file is in is the code under test (children get it through PYTHONPATH too)
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

# torch-free: the parent never initialises CUDA, whose context would count in the children's memory figures
import models  # noqa: E402
from cxr.io import DataError, one_line_errors, write_table  # noqa: E402


@dataclass(frozen=True)
class RealRun:
    """What ``make oof`` does per model on VinBigData: 15,000 train images in 5 folds, 3,000 test images."""

    train: int = 12_000
    val: int = 3_000
    test: int = 3_000
    folds: int = 5


@dataclass(frozen=True)
class Size:
    """The check's data and timing at one scale."""

    imgsz: int | None  # None: the profile's own size
    data_px: int  # side of the synthetic PNGs
    n_train: int  # training images: one epoch
    n_test: int  # prediction images
    warmup: int  # training micro-batches before the timed ones


REAL = RealRun()
# passes over the validation images per validation: a detector's loss pass (ultralytics: its validator) and its
# mAP@0.4 pass (models.common.validation_map); the classifier's loss and AUC come from one pass
VALIDATION_PASSES = {"detector": 2, "classifier": 1}
# 96 images: 20-44 timed micro-batches per model (batch 2-4) after 3 warm-up steps, 1-4 s of steady training on an
# H100 against a first-batch wait of tens of ms; 64 test images: 8 prediction batches of YOLO's 8, more of the others
GPU = Size(imgsz=None, data_px=1024, n_train=96, n_test=64, warmup=3)
SMOKE = Size(imgsz=128, data_px=128, n_train=12, n_test=16, warmup=1)  # CPU: the paths only: 3 micro-batches of
# 4, 2 prediction batches of YOLO's 8
VAL_POOL = 8  # validation images made; a model validates on min(its validation batch, this): one batch, in-process
# the check's schedule: one epoch that validates at its end; YOLO keeps mosaic (its profile closes it for the last
# 10 of 40 epochs) and never stops early
SHORT: dict[str, dict[str, Any]] = {name: {"epochs": 1, "validate_every": 1} for name in models.MODELS}
SHORT["yolo"].update(close_mosaic=0, patience=0)
# seconds per model on one GPU: about twice what we expect on an H100 (start-up, one epoch, validation, prediction)
LIMITS = {"yolo": 100, "detectron": 100, "effdet": 90, "classifier": 70}
SMOKE_LIMITS = {"yolo": 120, "detectron": 150, "effdet": 120, "classifier": 90}  # 2 CPU cores shared with tests
MULTI_LIMIT = 150  # the 2-GPU effdet job
BUDGET, SMOKE_BUDGET = 360, 600  # the whole check, data and device probe included
MIN_START = 20  # a model is not started with less of the budget left (it could not even load)
AMP_SHARE = 0.95

FORMULA = f"""5-fold hours = {REAL.folds} folds x (train + validation + prediction), per fold from the profile's own
  schedule (models/<name>/full.yaml: epochs, validate_every, tta) and this card's measured images/s:
    train      = epochs x {REAL.train:,} images / train img/s
    validation = ceil(epochs / validate_every) x passes x {REAL.val:,} images / (views x predict img/s)
                 [passes: a detector's loss pass or ultralytics' validator, then its mAP@0.4 pass = 2; the
                 classifier's = 1; a pass costs one view of prediction]
    prediction = ({REAL.val:,} OOF + {REAL.test:,} test images) / predict img/s   [with the profile's TTA:
                 views = 2 with tta]
  not counted: start-up, data caching and checkpoint saves per fold, YOLO's early stop (patience)"""


# --- the figures (pure functions) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """What a profile's 5-fold run does per fold."""

    epochs: int
    validate_every: int
    tta: bool
    passes: int  # over the validation images per validation (:data:`VALIDATION_PASSES`)

    @classmethod
    def of(cls, name: str, cfg: Any) -> Schedule:
        return cls(int(cfg.epochs), int(cfg.validate_every), bool(cfg.tta), VALIDATION_PASSES[models.kind(name)])


@dataclass(frozen=True)
class Hours:
    train_s: float  # per fold
    validations: int
    validation_s: float
    predict_s: float
    total_h: float  # all folds

    def parts(self) -> str:
        return (f"per fold: train {self.train_s / 3600:.1f} h, {self.validations} validations "
                f"{self.validation_s / 3600:.1f} h, predictions {self.predict_s / 60:.0f} min")


def five_fold_hours(schedule: Schedule, train_ips: float, predict_ips: float, real: RealRun = REAL) -> Hours:
    """Hours of ``make oof`` for a profile at the measured speeds (:data:`FORMULA`). A run validates every
    ``validate_every`` epochs and at the last one: ``ceil(epochs / validate_every)`` times; each validation is
    ``schedule.passes`` passes over the fold's validation images without TTA, each costed as one view of
    prediction (``predict_ips`` counts images through every TTA view)."""
    if train_ips <= 0 or predict_ips <= 0:
        raise ValueError(f"speeds must be positive, got train {train_ips}, predict {predict_ips} img/s")
    views = 2 if schedule.tta else 1
    validations = math.ceil(schedule.epochs / schedule.validate_every)
    train_s = schedule.epochs * real.train / train_ips
    validation_s = validations * schedule.passes * real.val / (views * predict_ips)
    predict_s = (real.val + real.test) / predict_ips
    total_h = real.folds * (train_s + validation_s + predict_s) / 3600
    return Hours(train_s, validations, validation_s, predict_s, total_h)


def train_speed(starts: list[float], sizes: list[int], warmup: int) -> tuple[float, int, float]:
    """(images/s, images, seconds) of the training micro-batches from the start of micro-batch ``warmup`` (0-based)
    to the start of the last one: each timed micro-batch complete, from its data wait to its optimizer step."""
    if len(starts) < warmup + 2:
        raise RuntimeError(f"{len(starts)} training micro-batches seen: at least {warmup + 2} are needed to time one "
                           f"after {warmup} warm-up steps (more training images, or a smaller batch)")
    seconds = starts[-1] - starts[warmup]
    images = sum(sizes[warmup:-1])
    return images / seconds, images, seconds


def shm_need(batch: int, imgsz: int, workers: int, float_tensors: bool) -> int:
    """Bytes a training loader's workers hold in /dev/shm at once: each worker prefetches 2 items (torch's
    ``prefetch_factor``), each ``batch`` 3-channel images, float32 after normalisation (effdet, classifier) or
    uint8 (ultralytics, and detectron2 with ``batch`` 1: its workers hand over single images)."""
    return workers * 2 * batch * 3 * imgsz * imgsz * (4 if float_tensors else 1)


def shm_warning(free: int | None, need: int, workers: int) -> str | None:
    """A warning with the fixes when /dev/shm (``free`` bytes; None: there is none) cannot hold ``need``."""
    if workers == 0 or need == 0 or (free is not None and free >= need):
        return None
    have = "no /dev/shm" if free is None else f"/dev/shm has {free / 2**20:.0f} MiB free"
    fewer = max(0, workers * free // need) if free else 0
    return (f"warning: {have}, and {workers} loader workers per model move up to {need / 2**20:.0f} MiB through it: "
            f"expect 'DataLoader worker ... killed by signal: Bus error'. Fix: run the container with --shm-size=2g "
            f"or --ipc=host, or check with fewer workers (--workers {fewer}; a real run: SET=\"workers={fewer}\")")


def parse_fail(text: str | None, names: list[str]) -> dict[str, str]:
    """``--fail yolo,effdet:hang`` -> {model: raise | hang}; a bad entry is a :class:`DataError`."""
    fails: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        name, _, mode = item.partition(":")
        if name not in names:
            raise DataError("--fail", f"{name!r} is not among the models checked ({', '.join(names)})")
        if mode not in ("", "raise", "hang"):
            raise DataError("--fail", f"{item!r}: the mode after ':' is raise (the default) or hang")
        fails[name] = mode or "raise"
    return fails


def parse_limits(text: str | None, names: list[str], defaults: dict[str, float]) -> dict[str, float]:
    """``--limit 200`` (every model) or ``--limit yolo=200,detectron=300`` over ``defaults``, in seconds."""
    limits = {n: float(defaults[n]) for n in names}
    for item in filter(None, (text or "").split(",")):
        name, has_name, value = item.rpartition("=")
        if has_name and name not in names:
            raise DataError("--limit", f"{name!r} is not among the models checked ({', '.join(names)})")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise DataError("--limit", f"{item!r}: expected SECONDS or MODEL=SECONDS, seconds > 0")
        limits.update({name: seconds} if has_name else dict.fromkeys(names, seconds))
    return limits


# --- the parent: header, data, one child per model, the table ----------------------------------------------


def synth_part(job: tuple[str, int, int, int, int]) -> str:
    from cxr.synth import SynthConfig, generate

    out, n_train, n_test, size, seed = job
    return str(generate(SynthConfig(out=out, n_train=n_train, n_test=n_test, size=size, seed=seed)))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_data(root: Path, size: int, n_train: int, n_test: int) -> Path:
    """A synthetic data folder at ``size`` px, generated in one process per core (chunks with their own seeds,
    then merged: the image ids are hashes, unique across seeds)."""
    parts = max(1, min(cores(), (n_train + n_test) // 4))
    jobs = [(str(root / f"part{k}"), len(range(k, n_train, parts)), len(range(k, n_test, parts)), size, k)
            for k in range(parts)]
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the workers' progress bars would interleave in the header
    try:
        with ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
            folders = [Path(p) for p in pool.map(synth_part, jobs)]
    finally:
        if saved is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = saved
    out = root / "data"
    for split in ("train", "test"):
        (out / split).mkdir(parents=True)
        for f in folders:
            for png in (f / split).glob("*.png"):
                png.rename(out / split / png.name)
    for table in ("train.csv", "train_meta.csv", "test_meta.csv", "test_labels.csv", "sample_submission.csv"):
        write_table(pd.concat([pd.read_csv(f / table, dtype={"image_id": str}) for f in folders]), out / table)
    for f in folders:
        shutil.rmtree(f)
    return out


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_logged(argv: list[str], log: Path, limit: float) -> tuple[int | None, float]:
    """Run ``argv`` in its own process group with stdout and stderr to ``log``; (exit code or None when it was
    killed at ``limit`` seconds, seconds). The group goes in the end either way: loader workers or a spawned
    decode pool left behind would hold memory of the next model's card."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=child_env(), start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: nothing of a child outlives the check
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, time.perf_counter() - started


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def tail(path: Path, n: int = 8) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip()][-n:]


def git_state() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no git"
    return f"at {rev}{' + uncommitted changes' if dirty else ''}" if rev else "not a git checkout"


def profile_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "models" / name / "full.yaml").read_text()) or {}


def shm_lines(names: list[str], smoke: bool, workers: int | None) -> list[str]:
    """The header's /dev/shm line, and a warning when the training loaders' workers would not fit."""
    try:
        usage = shutil.disk_usage("/dev/shm")
        total, free = usage.total, usage.free
    except OSError:
        total = free = None
    need, worst, most = 0, "", 0
    for name in names:
        p = profile_yaml(name)
        n = 0 if smoke else min(int(p.get("workers", 2) if workers is None else workers), cores())
        bytes_ = shm_need(1 if name == "detectron" else int(p["batch"]), SMOKE.imgsz if smoke else int(p["imgsz"]), n,
                          name in ("effdet", "classifier"))
        most = max(most, n)
        if bytes_ > need:
            need, worst = bytes_, name
    have = "none" if total is None else f"{total / 2**20:,.0f} MiB ({free / 2**20:,.0f} MiB free)"
    lines = [f"/dev/shm: {have}; training loader workers: up to {most} per model"
             + (f", up to {need / 2**20:,.0f} MiB in flight ({worst})" if need else "")]
    warning = shm_warning(free, need, most)
    return lines + ([warning] if warning else [])


@dataclass
class Row:
    model: str
    status: str  # OK, FAIL, SKIP
    seconds: float = 0.0
    error: str = ""
    result: dict[str, Any] | None = None


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f}"


def figures_line(r: dict[str, Any]) -> str:
    t, p, m = r["train"], r["predict"], r["memory"]

    def memory(phase: str) -> str:
        x = m.get(phase)
        if not x:
            return "n/a (CPU)"
        nvml = f"; NVML: this process {gib(x['process'])} GiB" if x.get("process") is not None else ""
        return (f"{gib(x['allocated'])} allocated / {gib(x['reserved'])} reserved / {gib(x['card'])} card GiB "
                f"(card {gib(x['card_before'])} GiB before{nvml})")

    def share(v: float | None) -> str:
        return "none seen" if v is None else f"{v:.0%}"

    amp = r["amp"]
    amp_text = (f"train {share(amp['train'])}, predict {share(amp['predict'])}" if r["memory"].get("train")
                else "n/a (CPU)")
    steps = f"{t['warmup']} warm-up step{'s' if t['warmup'] != 1 else ''}"
    return (f"{r['model']} full ({r['imgsz']} px, batch {r['batch']}{r['accumulate_text']}, {r['note']}): "
            f"train {t['ips']:.1f} img/s ({t['images']} images in {t['seconds']:.1f} s after {steps}), predict "
            f"{p['ips']:.1f} img/s ({p['images']} images in {p['seconds']:.1f} s"
            f"{', flip TTA' if p['views'] == 2 else ''}); peak memory train {memory('train')}, predict "
            f"{memory('predict')}; host peak RSS {gib(r['host_rss'])} GiB; AMP share of convolutions {amp_text}; "
            f"5-fold run on this card: {r['hours']['total_h']:.1f} h ({r['hours_parts']}); {r['seconds']:.0f} s "
            f"(training {r['train_wall']:.0f} s, prediction {r['predict_wall']:.0f} s)")


def print_table(rows: list[Row]) -> None:
    head = ["model", "result", "train img/s", "predict img/s", "train GiB card", "predict GiB card", "5-fold h", "s"]
    body = []
    for row in rows:
        r = row.result if row.result and "train" in row.result else None
        cells = [row.model, row.status]
        if r:
            mem = r["memory"]
            cells += [f"{r['train']['ips']:.1f}", f"{r['predict']['ips']:.1f}",
                      gib(mem["train"]["card"]) if mem.get("train") else "n/a",
                      gib(mem["predict"]["card"]) if mem.get("predict") else "n/a", f"{r['hours']['total_h']:.1f}"]
        else:
            cells += ["-"] * 5
        cells.append(f"{row.seconds:.0f}")
        body.append(cells + ([row.error] if row.error else []))
    widths = [max(len(str(c[i])) for c in [head, *body]) for i in range(len(head))]
    for cells in [head, *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
              + (f"  {cells[len(head)]}" if len(cells) > len(head) else ""), flush=True)


@dataclass
class Plan:
    names: list[str]
    smoke: bool
    fails: dict[str, str]
    limits: dict[str, float]
    budget: float
    workers: int | None
    work: Path | None
    keep: bool
    json: Path | None

    @classmethod
    def of(cls, a: argparse.Namespace) -> Plan:
        names = [n for n in (a.models or ",".join(models.names())).split(",") if n]
        unknown = [n for n in names if n not in models.MODELS]
        if unknown or not names:
            raise DataError("--models", f"unknown model(s) {unknown}; known: {', '.join(models.names())}")
        if a.workers is not None and a.workers < 0:
            raise DataError("--workers", f"must be 0 or more, got {a.workers}")
        budget = a.budget if a.budget is not None else (SMOKE_BUDGET if a.smoke else BUDGET)
        if not budget > 0:
            raise DataError("--budget", f"must be more than 0 seconds, got {budget}")
        return cls(names, a.smoke, parse_fail(a.fail, names),
                   parse_limits(a.limit, names, SMOKE_LIMITS if a.smoke else LIMITS), budget, a.workers,
                   Path(a.work) if a.work else None, a.keep, Path(a.json) if a.json else None)


def probe(plan: Plan, root: Path) -> dict[str, Any]:
    """The device as the children will see it, from a child process (the parent stays off CUDA)."""
    out = root / "probe.json"
    argv = [sys.executable, __file__, "--probe", str(out), *(["--smoke"] if plan.smoke else [])]
    rc, _ = run_logged(argv, root / "probe.log", 120)
    if rc != 0 or not out.exists():
        detail = " | ".join(tail(root / "probe.log", 3))
        ended = "timed out" if rc is None else f"exited {rc}"
        raise DataError(root / "probe.log", f"the device probe {ended}: {detail}")
    return json.loads(out.read_text())


def run(plan: Plan) -> int:
    started = time.perf_counter()
    deadline = started + plan.budget
    root = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=plan.work))
    print(f"gpu_check: checkout {REPO} ({git_state()}), python {sys.executable} "
          f"({sys.version.split()[0]}); work folder {root}", flush=True)
    device = probe(plan, root)
    print(device["line"], flush=True)
    if not plan.smoke and not device["cuda"]:
        shutil.rmtree(root, ignore_errors=True)
        raise DataError("gpu_check", f"needs a usable CUDA GPU: {device['problem']} (--smoke runs the check on the "
                                     f"CPU)")
    for line in shm_lines(plan.names, plan.smoke, plan.workers):
        print(line, flush=True)
    size = SMOKE if plan.smoke else GPU
    limits = ", ".join(f"{n} {plan.limits[n]:.0f} s" for n in plan.names)
    print(f"time: at most {plan.budget:.0f} s in all; per model: {limits}", flush=True)
    print(FORMULA, flush=True)

    made = time.perf_counter()
    data = make_data(root, size.data_px, size.n_train + VAL_POOL, size.n_test)
    ids = pd.read_csv(data / "train_meta.csv", dtype={"image_id": str})["image_id"].tolist()
    # fold 0: the validation pool (each model takes one validation batch of it), fold 1: training
    write_table(pd.DataFrame({"image_id": ids, "fold": [0 if k < VAL_POOL else 1 for k in range(len(ids))]}),
                root / "folds.csv")
    print(f"data: {len(ids)} train + {size.n_test} test synthetic images at {size.data_px} px in "
          f"{time.perf_counter() - made:.0f} s ({cores()} processes)", flush=True)

    rows = [check_in_child(plan, name, k, root, deadline) for k, name in enumerate(plan.names)]
    if not plan.smoke and device["gpus"] >= 2 and "effdet" in plan.names:
        rows.append(multi_gpu_job(root, deadline))

    print(f"\ngpu_check summary ({'CPU smoke run: figures meaningless' if plan.smoke else device['line']}):")
    print_table(rows)
    failed = [r.model for r in rows if r.status != "OK"]
    if plan.json:
        plan.json.write_text(json.dumps({"root": str(root), "kept": bool(failed or plan.keep),
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    total = time.perf_counter() - started
    if failed:
        if not plan.keep:
            prune(root, rows)
        print(f"gpu_check FAILED ({', '.join(failed)}) in {total:.0f} s; logs and run folders kept in {root} "
              f"(<model>/log.txt, <model>/run/<model>/fold0/)", flush=True)
        return 1
    if plan.keep:
        print(f"gpu_check passed in {total:.0f} s; kept {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        print(f"gpu_check passed in {total:.0f} s", flush=True)
    return 0


def prune(root: Path, rows: list[Row]) -> None:
    """The checkpoints of the models that passed go from a kept folder (hundreds of MB each, up to 0.5 GB for
    detectron2's); their logs, curves and plots stay."""
    for row in rows:
        if row.status == "OK" and (root / row.model).is_dir():
            for path in (root / row.model).rglob("*"):
                if path.suffix in (".pt", ".pth", ".pkl") and path.is_file():
                    path.unlink()


def check_in_child(plan: Plan, name: str, k: int, root: Path, deadline: float) -> Row:
    here = root / name
    here.mkdir()
    left = deadline - time.perf_counter()
    limit = min(plan.limits[name], left)
    if left < MIN_START:
        print(f"SKIP {name}: {max(left, 0):.0f} s left of the {plan.budget:.0f} s budget", flush=True)
        return Row(name, "SKIP", error=f"not started: the {plan.budget:.0f} s budget was spent")
    log = here / "log.txt"
    print(f"[{k + 1}/{len(plan.names)}] {name}: running, limit {limit:.0f} s; log {log}", flush=True)
    argv = [sys.executable, __file__, "--child", name, "--root", str(root), *(["--smoke"] if plan.smoke else []),
            *(["--fail-mode", plan.fails[name]] if name in plan.fails else []),
            *(["--workers", str(plan.workers)] if plan.workers is not None else [])]
    rc, seconds = run_logged(argv, log, limit)
    result_path = here / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if rc == 0 and result and result.get("status") == "OK":
        print(f"OK {figures_line(result)}", flush=True)
        return Row(name, "OK", seconds, result=result)
    if rc is None:
        error = f"killed at its time limit of {limit:.0f} s (a hang, or slower than the limit: --limit {name}=SECONDS)"
    elif result and result.get("error"):
        error = result["error"]
    else:
        error = f"exit {rc}" + (f" ({signal_name(-rc)})" if rc < 0 else "") + " without a result"
    print(f"FAIL {name} after {seconds:.0f} s: {error}", flush=True)
    if result and "train" in result:
        print(f"  figures: {figures_line(result)}", flush=True)
    for line in tail(log):
        print(f"  | {line[:300]}", flush=True)
    print(f"  kept: {log}, run folder {here / 'run' / name / 'fold0'}", flush=True)
    return Row(name, "FAIL", seconds, error=error, result=result)


def multi_gpu_job(root: Path, deadline: float) -> Row:
    """One 2-GPU effdet job through the command line (gpus=2: one process per card); train img/s over both
    cards from metrics.csv's second epoch, the one that neither starts the workers nor validates."""
    name = "effdet x2"
    left = deadline - time.perf_counter()
    limit = min(MULTI_LIMIT, left)
    if left < MIN_START:
        return Row(name, "SKIP", error="not started: the budget was spent")
    here = root / "multi"
    argv = [sys.executable, "-m", "models", "effdet", "train", "--data", str(root / "data"), "--folds",
            str(root / "folds.csv"), "--fold", "0", "--run-dir", str(here), "--profile", "full", "--set", "gpus=2",
            "weights=null", "epochs=3", "validate_every=3"]
    here.mkdir()
    print(f"{name}: running, limit {limit:.0f} s; log {here / 'log.txt'}", flush=True)
    rc, seconds = run_logged(argv, here / "log.txt", limit)
    metrics = here / "effdet" / "fold0" / "metrics.csv"
    if rc != 0 or not metrics.exists():
        error = "killed at its time limit" if rc is None else f"exit {rc}"
        print(f"FAIL {name} after {seconds:.0f} s: {error}; log {here / 'log.txt'}", flush=True)
        for line in tail(here / "log.txt"):
            print(f"  | {line[:300]}", flush=True)
        return Row(name, "FAIL", seconds, error=error)
    m = pd.read_csv(metrics)
    ips = GPU.n_train / float(m.loc[m["epoch"] == 2, "seconds"].iloc[0])
    print(f"OK {name}: {ips:.1f} train img/s over both cards (epoch 2), whole job {seconds:.0f} s", flush=True)
    return Row(name, "OK", seconds, result={"multi_gpu_train_ips": ips})


# --- the children: the device probe and one model ----------------------------------------------------------


def probe_main(out: Path, smoke: bool) -> None:
    import torch

    from models.common import cuda_problem, device_line

    where = Path(models.__file__).resolve().parent
    if where != REPO / "models":  # the point of putting REPO first: say so instead of checking other code
        raise RuntimeError(f"models imported from {where}, not from the checkout {REPO}")
    problem = None if smoke else cuda_problem()
    cuda = not smoke and problem is None
    line = device_line("cuda" if cuda else "cpu", 1)
    if cuda:
        line += f"; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    elif smoke:
        line += "; --smoke: CPU at 128 px, figures meaningless"
    out.write_text(json.dumps({"cuda": cuda, "problem": problem, "line": line,
                               "gpus": torch.cuda.device_count() if cuda else 0}))


def batch_len(x: Any) -> int:
    """Images in a training step's first argument: a tensor (effdet, classifier), ultralytics' batch dict, or
    detectron2's list of image dicts."""
    if isinstance(x, Mapping):
        x = x.get("img", next((v for v in x.values() if hasattr(v, "shape")), []))
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)


class Hooks:
    """The forward hooks of one model's check.

    Global hooks while they are needed: they find the network being trained (the first module with parameters
    called outside any other module, with gradients on, in train mode: one call per micro-batch, whatever the
    framework), count convolutions in half precision (training, or inference while :meth:`count_inference` is
    on), and carry out ``--fail`` at the first training step. They are removed at the start of micro-batch
    ``warmup``, before the timed steps: a global hook runs Python code in every module call (EfficientDet-D4:
    about 1,500 per forward). A pre-hook on the network itself stamps every micro-batch's start."""

    def __init__(self, cuda: bool, warmup: int, fail: str | None, name: str):
        import torch

        self.torch, self.cuda, self.warmup, self.fail, self.name = torch, cuda, warmup, fail, name
        self.depth = 0
        self.root_handle = None
        self.starts: list[float] = []
        self.sizes: list[int] = []
        self.convs = {"train": [0, 0], "infer": [0, 0]}  # [half, full]
        self.handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        modules = self.torch.nn.modules.module
        self.depth = 0
        self.handles = [modules.register_module_forward_pre_hook(self.pre),
                        modules.register_module_forward_hook(self.post)]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> None:
        self.detach()
        if self.root_handle is not None:
            self.root_handle.remove()
            self.root_handle = None

    def pre(self, module, args) -> None:
        torch = self.torch
        self.depth += 1
        training = torch.is_grad_enabled() and module.training
        if isinstance(module, torch.nn.Conv2d):
            half = (torch.is_autocast_enabled(module.weight.device.type)
                    or module.weight.dtype in (torch.float16, torch.bfloat16))
            self.convs["train" if training else "infer"][0 if half else 1] += 1
        if self.depth == 1 and training and self.root_handle is None and self.trains(module):
            self.root_handle = module.register_forward_pre_hook(self.step)  # from the next call on
            self.step(module, args)

    @staticmethod
    def trains(module) -> bool:
        """Whether ``module`` is a network being trained: trainable parameters, and every submodule in train mode.
        Not ultralytics' Detect head while its model is built: called alone (the model's forward is called as a
        method, which no hook sees) with gradients on to find the strides, in train mode, its layers in eval mode."""
        return (any(p.requires_grad for p in module.parameters())
                and all(m.training for m in module.modules()))

    def post(self, module, args, output) -> None:
        self.depth -= 1

    def step(self, module, args) -> None:
        torch = self.torch
        if not (torch.is_grad_enabled() and module.training):
            return
        if self.fail and not self.starts:
            self.fail_now()
        if self.cuda:  # the stamp marks the end of the previous step's GPU work
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        self.sizes.append(batch_len(args[0]) if args else 0)
        if len(self.starts) == self.warmup + 1:
            self.detach()

    def fail_now(self) -> None:
        if self.fail == "hang":
            print(f"--fail {self.name}:hang: its first training step hangs (until the check's time limit)", flush=True)
            while True:
                time.sleep(60)
        raise RuntimeError(f"forced failure of {self.name} (--fail {self.name}): its first training step raised, as "
                           f"a CUDA error would")

    def count_inference(self) -> None:
        self.convs["infer"] = [0, 0]
        self.attach()

    def share(self, phase: str) -> float | None:
        half, full = self.convs[phase]
        return half / (half + full) if half + full else None


class CardMemory:
    """Peak memory use of the card this process computes on, sampled every 50 ms in a thread while a phase runs:
    ``torch.cuda.mem_get_info`` of torch's current device (the card CUDA_VISIBLE_DEVICES maps it to; a MIG slice
    reports its own memory), so the CUDA context and anything else on the card count; the use when the phase
    starts is kept beside the peak. NVML, a guarded extra: this process's own use on the card of the same UUID,
    where NVML can see this process (not on a MIG slice, not from a PID namespace); None otherwise."""

    def __init__(self):
        import torch

        self.torch = torch
        self.index = torch.cuda.current_device()
        self.failed = ""
        self.nvml = self.nvml_reader()
        self.peak: int | None = 0
        self.before: int | None = 0
        self.process = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def nvml_reader(self) -> Callable[[], int | None] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(self.torch.cuda.get_device_properties(self.index).uuid)
            handle = None
            for name in (f"GPU-{uuid}", f"MIG-{uuid}", uuid):  # by UUID: NVML numbers cards apart from torch
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(name)
                    break
                except pynvml.NVMLError:
                    continue
            if handle is None:
                raise LookupError(f"no NVML device has torch's UUID {uuid}")
            pid = os.getpid()

            def read() -> int | None:
                return next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                             if p.pid == pid), None)

            if read() is None:
                raise LookupError("NVML does not list this process (a PID namespace, or a MIG slice)")
            return read
        except Exception as e:  # no NVML, no permission, a MIG slice: the card figure stands alone
            print(f"note: NVML's per-process memory not available ({type(e).__name__}: {str(e)[:160]})", flush=True)
            return None

    def used(self) -> int | None:
        """The card's used bytes; None once a reading failed (the figure is then n/a, never a silent 0)."""
        if self.failed:
            return None
        try:
            free, total = self.torch.cuda.mem_get_info(self.index)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {str(e)[:160]}"
            print(f"note: torch.cuda.mem_get_info failed, no card memory figure ({self.failed})", flush=True)
            return None
        return total - free

    def __enter__(self) -> CardMemory:
        self.before = self.peak = self.used()
        self.process = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.is_set():
            used = self.used()
            if used is None:
                self.peak = None
                return
            self.peak = max(self.peak or 0, used)
            if self.nvml is not None:
                try:
                    self.process = max(self.process, self.nvml() or 0)
                except Exception:
                    self.nvml = None
            self.stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def figures(self) -> dict[str, int | None]:
        torch = self.torch
        return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                "card": self.peak, "card_before": self.before, "process": self.process or None}


def fresh_phase(cuda: bool) -> None:
    """Memory figures of the next phase belong to it: what the last one left in reference cycles (ultralytics'
    trainer keeps a YOLOv8x alive until a collection) is freed before the allocator's cache is emptied."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def config(name: str, adapter: Any, smoke: bool, workers: int | None, root: Path, data: Any) -> tuple[Any, Any, str]:
    """(the profile as written, the check's config, where its weights come from)."""
    from cxr.config import load

    path = REPO / "models" / name / "full.yaml"
    profile = load(adapter.Config, path)
    overrides = dict(SHORT[name])
    if smoke:
        overrides.update(device="cpu", imgsz=SMOKE.imgsz, workers=0)
    elif workers is not None:
        overrides["workers"] = workers
    if profile.weights and (REPO / profile.weights).is_file():
        return profile, load(adapter.Config, path, {**overrides, "weights": str(REPO / profile.weights)}), \
            f"from {profile.weights}"
    if name == "detectron":  # the full profile's FrozenBN path, from a zoo-format file built here
        start = adapter.frozen_bn_checkpoint(root / "frozen_bn_zoo.pkl", load(adapter.Config, path, overrides),
                                             [data.image("train", i) for i in data.train_sizes["image_id"][:2]])
        return profile, load(adapter.Config, path, {**overrides, "weights": str(start)}), \
            f"{profile.weights} not here: FrozenBN start built here"
    cfg = load(adapter.Config, path, {**overrides, "weights": None})
    return profile, cfg, f"{profile.weights} not here: from scratch"


def predict_speed(name: str, adapter: Any, cfg: Any, data: Any, out: Path, hooks: Hooks, cuda: bool,
                  batches: int | None = None) -> dict[str, Any]:
    """Prediction images/s over the test images (the first ``batches`` batches of them) as ``predict`` runs them
    (the profile's TTA and batch, decoding in loader workers), from the end of the first batch (model load, worker
    start) to the end (TTA fusion included)."""
    import torch

    from models.common import decode_workers, image_batches, predict_split

    infer = adapter.load_infer(cfg, out)
    batch = int(getattr(cfg, "predict_batch", cfg.batch))
    ids = data.test_ids()[: batches * batch if batches else None]
    workers = decode_workers(cfg.workers, "cuda" if cuda else "cpu")
    # the classifier's infer does its flip TTA itself (one call per batch); predict_split calls a detector's
    # infer once per view
    views = 2 if cfg.tta and name != "classifier" else 1
    ends: list[float] = []
    hooks.count_inference()

    def timed(images, *size):
        result = infer(images, *size)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        if len(ends) == views:  # the first batch's convolutions are the sample
            hooks.detach()
        return result

    if name == "classifier":
        for images in image_batches([data.image("test", i) for i in ids], batch, workers):
            timed(images)
    else:
        predict_split(timed, data, "test", ids, cfg.tta, batch, workers=workers)
    done = time.perf_counter()
    images = len(ids) - min(batch, len(ids))
    if not images:
        raise RuntimeError(f"{len(ids)} test images are one batch of {batch}: nothing left to time")
    seconds = done - ends[views - 1]
    return {"ips": images / seconds, "images": images, "seconds": seconds, "batches": math.ceil(len(ids) / batch),
            "views": 2 if cfg.tta else 1}


def check_model(name: str, root: Path, smoke: bool, fail: str | None, workers: int | None) -> dict[str, Any]:
    import torch

    from cxr.data import DataFolder

    size = SMOKE if smoke else GPU
    cuda = not smoke
    adapter = models.adapter(name)
    here = root / name
    data = DataFolder(root / "data")
    profile, cfg, note = config(name, adapter, smoke, workers, here, data)
    folds = pd.read_csv(root / "folds.csv", dtype={"image_id": str})
    n_val = min(int(getattr(cfg, "predict_batch", cfg.batch)), VAL_POOL)
    folds = pd.concat([folds[folds["fold"] == 0].head(n_val), folds[folds["fold"] == 1]], ignore_index=True)
    write_table(folds, here / "folds.csv")
    out = here / "run" / name / "fold0"
    if cuda:
        torch.zeros(1, device="cuda")  # the context exists before the first "before" reading
    memory = CardMemory() if cuda else None

    hooks = Hooks(cuda, size.warmup, fail, name)
    fresh_phase(cuda)
    started = time.perf_counter()
    with memory or _Nothing():
        adapter.train(cfg, data, folds, 0, out)
    train_wall = time.perf_counter() - started
    train_memory = memory.figures() if memory else None
    hooks.close()  # the root's hook too: it holds the trained network
    ips, images, seconds = train_speed(hooks.starts, hooks.sizes, size.warmup)
    train_half = hooks.share("train")

    fresh_phase(cuda)
    started = time.perf_counter()
    with memory or _Nothing():
        # the smoke run: two batches are the path (detectron2's box head costs seconds per CPU batch at any size)
        predicted = predict_speed(name, adapter, cfg, data, out, hooks, cuda, batches=2 if smoke else None)
    predict_wall = time.perf_counter() - started
    hooks.close()
    schedule = Schedule.of(name, profile)
    hours = five_fold_hours(schedule, ips, predicted["ips"])
    accumulate = getattr(cfg, "accumulate", None)
    result = {
        "model": name, "status": "OK", "error": "", "imgsz": cfg.imgsz, "batch": cfg.batch, "note": note,
        "accumulate_text": f" x accumulate {accumulate}" if accumulate else "",
        "train": {"ips": ips, "images": images, "seconds": seconds, "warmup": size.warmup,
                  "micro_batches": len(hooks.starts)},
        "predict": predicted,
        "memory": {"train": train_memory, "predict": memory.figures() if memory else None},
        "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "amp": {"train": train_half if cuda else None, "predict": hooks.share("infer") if cuda else None},
        "schedule": asdict(schedule), "hours": asdict(hours), "hours_parts": hours.parts(),
        "train_wall": train_wall, "predict_wall": predict_wall,
    }
    if cuda and not (min(train_half or 0.0, hooks.share("infer") or 0.0) >= AMP_SHARE):
        result.update(status="FAIL", error=f"AMP was not on: {train_half or 0:.0%} of the training and "
                                           f"{hooks.share('infer') or 0:.0%} of the prediction convolutions ran "
                                           f"in fp16")
    return result


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def child_main(a: argparse.Namespace) -> int:
    """One model's check; ``<root>/<model>/result.json`` holds its figures or its error (status FAIL)."""
    root = Path(a.root)
    started = time.perf_counter()
    path = root / a.child / "result.json"
    try:
        result = check_model(a.child, root, a.smoke, a.fail_mode, a.workers)
    except (Exception, SystemExit) as e:  # the parent prints the error; the traceback stays in the log
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        path.write_text(json.dumps({"model": a.child, "status": "FAIL", "error": f"{type(e).__name__}: {first}"}))
        return 1
    result["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(result, indent=1))
    print(("" if result["status"] == "OK" else f"FAIL: {result['error']}\n") + figures_line(result), flush=True)
    return 0 if result["status"] == "OK" else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models_positional", nargs="?", metavar="MODELS", help=argparse.SUPPRESS)
    p.add_argument("--models", help=f"comma-separated, in this order (default: {','.join(models.names())})")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, 128 px: check that this script works (figures meaningless)")
    p.add_argument("--fail", help="MODEL[:hang][,...]: make that model's first training step raise (or hang), to see "
                                  "the check survive it")
    p.add_argument("--limit", help="SECONDS or MODEL=SECONDS[,...]: per-model time limits (default: "
                                   + ", ".join(f"{k} {v}" for k, v in LIMITS.items()) + " s on a GPU)")
    p.add_argument("--budget", type=float,
                   help=f"seconds for the whole check (default {BUDGET}; --smoke {SMOKE_BUDGET})")
    p.add_argument("--workers", type=int, help="loader workers per model at most (default: each profile's)")
    p.add_argument("--work", help="folder for the check's temporary folder (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder when everything passed")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one model, in its own process (the parent starts it)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--fail-mode", choices=["raise", "hang"], help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.child:
        sys.exit(child_main(a))
    if a.probe:
        probe_main(Path(a.probe), a.smoke)
        return
    if a.models_positional:  # the old form: gpu_check.sh yolo,effdet
        a.models = a.models or a.models_positional
    with one_line_errors():
        plan = Plan.of(a)
        code = run(plan)
    sys.exit(code)


if __name__ == "__main__":
    main()
