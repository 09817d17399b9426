"""K folds grouped by image and stratified over the 15 classes.

Grouping: folds are assigned per image, so every reader row of an image lands in the
same fold (a GroupKFold by ``image_id``). Stratification: an image is multi-label (the
classes any reader marked, or No finding), so scikit-learn's single-label
StratifiedGroupKFold does not fit; we use iterative stratification (Sechidis, Tsoumakas &
Vlahavas, ECML-PKDD 2011), which balances every class's image count across folds, the
No-finding share included, and keeps fold sizes equal. Deterministic for a given seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.dataset import CLASS_NAMES, NUM_CLASSES


def image_label_matrix(labels: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Sorted image ids and a (n_images, 15) 0/1 matrix: class c marked by any reader."""
    ids = sorted(labels["image_id"].unique())
    row = pd.Series(np.arange(len(ids)), index=ids)
    y = np.zeros((len(ids), NUM_CLASSES), dtype=np.int64)
    y[row[labels["image_id"]].to_numpy(), labels["class_id"].to_numpy(dtype=int)] = 1
    return ids, y


def make_folds(labels: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign every image of ``labels`` to one of ``n_folds`` folds; returns ``image_id, fold``."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if not 0 <= seed < 2**32:  # numpy's own error for a negative seed is a traceback deep in default_rng
        raise ValueError(f"seed must be an integer in 0..{2**32 - 1}, got {seed}")
    ids, y = image_label_matrix(labels)
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} images cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    want_total = np.full(n_folds, len(ids) / n_folds)
    want_label = np.tile(y.sum(axis=0) / n_folds, (n_folds, 1)).astype(float)
    fold = np.full(len(ids), -1)
    remaining = np.ones(len(ids), dtype=bool)
    while remaining.any():
        counts = y[remaining].sum(axis=0).astype(float)
        counts[counts == 0] = np.inf
        rarest = np.flatnonzero(counts == counts.min())
        label = int(rng.choice(rarest))
        for i in rng.permutation(np.flatnonzero(remaining & (y[:, label] == 1))):
            best = np.flatnonzero(want_label[:, label] == want_label[:, label].max())
            best = best[want_total[best] == want_total[best].max()]
            f = int(rng.choice(best))
            fold[i] = f
            want_label[f] -= y[i]
            want_total[f] -= 1
            remaining[i] = False
    return pd.DataFrame({"image_id": ids, "fold": fold})


def fold_class_table(labels: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and fold (columns), plus an ``images`` row: the per-fold class table."""
    ids, y = image_label_matrix(labels)
    fold = folds.set_index("image_id").loc[ids, "fold"].to_numpy()
    n_folds = int(folds["fold"].max()) + 1
    table = pd.DataFrame(
        [[int(y[fold == f, c].sum()) for f in range(n_folds)] for c in range(NUM_CLASSES)],
        index=list(CLASS_NAMES),
        columns=[f"fold{f}" for f in range(n_folds)],
    )
    table.loc["images"] = [int((fold == f).sum()) for f in range(n_folds)]
    return table
