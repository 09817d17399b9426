"""One training job on several processes (``gpus: N`` or torchrun), run as 2 gloo ranks on the CPU.

For the hand-written loops (effdet, classifier) a probe runs the real entry point under
``torch.distributed.run`` and records, per rank, the training and validation images its datasets
served, the files it wrote (every output goes through ``os.replace``) and a digest of the trained
weights: each rank saw a disjoint half of the fold, the ranks validated disjoint halves together,
the weights agree, and only rank 0 wrote, each file once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import images_by_finding, model_args

PROBE = '''
import hashlib, importlib, json, os, sys
from pathlib import Path

import torch

from models.__main__ import main

model = sys.argv[1]  # only its adapter is imported, as the entry point does
adapter = importlib.import_module(f"models.{model}.{model}")

seen = {"train": [], "val": []}
writes, wrapped = [], []


def recording(cls, name_of):
    original = cls.__getitem__

    def getitem(self, i):  # the training set is the augmented one: Resize, 3 augmentations, Normalize
        seen["train" if len(self.transform.transforms) > 2 else "val"].append(name_of(self, i))
        return original(self, i)

    cls.__getitem__ = getitem


if model == "effdet":
    recording(adapter.Boxes, lambda self, i: self.ids[i])
else:
    recording(adapter.Images, lambda self, i: Path(self.paths[i]).stem)
real_replace = os.replace


def replace(src, dst, *args, **kwargs):  # cxr.io.atomic_path: every output file lands through os.replace
    writes.append(os.path.basename(dst))
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
DDP = torch.nn.parallel.DistributedDataParallel
real_init = DDP.__init__


def init(self, module, *args, **kwargs):
    wrapped.append(module)
    real_init(self, module, *args, **kwargs)


DDP.__init__ = init
main(sys.argv[1:])
flat = torch.cat([p.detach().flatten() for p in wrapped[0].parameters()])
digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
rank = os.environ["RANK"]
Path(os.environ["PROBE_OUT"], f"rank{rank}.json").write_text(json.dumps(
    {"seen": seen, "writes": writes, "params": digest, "world": os.environ["WORLD_SIZE"]}))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_folds(fold_setup):
    """8 training and 4 validation images (abnormal and normal ones): two micro-batches of 2 per rank, and
    both labels among the validation images (the classifier's AUC)."""
    data, _, run = fold_setup
    abnormal, normal = images_by_finding(data)
    ids = abnormal[:8] + normal[:4]
    path = run / "small_folds.csv"
    pd.DataFrame({"image_id": ids, "fold": [1] * 6 + [0] * 2 + [1] * 2 + [0] * 2}).to_csv(path, index=False)
    return data, path, run


def torchrun(model: str, setup, tmp_path: Path, *overrides: str) -> tuple[dict, dict, float]:
    """Train fold 0 of ``setup`` for one epoch under ``torch.distributed.run`` with 2 gloo ranks on the CPU,
    loopback only; returns the probe records of ranks 0 and 1 and the wall time."""
    (tmp_path / "probe.py").write_text(PROBE)
    argv = model_args(model, "train", setup, "--set", "epochs=1", "workers=0", "gpus=2", "device=cpu", *overrides,
                      run=tmp_path / "run")
    env = {**os.environ, "PROBE_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(tmp_path / "probe.py"), *argv],
                          capture_output=True, text=True, timeout=600, env=env)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1 train_loss") == 1  # rank 0 alone logs...
    assert done.stdout.count("epoch 1/1 step 2/2 ") == 1  # ...and shows the progress (2 micro-batches per rank)
    return (*(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)), wall)


@pytest.mark.parametrize("model, overrides", [
    ("effdet", ["imgsz=128", "batch=2", "accumulate=2"]),  # no_sync while accumulating, DDP over the train bench
    ("classifier", ["imgsz=64", "batch=2"]),
])
def test_two_ranks_split_the_fold_agree_and_write_once(model, overrides, small_folds, tmp_path, figures):
    r0, r1, wall = torchrun(model, small_folds, tmp_path, *overrides)
    folds = pd.read_csv(small_folds[1], dtype={"image_id": str})
    train_ids, val_ids = set(folds.loc[folds["fold"] != 0, "image_id"]), set(folds.loc[folds["fold"] == 0, "image_id"])
    # each rank trained on its own half of the fold (one epoch: each image once)
    a, b = r0["seen"]["train"], r1["seen"]["train"]
    assert len(a) == len(set(a)) == len(b) == len(train_ids) // 2 and not set(a) & set(b)
    assert set(a) | set(b) == train_ids
    # ...and validated its own half of the validation images, together with the other rank
    assert not set(r0["seen"]["val"]) & set(r1["seen"]["val"]) and set(r0["seen"]["val"]) | set(r1["seen"]["val"]) == val_ids
    assert r0["params"] == r1["params"]  # DDP kept the ranks' weights equal
    assert r1["writes"] == []  # only rank 0 writes...
    once = Counter(r0["writes"])
    assert once["config.yaml"] == once["labels.csv"] == once["weights.pt"] == once["metrics.csv"] == 1, once
    out = tmp_path / "run" / model / "fold0"
    assert {"config.yaml", "labels.csv", "best.pt", "weights.pt", "metrics.csv"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    figures(f"{model} under torchrun, 2 gloo ranks, {len(train_ids)} + {len(val_ids)} images, 1 epoch: {wall:.0f} s")


def test_gpus_without_torchrun_launch_the_ranks_themselves(small_folds, tmp_path, figures):
    """gpus: 2 (make's SET / the scheduler's --set gpus=N) starts the 2 ranks itself (torchrun's environment
    on a free local port) and trains the same as under torchrun."""
    argv = model_args("classifier", "train", small_folds, "--set", "epochs=1", "workers=0", "gpus=2", "device=cpu",
                      "imgsz=64", "batch=2", run=tmp_path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "models", *argv], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "classifier: 2 x batch 2 x accumulate 1 = nominal batch 4" in done.stdout
    assert done.stdout.count("epoch 1 train_loss") == 1
    metrics = pd.read_csv(tmp_path / "classifier" / "fold0" / "metrics.csv")
    assert len(metrics) == 1 and (tmp_path / "classifier" / "fold0" / "weights.pt").exists()
    figures(f"classifier gpus=2 on the CPU (2 spawned gloo ranks), 1 epoch: {wall:.0f} s")


def test_torchrun_with_another_gpus_value_is_one_line(small_folds, tmp_path):
    """Under torchrun the job's GPU count is torchrun's; a config that says otherwise stops on every rank."""
    argv = model_args("classifier", "train", small_folds, "--set", "epochs=1", "device=cpu", run=tmp_path)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "models", *argv],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "error: gpus: torchrun started 2 processes but gpus is 1: add --set gpus=2" in done.stderr
    assert not (tmp_path / "classifier").exists()
