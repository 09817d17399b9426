"""What every training run shows and keeps per epoch, the same for all four models.

* ``metrics.csv`` in the fold folder, one row per epoch, the same columns for every model
  (:data:`COLUMNS`): ``epoch, train_loss, val_loss, <score>, lr, seconds``, where the score is
  ``val_map`` for the detectors (mAP@0.4 of the competition metric, ``cxr.metric``, on the
  validation fold) and ``val_auc`` for the classifier (ROC AUC). An epoch that did not validate
  leaves its validation cells empty; its printed line leaves them out (never ``nan``).
* TensorBoard events in ``<fold>/tensorboard/`` under the same names for every model
  (:data:`TAGS`), step = epoch. ultralytics and detectron2 also write their own events (every loss
  term, their own metrics) in ``<fold>/train/``; ``make tensorboard NAME=...`` shows them all.
* :class:`Progress`: the in-epoch progress line of the hand-written loops (steps, loss, images/s,
  the ETA of the epoch and of the run), at most one every ``every_s`` seconds. ultralytics' bar and
  detectron2's metric printer show their own.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cxr.io import write_table

SCORE = {"detections": "val_map", "probabilities": "val_auc"}  # by the adapter's OUTPUT
COLUMNS = ("epoch", "train_loss", "val_loss", "val_map", "val_auc", "lr", "seconds")  # val_map or val_auc, not both
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_map": "val/mAP@0.4", "val_auc": "val/AUC", "lr": "lr"}
TENSORBOARD = "tensorboard"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def epoch_line(row: dict[str, Any]) -> str:
    """``epoch 3 train_loss 0.812 val_map 0.113 lr 0.001 seconds 41.2``: the cells an epoch has."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if not _missing(v))


class Curves:
    """``metrics.csv`` and TensorBoard scalars of one fold's training (rank 0 only).

    ``log``: the rows of the epochs done before a resume (restored from the checkpoint), kept in
    ``metrics.csv``; the events of those epochs are already in the folder's earlier event file.
    ``tensorboard=False``: metrics.csv only (the tests of the writer, or a framework that is made to
    write these tags into its own writer)."""

    def __init__(self, out: Path, log: list[dict] | None = None, tensorboard: bool = True):
        self.out, self.log = Path(out), list(log or [])
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / TENSORBOARD))

    def add(self, row: dict[str, Any], quiet: bool = False) -> None:
        """One epoch: printed on one line (unless ``quiet``), appended to metrics.csv, sent to TensorBoard."""
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown or "epoch" not in row:
            raise ValueError(f"metrics row needs 'epoch' and only {COLUMNS}, got {sorted(row)}")
        row = {k: (None if _missing(v) else v) for k, v in row.items()}
        self.log.append(row)
        if not quiet:
            print(epoch_line(row), flush=True)
        write_table(pd.DataFrame(self.log, columns=[c for c in COLUMNS if any(c in r for r in self.log)]),
                    self.out / "metrics.csv")
        if self.writer is not None:
            for k, tag in TAGS.items():
                if row.get(k) is not None:
                    self.writer.add_scalar(tag, float(row[k]), int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """In-epoch progress of a hand-written loop with an ETA; one line at most every ``every_s`` seconds,
    and after the epoch's last step. The ETA of the run counts the steps left in this and the later
    epochs at this epoch's speed (validation time not included)."""

    def __init__(self, epochs: int, steps: int, batch: int, every_s: float = 30.0, enabled: bool = True):
        self.epochs, self.steps, self.batch, self.every_s, self.enabled = epochs, max(1, steps), batch, every_s, enabled
        self.started = self.shown = 0.0
        self.epoch = 0
        self.loss_sum, self.n = 0.0, 0
        self.on_step: Callable[[int], None] | None = None  # called with the steps done (a mid-epoch checkpoint)

    def start(self, epoch: int, steps: int | None = None) -> None:
        """A new epoch (``steps``: its micro-batches, fewer in an epoch resumed in the middle)."""
        self.epoch, self.loss_sum, self.n = epoch, 0.0, 0
        self.steps = max(1, steps) if steps is not None else self.steps
        self.started = self.shown = time.perf_counter()

    def step(self, loss: float) -> None:
        self.loss_sum, self.n = self.loss_sum + loss, self.n + 1
        if self.on_step is not None:
            self.on_step(self.n)
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= self.every_s or self.n == self.steps):
            self.shown = now
            print(self.line(now), flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.perf_counter()) - self.started)
        per_step = elapsed / max(1, self.n)
        left_epoch = (self.steps - self.n) * per_step
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps * per_step
        return (f"epoch {self.epoch + 1}/{self.epochs} step {self.n}/{self.steps} loss {self.loss_sum / max(1, self.n):.4g} "
                f"{self.n * self.batch / elapsed:.1f} img/s, epoch ETA {_clock(left_epoch)}, run ETA {_clock(left_run)}")
