"""GPU check of every full profile at its own size: a few AMP training steps, one prediction pass, the
figures that size a real run (prints figures; needs CUDA; not a test).

    bash bench/gpu_check.sh [yolo,effdet]          # = .venv/bin/python bench/gpu_check.py [--models ...]
    .venv/bin/python bench/gpu_check.py --smoke    # CPU, 128 px: does this script run (figures meaningless)

Per model, ``models/<name>/full.yaml`` as written (its image size: 1024 px, the classifier 768; its
batch, accumulation, AMP, TTA), except a schedule of a few steps; without the ``make weights`` file
yolo/effdet/classifier start from scratch and detectron2 from a FrozenBN zoo-format checkpoint built
here (``models.detectron.detectron.frozen_bn_checkpoint``), so the full profile's FrozenBN path runs.

* data: synthetic 1024-px radiographs, made in parallel (one process per core);
* training through the adapter's own ``train``; AMP is asserted: a global forward hook counts the
  training convolutions that ran under autocast (or in fp16) and fails the model below 95 %;
* one prediction pass over the test images through ``load_infer`` (fp16 asserted the same way);
* printed per model: train and predict images/s (steady state: the last epoch, or detectron2's
  per-iteration time; prediction after its first batch), peak memory of the allocator (allocated,
  reserved) and of the device (NVML, sampled; the CUDA context included), and the hours a 5-fold
  run of the profile would take on this card (15,000 train images, 3,000 test; validation and
  prediction at the measured prediction speed).

On a machine with several GPUs it also runs one 2-GPU effdet job (``gpus=2``) and prints its speed.
About 3-5 minutes on one H100/H200-class GPU (8 at most).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

import models
from cxr.config import load
from cxr.data import DataFolder
from cxr.io import write_table
from cxr.synth import SynthConfig, generate
from models.common import cpu_count, decode_workers, device_line, image_batches, predict_split

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, N_TEST = 48, 16, 48  # per bench fold: 48 training images = 3 optimizer updates of effdet's 16
REAL = {"train": 12_000, "val": 3_000, "test": 3_000, "folds": 5}  # VinBigData: 15,000 train images, 5 folds
# a schedule of a few steps; the last epoch (or detectron2's per-iteration time) gives the steady state
SHORT = {
    "yolo": {"epochs": 3, "close_mosaic": 0, "patience": 0},
    "detectron": {"epochs": 5, "validate_every": 5},  # 5 x 48 / 4 = 60 iterations
    "effdet": {"epochs": 3, "validate_every": 3},  # epoch 2: steady state without validation (train_speed)
    "classifier": {"epochs": 3, "validate_every": 3},
}


def synth_part(job: tuple[str, int, int, int, int]) -> str:
    out, n_train, n_test, size, seed = job
    return str(generate(SynthConfig(out=out, n_train=n_train, n_test=n_test, size=size, seed=seed)))


def make_data(root: Path, size: int, n_train: int, n_test: int) -> DataFolder:
    """A synthetic data folder at ``size`` px, generated in one process per core (chunks with their own
    seeds, then merged: the image ids are hashes, unique across seeds)."""
    parts = max(1, min(cpu_count(), (n_train + n_test) // 4))
    jobs = [(str(root / f"part{k}"), len(range(k, n_train, parts)), len(range(k, n_test, parts)), size, k)
            for k in range(parts)]
    with ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
        folders = [Path(p) for p in pool.map(synth_part, jobs)]
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
    return DataFolder(out)


class Precision:
    """A global forward hook: how many convolutions ran in half precision (autocast or fp16 weights), in
    training (grad on, module in train mode) and in inference."""

    def __init__(self):
        self.counts = {"train": [0, 0], "infer": [0, 0]}  # [half, full]
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.weight.is_cuda:
            half = torch.is_autocast_enabled("cuda") or module.weight.dtype in (torch.float16, torch.bfloat16)
            self.counts["train" if torch.is_grad_enabled() and module.training else "infer"][0 if half else 1] += 1

    def share(self, phase: str) -> float:
        half, full = self.counts[phase]
        return half / (half + full) if half + full else float("nan")

    def reset(self) -> None:
        self.counts = {"train": [0, 0], "infer": [0, 0]}


class DeviceMemory:
    """The device's used memory (NVML: every allocation and the CUDA context), sampled every 0.1 s; its peak."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.peak, self.stop = 0, threading.Event()

    def __enter__(self) -> DeviceMemory:
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class NoMemory:
    peak = 0

    def __enter__(self) -> NoMemory:
        return self

    def __exit__(self, *exc) -> None:
        pass


def train_speed(name: str, cfg, out: Path, n_train: int) -> float:
    """Steady-state training images/s from the run's own log: effdet/classifier their second epoch (it does
    not validate), yolo its last (incl. its validation of the 16 bench images), detectron2 its last logged
    seconds per iteration."""
    if name == "detectron":
        rows = [json.loads(line) for line in (out / "train" / "metrics.json").read_text().splitlines() if line.strip()]
        return cfg.batch / [r for r in rows if "time" in r][-1]["time"]
    if name == "yolo":
        t = pd.read_csv(out / "train" / "results.csv")["time"].to_numpy()
        return n_train / (t[-1] - t[-2])
    seen = n_train // cfg.batch * cfg.batch if n_train > cfg.batch else n_train  # drop_last
    return seen / training_seconds(pd.read_csv(out / "metrics.csv"))


def training_seconds(metrics: pd.DataFrame) -> float:
    """Seconds of the last epoch that did not validate (metrics.csv's ``seconds`` counts validation too)."""
    score = next(c for c in ("val_map", "val_auc") if c in metrics)
    return float(metrics.loc[metrics[score].isna(), "seconds"].iloc[-1])


def predict_speed(name: str, adapter, cfg, data: DataFolder, out: Path) -> float:
    """Prediction images/s over the test images as ``predict`` runs them (the profile's TTA and batch,
    decoding in loader workers), timed from the end of the first batch (model load and worker start aside)."""
    infer = adapter.load_infer(cfg, out)
    ends: list[float] = []

    def timed(images):
        result = infer(images)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        ends.append(time.perf_counter())
        return result

    ids = data.test_ids()
    batch = int(getattr(cfg, "predict_batch", cfg.batch))
    workers = decode_workers(cfg.workers, "cuda" if torch.cuda.is_available() else "cpu")
    if name == "classifier":  # probabilities, not boxes: the images themselves (its infer does the flip TTA)
        for images in image_batches([data.image("test", i) for i in ids], batch, workers):
            timed(images)
        views = 1
    else:  # predict_split calls infer once per view (flip TTA: 2) and batch
        predict_split(timed, data, "test", ids, cfg.tta, batch, workers=workers)
        views = 2 if cfg.tta else 1
    after_first = len(ids) - min(batch, len(ids))
    return after_first / (ends[-1] - ends[views - 1]) if after_first else float("nan")


def five_fold_hours(name: str, cfg, train_ips: float, predict_ips: float) -> tuple[float, str]:
    """Hours of ``make oof`` for this profile on this card: training + validation + the fold's predictions,
    5 folds of 12,000 training / 3,000 validation images, 3,000 test images."""
    val_ips = predict_ips * (2 if cfg.tta else 1)  # validation runs without TTA
    train_s = cfg.epochs * REAL["train"] / train_ips
    validations = math.ceil(cfg.epochs / cfg.validate_every)
    val_s = validations * REAL["val"] / val_ips
    predict_s = (REAL["val"] + REAL["test"]) / predict_ips
    hours = REAL["folds"] * (train_s + val_s + predict_s) / 3600
    return hours, (f"per fold: train {train_s / 3600:.1f} h, {validations} validations {val_s / 3600:.1f} h, "
                   f"predictions {predict_s / 60:.0f} min")


def check_model(name: str, data: DataFolder, folds: pd.DataFrame, root: Path, smoke: bool, precision: Precision | None,
                memory) -> bool:
    adapter = models.adapter(name)
    profile = REPO / "models" / name / "full.yaml"
    overrides = dict(SHORT[name])
    if smoke:  # the code paths only: 128 px, fewer steps
        overrides.update(device="cpu", imgsz=128, workers=0, **({"epochs": 2, "validate_every": 2} if name == "detectron" else {}))
    cfg = load(adapter.Config, profile, overrides)
    if cfg.weights and not (REPO / cfg.weights).is_file():
        if name == "detectron":  # the full profile's FrozenBN path, from a zoo-format file built here
            start = adapter.frozen_bn_checkpoint(root / "frozen_bn_zoo.pkl", cfg,
                                                 [data.image("train", i) for i in data.train_sizes["image_id"][:2]])
            overrides["weights"] = str(start)
            note = f"{cfg.weights} not here: FrozenBN start built here"
        else:
            overrides["weights"] = None
            note = f"{cfg.weights} not here: from scratch"
        cfg = load(adapter.Config, profile, overrides)
    else:
        cfg = load(adapter.Config, profile, {**overrides, "weights": str(REPO / cfg.weights) if cfg.weights else None})
        note = f"from {cfg.weights}"
    out = root / "run" / name / "fold0"
    n_train = int((folds["fold"] != 0).sum())
    cuda = torch.cuda.is_available() and not smoke
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if precision:
        precision.reset()
    started = time.perf_counter()
    with memory as m:
        adapter.train(cfg, data, folds, 0, out)
    train_wall, train_device = time.perf_counter() - started, m.peak
    train_alloc = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
    train_half = precision.share("train") if precision else float("nan")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if precision:
        precision.reset()
    with memory as m:
        predict_ips = predict_speed(name, adapter, cfg, data, out)
    predict_device = m.peak
    predict_alloc = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
    predict_half = precision.share("infer") if precision else float("nan")
    train_ips = train_speed(name, cfg, out, n_train)
    hours, parts = five_fold_hours(name, cfg, train_ips, predict_ips)
    gib = 2**30
    print(f"{name} full ({cfg.imgsz} px, batch {cfg.batch}{f' x accumulate {cfg.accumulate}' if hasattr(cfg, 'accumulate') else ''}"
          f", {note}): train {train_ips:.1f} img/s, predict {predict_ips:.1f} img/s{' (flip TTA)' if cfg.tta else ''}; "
          f"peak memory train {train_alloc[0] / gib:.1f} allocated / {train_alloc[1] / gib:.1f} reserved / "
          f"{train_device / gib:.1f} device GiB, predict {predict_alloc[0] / gib:.1f} / {predict_alloc[1] / gib:.1f} / "
          f"{predict_device / gib:.1f} GiB; AMP share of convolutions: train {train_half:.0%}, predict {predict_half:.0%}; "
          f"5-fold run on this card: {hours:.1f} h ({parts}); whole check {train_wall:.0f} s", flush=True)
    if smoke:
        return True
    ok = train_half >= 0.95 and predict_half >= 0.95
    if not ok:
        print(f"FAIL {name}: AMP was not on (train {train_half:.0%}, predict {predict_half:.0%} of convolutions in fp16)")
    return ok


def multi_gpu_job(data: Path, folds: Path, root: Path) -> bool:
    """One 2-GPU effdet job through the command line (gpus=2: one process per card)."""
    argv = [sys.executable, "-m", "models", "effdet", "train", "--data", str(data), "--folds", str(folds), "--fold", "0",
            "--run-dir", str(root / "multi"), "--profile", "full", "--set", "gpus=2", "weights=null", "epochs=3",
            "validate_every=3"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(f"FAIL effdet gpus=2: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return False
    metrics = pd.read_csv(root / "multi" / "effdet" / "fold0" / "metrics.csv")
    line = next((x for x in done.stdout.splitlines() if x.startswith("effdet: ")), "")
    print(f"effdet full on 2 GPUs: {N_TRAIN / training_seconds(metrics):.1f} train img/s over both cards "
          f"(epoch 2), whole job {wall:.0f} s; {line}", flush=True)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(models.names()))
    p.add_argument("--smoke", action="store_true", help="CPU, 128 px: check that this script runs (no GPU figures)")
    a = p.parse_args()
    names = a.models.split(",")
    unknown = [n for n in names if n not in models.MODELS]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; known: {', '.join(models.names())}")
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("error: gpu_check needs a usable CUDA GPU (--smoke runs it on the CPU at 128 px)")
    print(device_line("cuda" if not a.smoke else "cpu", 1), flush=True)
    started = time.perf_counter()
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        size, (n_train, n_val, n_test) = (128, (16, 8, 8)) if a.smoke else (1024, (N_TRAIN, N_VAL, N_TEST))
        data = make_data(root, size, n_train + n_val, n_test)
        ids = data.train_sizes["image_id"].tolist()
        folds = pd.DataFrame({"image_id": ids, "fold": [0 if k < n_val else 1 for k in range(len(ids))]})
        write_table(folds, root / "folds.csv")
        print(f"data: {len(ids)} train + {n_test} test synthetic images at {size} px in {time.perf_counter() - started:.0f} s "
              f"({cpu_count()} processes)", flush=True)
        precision = None if a.smoke else Precision()
        memory = NoMemory() if a.smoke else DeviceMemory()
        for name in names:
            ok &= check_model(name, data, folds, root, a.smoke, precision, memory)
        if precision:
            precision.handle.remove()
        if not a.smoke and torch.cuda.device_count() >= 2:
            ok &= multi_gpu_job(data.root, root / "folds.csv", root)
    print(f"gpu_check {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
