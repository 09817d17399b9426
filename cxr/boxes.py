"""Box geometry: per-axis moves between original and resized pixels, IoU, clipping.

All functions take ``(N, 4)`` arrays of ``x_min, y_min, x_max, y_max``.
"""
from __future__ import annotations

import numpy as np


def to_resized(boxes: np.ndarray, orig_wh: tuple[float, float], new_wh: tuple[float, float]) -> np.ndarray:
    """Original pixels -> pixels of the image resized (squashed) to ``new_wh``."""
    return _scale(boxes, new_wh[0] / orig_wh[0], new_wh[1] / orig_wh[1])


def to_original(boxes: np.ndarray, resized_wh: tuple[float, float], orig_wh: tuple[float, float]) -> np.ndarray:
    """Pixels of a squashed ``resized_wh`` image -> original pixels."""
    return _scale(boxes, orig_wh[0] / resized_wh[0], orig_wh[1] / resized_wh[1])


def denormalize(boxes: np.ndarray, wh: tuple[float, float]) -> np.ndarray:
    return _scale(boxes, wh[0], wh[1])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` with every box in ``b``, continuous coordinates (no +1)."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = iw.clip(min=0) * ih.clip(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _scale(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return b * np.array([sx, sy, sx, sy])
