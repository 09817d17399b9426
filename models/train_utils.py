"""The training toolkit of the hand-written loops (``models/effdet``, ``models/classifier``).

One optimizer step, one schedule, one EMA and one checkpoint format for both, so the two loops
cannot drift apart again:

* :func:`make_optimizer`: AdamW (decoupled weight decay) or SGD with Nesterov momentum.
* :func:`cosine_schedule`: linear warmup then cosine decay towards 0, per optimizer update
  (timm's ``CosineLRScheduler``); update ``k`` (1-based) runs at ``schedule(k)``, so the
  first and the last update both have a non-zero learning rate.
* :class:`Stepper`: autocast + GradScaler (AMP on GPU), gradient accumulation (``accumulate``
  micro-batches per update; an epoch's last, partial group still makes an update), gradient
  clipping, the optimizer and schedule step, and an EMA of the weights (timm's ``ModelEmaV3``)
  updated after every update. A non-finite loss stops the run with a clear message.
* :func:`save_checkpoint` / :func:`resume`: ``last.pt`` holds the model, the EMA, the optimizer,
  the schedule, the GradScaler, the update count and the epoch log; a killed run continues
  from the epoch after the last one saved, with the same learning rate, loss scale and curves.
* :func:`run_epochs`: the epoch loop both share: training with an in-epoch progress line
  (:class:`models.curves.Progress`), validation every ``validate_every`` epochs and at the last one,
  the curves (:class:`models.curves.Curves`: ``metrics.csv``, TensorBoard events, one line per epoch),
  ``best.pt`` (the best validation epoch's weights), ``last.pt`` while training, and at the end ``weights.pt`` =
  the FINAL weights (the EMA where there is one), which marks a finished run (``last.pt`` is then deleted). :func:`trained_checkpoint`:
  the file ``predict`` loads, ``best.pt`` or ``weights.pt`` as the config's ``checkpoint`` says.
* :func:`augmentations`: the albumentations training augmentation of both (flip, affine, brightness
  and contrast) from the shared augmentation keys.

* :func:`launch`, :func:`init_distributed`: one job on several GPUs (``gpus: N``) or under
  ``torchrun``: the same code path, one process per GPU (gloo processes on the CPU, for tests).
* :func:`train_loader`, :func:`eval_loader`: per-rank shards (``DistributedSampler``), per-rank
  augmentation seeds in the workers, pinned memory and persistent workers.

Validation mAP (shared with detectron2's hook, split across ranks) is :func:`models.common.validation_map`.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import albumentations as A
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from cxr.io import DataError, atomic_path
from models.common import (cpu_count, device, loader_workers, rank_world, scale_for_gpus, snapshot_epochs, snapshot_path,
                           trained_weights)
from models.curves import Curves, Progress


def launch(fn: Callable[..., Any], processes: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``processes`` processes of this machine with the environment torchrun gives
    them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT = a free local port), so
    ``gpus: N`` and ``torchrun --nproc_per_node N`` run the same code. In this process when
    ``processes`` is 1 or a launcher (torchrun) started this one."""
    if processes == 1 or "RANK" in os.environ:
        fn(*args)
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the ranks share the job's cores instead of each taking all (set before the children import torch,
    # as torchrun does, so OpenMP and the loader workers see it too)
    threads = str(max(1, cpu_count() // processes))
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = saved or threads
    try:
        torch.multiprocessing.start_processes(_launched, args=(fn, processes, port, args), nprocs=processes,
                                              start_method="spawn")
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]


def _launched(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def init_distributed(dev: str) -> tuple[int, int, str]:
    """Join the process group a launcher set up (torchrun or :func:`launch`; NCCL on GPU, gloo on the
    CPU): (rank, world size, this rank's device). Without a launcher: (0, 1, ``dev``)."""
    if "RANK" not in os.environ:
        return 0, 1, dev
    if dev.startswith("cuda"):
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # NCCL's default 10-minute timeout holds: the ranks validate together (validation_map splits the
        # images), and rank 0 alone only writes checkpoints, seconds each
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def start_rank(cfg: Any, prepare: Callable[[], Any]) -> tuple[int, int, str, int, float, int]:
    """The start that every rank of a hand-written loop shares (effdet, classifier): join the process
    group, rank 0 runs ``prepare`` (the fold's labels.csv) while the others wait for it, cuDNN tunes its
    kernels once for the profile's fixed training size, and every rank starts from the same weights
    (``cfg.seed``). Returns (rank, world, device, accumulate, lr factor, loader workers) for this world
    size (:func:`models.common.scale_for_gpus`, :func:`models.common.loader_workers`)."""
    rank, world, dev = init_distributed(device(cfg.device))
    if rank == 0:
        prepare()
    if world > 1:
        dist.barrier()  # labels.csv is written
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every batch has the profile's fixed size: tune the kernels once
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    accumulate, lr_factor = scale_for_gpus(cfg.accumulate, world)
    return rank, world, dev, accumulate, lr_factor, loader_workers(cfg.workers, world)


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its convolution weights in channels-last (NHWC) memory order, which its
    convolutions then follow. For the EfficientNet networks here (depthwise convolutions, BatchNorm) a
    training step on one CPU thread ran at 1.4x the images/s (128 px: effdet Lite0 22 -> 31, classifier
    28 -> 41), and NHWC is the layout cuDNN's tensor-core kernels use under AMP. Not for detectron2's
    GroupNorm ResNet: 0.30 -> 0.33 s per iteration."""
    return model.to(memory_format=torch.channels_last)


class EpochSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` on every world size (one rank too): each epoch's order is a function of the
    seed and the epoch alone (``set_epoch``), so a run resumed in the middle of an epoch sees that epoch's
    order again and ``skip`` (samples of this rank, for the resumed epoch only) leaves out what it had done."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def train_loader(ds: torch.utils.data.Dataset, batch: int, workers: int, seed: int, dev: str,
                 collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """The training loader of one rank. An :class:`EpochSampler` shuffles every epoch from the seed and
    the epoch; with several ranks each gets a disjoint shard and the tail that does not divide is dropped,
    so shards never overlap. The loader's generator (``seed + rank``) draws the workers' seeds
    (:func:`seed_worker`), so ranks augment differently and a run repeats. ``ds.transform`` is an
    albumentations pipeline (seeded here for ``workers=0``)."""
    rank, world = rank_world()
    sampler = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=world > 1)
    ds.transform.set_random_seed(seed + rank)  # without workers; with workers seed_worker reseeds each copy
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        drop_last=len(ds) // world > batch, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed + rank),
        pin_memory=dev.startswith("cuda"), persistent_workers=workers > 0)


def eval_loader(ds: torch.utils.data.Dataset, batch: int, workers: int, dev: str,
                collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """A validation loader (in order; pinned memory and persistent workers on GPU)."""
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_fn,
                                       pin_memory=dev.startswith("cuda"), persistent_workers=workers > 0)


def make_optimizer(params, name: Literal["adamw", "sgd"], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def updates_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer updates in an epoch of ``batches`` micro-batches (a last partial group counts)."""
    return max(1, math.ceil(batches / accumulate))


def cosine_schedule(opt: torch.optim.Optimizer, epochs: int, updates: int, warmup_epochs: float) -> CosineLRScheduler:
    """Linear warmup over ``warmup_epochs`` (update k of W at k/W of the peak), then one cosine
    half-period that would reach 0 one update after the last of ``epochs * updates``."""
    total = max(1, epochs * updates)
    warmup = min(total, max(1, int(warmup_epochs * updates)))
    return CosineLRScheduler(opt, t_initial=total - warmup + 1, lr_min=0.0, warmup_t=warmup, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)


class Stepper:
    """Turns micro-batch losses into optimizer updates: AMP, accumulation, clipping, schedule, EMA.

    ``model`` is what the optimizer trains (possibly DistributedDataParallel-wrapped); ``averaged``
    is the module whose weights the EMA follows (the unwrapped network), ``ema_decay=None``: no EMA.
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: CosineLRScheduler, *,
                 device: str, amp: bool, clip_grad: float | None, accumulate: int = 1,
                 averaged: torch.nn.Module | None = None, ema_decay: float | None = None):
        self.model, self.opt, self.sched = model, opt, sched
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp)
        self.clip_grad, self.accumulate = clip_grad, max(1, accumulate)
        self.averaged = averaged if averaged is not None else model
        self.ema = ModelEmaV3(self.averaged, decay=ema_decay) if ema_decay is not None else None
        self.updates = 0  # optimizer updates done
        self._pending = 0  # micro-batches accumulated since the last update

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device_type, enabled=self.scaler.is_enabled())

    def step(self, loss: torch.Tensor, last: bool, epoch: int) -> None:
        """Backward of one micro-batch's loss; an optimizer update every ``accumulate`` or at ``last``."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in epoch {epoch + 1}: lower lr or check the labels")
        self._pending += 1
        update = last or self._pending == self.accumulate
        no_sync = getattr(self.model, "no_sync", None)  # DDP: all-reduce once per update, not per micro-batch
        with no_sync() if no_sync is not None and not update else contextlib.nullcontext():
            self.scaler.scale(loss / self.accumulate).backward()
        if not update:
            return
        self.sched.step_update(self.updates + 1)  # the learning rate of update k is schedule(k)
        if self.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1
        self._pending = 0
        if self.ema is not None:
            self.ema.update(self.averaged, step=self.updates)  # step 1 copies the weights (timm: decay 0)

    def final_model(self) -> torch.nn.Module:
        """What is validated and saved: the EMA of the weights, or the weights without EMA."""
        return self.ema.module if self.ema is not None else self.averaged

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @property
    def between_updates(self) -> bool:
        """No micro-batch waits for its update: a checkpoint here loses nothing."""
        return self._pending == 0

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.updates = state["updates"]


def microbatches(loader) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` over ``loader``: the last micro-batch flushes a partial accumulation."""
    n = len(loader)
    for i, batch in enumerate(loader):
        yield batch, i == n - 1


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's albumentations pipeline (``dataset.transform``,
    which ignores global seeds) from torch's per-worker seed, itself drawn from the run's seed, so two
    runs with the same seed see the same augmentations."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def save_checkpoint(path: Path, model: torch.nn.Module, stepper: Stepper, epoch: int, best: float, log: list[dict],
                    step: int = 0) -> None:
    """``last.pt``: everything :func:`resume` needs, written atomically (a kill never leaves half a file).
    ``epoch``: the last epoch done (0-based; -1: none); ``step``: micro-batches of this rank done in the
    next epoch (a mid-epoch checkpoint, :class:`MidEpochCheckpoints`)."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), **stepper.state_dict(), "epoch": epoch, "best": best, "log": log,
                    "step": step}, tmp)


def resume(path: Path, model: torch.nn.Module, stepper: Stepper, device: str) -> tuple[int, float, list[dict], int]:
    """(first epoch to run, best score so far, log, micro-batches of that epoch already done) from ``path``;
    (0, -inf, [], 0) when there is none."""
    if not path.exists():
        return 0, -math.inf, [], 0
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if "updates" not in ckpt:
        raise DataError(path, "checkpoint written by an older version of this loop: delete it (or the fold folder) "
                              "to train this fold again")
    model.load_state_dict(ckpt["model"])
    stepper.load_state_dict(ckpt)
    step = ckpt.get("step", 0)
    where = f"in epoch {ckpt['epoch'] + 2} after step {step}" if step else f"after epoch {ckpt['epoch'] + 1}"
    print(f"resuming {where} ({path}, {stepper.updates} updates done)")
    return ckpt["epoch"] + 1, ckpt["best"], ckpt["log"], step


def augmentations(cfg: Any) -> list[A.BasicTransform]:
    """The training augmentation of the albumentations loops from the shared keys: a horizontal flip
    (p = ``fliplr``), one affine draw (``translate``, ``scale``, ``degrees``; p=0.5) and brightness and
    contrast jitter (``brightness_contrast``; p=0.5)."""
    t, s, d, bc = cfg.translate, cfg.scale, cfg.degrees, cfg.brightness_contrast
    return [A.HorizontalFlip(p=cfg.fliplr),
            A.Affine(translate_percent=(-t, t), scale=(1 - s, 1 + s), rotate=(-d, d), p=0.5),
            A.RandomBrightnessContrast(bc, bc, p=0.5)]


def validates(cfg: Any, epoch: int) -> bool:
    """Whether 0-based ``epoch`` validates: every ``validate_every`` epochs and always the last."""
    return (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs


def run_epochs(cfg: Any, out: Path, score: str, loader: torch.utils.data.DataLoader, network: torch.nn.Module,
               stepper: Stepper, train_epoch: Callable[[int, Progress], float],
               validate: Callable[[torch.nn.Module], tuple[float, float]],
               resumed: tuple[int, float, list[dict], int]) -> None:
    """The epoch loop of a hand-written loop, on every rank, from :func:`resume`'s ``resumed``.

    ``train_epoch(epoch, progress)`` trains one epoch of this rank's shard (calling ``progress.step``
    per micro-batch) and returns the mean loss over every rank; ``validate(model)`` returns
    (validation loss, ``score``) of the final-weights model (the EMA where there is one), the same on
    every rank. Rank 0 alone writes: the curves (``metrics.csv``; ``seconds``: the epoch's training and
    validation, as the other models count it), ``best.pt when ``score`` beats the best so far, ``last.pt`` at
    every epoch's end and, with ``cfg.checkpoint_minutes``, within an epoch every that many minutes (at an
    optimizer update's boundary), and at the end ``weights.pt`` (the final weights). A run resumed within an
    epoch does that epoch's remaining micro-batches in the same order (:class:`EpochSampler`); its
    ``train_loss`` is their mean."""
    rank, world = rank_world()
    start, best, log, step = resumed
    curves = Curves(out, log) if rank == 0 else None
    progress = Progress(cfg.epochs, len(loader), cfg.batch * world, enabled=rank == 0)
    every = 60.0 * getattr(cfg, "checkpoint_minutes", 0.0)
    saved = time.perf_counter()

    def mid_epoch(epoch: int, skip: int, n: int) -> None:
        """After micro-batch ``n`` of this session's part of ``epoch`` (the epoch's last: its own save follows)."""
        nonlocal saved
        if (curves is not None and every and n < progress.steps and stepper.between_updates
                and time.perf_counter() - saved >= every):
            done = skip + n
            save_checkpoint(out / "last.pt", network, stepper, epoch - 1, best, curves.log, step=done)
            saved = time.perf_counter()
            print(f"checkpoint: epoch {epoch + 1} after step {done} ({out / 'last.pt'})", flush=True)

    try:
        for epoch in range(start, cfg.epochs):
            skip = step if epoch == start else 0
            loader.sampler.skip = skip * cfg.batch
            loader.sampler.set_epoch(epoch)
            progress.start(epoch, len(loader))
            progress.on_step = lambda n, epoch=epoch, skip=skip: mid_epoch(epoch, skip, n)
            started = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_epoch(epoch, progress), "val_loss": None,
                                   score: None, "lr": stepper.lr(), "seconds": None}
            if validates(cfg, epoch):
                row["val_loss"], row[score] = validate(stepper.final_model())
            row["seconds"] = time.perf_counter() - started
            if curves is not None:
                if row[score] is not None:
                    best = save_if_best(out, stepper.final_model(), row[score], best)
                curves.add(row)
                if epoch + 1 in snapshot_epochs(cfg.epochs, getattr(cfg, "snapshots", 0)):
                    with atomic_path(snapshot_path(out, epoch + 1)) as tmp:
                        torch.save({"model": stepper.final_model().state_dict()}, tmp)
                save_checkpoint(out / "last.pt", network, stepper, epoch, best, curves.log)
                saved = time.perf_counter()
        if rank == 0:
            finish(out, stepper.final_model())
            (out / "last.pt").unlink(missing_ok=True)  # weights.pt marks the fold finished: nothing to resume
    finally:
        if curves is not None:
            curves.close()
    if world > 1:
        dist.barrier()  # weights.pt exists when any rank returns


def save_if_best(out: Path, model: torch.nn.Module, score: float, best: float) -> float:
    """Write ``best.pt`` when ``score`` beats ``best``. A NaN score (the AUC of a fold with one class) writes it
    only while no validation had a number, so there is a ``best.pt`` after the first validation."""
    if score > best or (best == -math.inf and not score > best):
        with atomic_path(out / "best.pt") as tmp:
            torch.save({"model": model.state_dict()}, tmp)
        return best if math.isnan(score) else score
    return best


def finish(out: Path, model: torch.nn.Module) -> Path:
    """``weights.pt``: ``model``'s weights at the end of training (the EMA where there is one); its
    presence marks a finished run."""
    final = out / "weights.pt"
    with atomic_path(final) as tmp:
        torch.save({"model": model.state_dict()}, tmp)
    return final


def trained_checkpoint(cfg: Any, out: Path, model: str) -> Path:
    """The weights file of a finished fold that ``predict`` / ``load_infer`` use: ``best.pt`` (the best
    validation epoch) when ``cfg.checkpoint`` is ``best``, else ``weights.pt`` (the final weights).
    FileNotFoundError naming the make target while the fold is not trained (no ``weights.pt``)."""
    final = trained_weights(out / "weights.pt", model)
    return out / "best.pt" if cfg.checkpoint == "best" else final
