"""Merge the classifier's folds: OOF table, fold-averaged test probabilities, ROC AUC, calibration plot."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display, no font downloads
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from cxr.data import DataFolder  # noqa: E402
from cxr.io import DataError, atomic_path, write_json, write_table  # noqa: E402


def merge_probabilities(fold_dirs: list[Path], data: DataFolder, folds: pd.DataFrame, out: Path) -> tuple[Path, Path]:
    parts = []
    for k, d in enumerate(fold_dirs):
        oof = pd.read_csv(d / "oof.csv", dtype={"image_id": str})
        labels = pd.read_csv(d / "labels.csv", dtype={"image_id": str})
        parts.append(oof.merge(labels[["image_id", "abnormal"]], on="image_id").assign(fold=k))
    oof = pd.concat(parts, ignore_index=True)
    if not oof["image_id"].is_unique or set(oof["image_id"]) != set(folds["image_id"]):
        raise DataError(out, "OOF probabilities must cover every training image exactly once")
    tests = [pd.read_csv(d / "test.csv", dtype={"image_id": str}).set_index("image_id")["p_abnormal"] for d in fold_dirs]
    test = pd.concat(tests, axis=1).mean(axis=1).rename("p_abnormal").reset_index()
    if set(test["image_id"]) != set(data.test_ids()):
        raise DataError(out, "test probabilities must cover every test id")
    report = {
        "auc_overall": float(roc_auc_score(oof["abnormal"], oof["p_abnormal"])),
        "auc_per_fold": {str(k): float(roc_auc_score(g["abnormal"], g["p_abnormal"])) for k, g in oof.groupby("fold")},
        "n_images": int(len(oof)),
        "abnormal_share": float(oof["abnormal"].mean()),
    }
    write_json(report, out / "report.json")
    plot_calibration(oof["abnormal"].to_numpy(), oof["p_abnormal"].to_numpy(), out / "calibration.png", report["auc_overall"])
    print(json.dumps(report))
    return (write_table(oof[["image_id", "p_abnormal"]], out / "oof.csv"), write_table(test, out / "test.csv"))


def plot_calibration(y, p, path: Path, auc: float) -> Path:
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot(mean, frac, marker="o")
    ax.set(xlabel="predicted P(abnormal)", ylabel="observed abnormal share", title=f"OOF calibration (AUC {auc:.3f})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
