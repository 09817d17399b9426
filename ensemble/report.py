"""The report: OOF mAP@0.4 per model, ensemble, gated ensemble and prior-box floor (in-sample and nested);
per-class AP; PR curves; a few test images with the submission's boxes drawn. Markdown + PNG + summary.json."""
from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display, no font downloads
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr.data import DataFolder  # noqa: E402
from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, NO_FINDING, NUM_CLASSES  # noqa: E402
from cxr.images import read_image  # noqa: E402
from cxr.io import atomic_path, write_json  # noqa: E402
from cxr.metric import class_pr  # noqa: E402
from ensemble.ensemble import Params  # noqa: E402
from ensemble.scoring import Truth, score_rows  # noqa: E402


def write_report(
    out: Path,
    results: dict[str, pd.DataFrame],
    gt: pd.DataFrame,
    image_ids: list[str],
    data: DataFolder,
    test_preds: pd.DataFrame,
    search: pd.DataFrame,
    params: Params | None = None,
    n_images: int = 4,
) -> dict:
    """``results``: name -> OOF predictions (models, ``ensemble``, ``ensemble_gated``, ``prior_boxes``).

    ``params`` (the tuned ensemble) adds its nested OOF figures beside the in-sample ones.
    Returns ``summary.json``: name -> OOF mAP@0.4; ``nested.json`` holds name -> nested fold mean.
    """
    out.mkdir(parents=True, exist_ok=True)
    truth = Truth(gt, image_ids)  # the competition metric, fast (ensemble/scoring.py equals cxr.metric)
    scores = {name: score_rows(truth, preds) for name, preds in results.items()}
    scores = {name: {"map": s.map(), "ap": s.ap()} for name, s in scores.items()}
    summary = {name: s["map"] for name, s in scores.items()}
    nested = dict(params.nested_map) if params is not None else {}
    write_json(summary, out / "summary.json")
    if nested:
        write_json({"nested_map": nested, "nested_folds": params.nested_folds}, out / "nested.json")
    ap = pd.DataFrame({name: s["ap"] for name, s in scores.items()})
    ap.index = [f"{i} {CLASS_NAMES[int(i)]}" for i in ap.index]
    _plot_pr(gt, results["ensemble_gated"], out / "pr_curves.png")
    drawn = _draw_test_images(data, test_preds, out, n_images)
    search.to_csv(out / "search.csv", index=False)
    lines = [
        "# Ensemble report", "",
        f"Out-of-fold mAP@0.4 over {len(image_ids)} training images (competition metric, `cxr.metric`).", "",
        "| predictions | OOF mAP@0.4 | nested OOF mAP@0.4 (fold mean) |", "| --- | --- | --- |",
        *[f"| {name} | {m:.4f} | {nested[name]:.4f} |" if name in nested else f"| {name} | {m:.4f} | - |"
          for name, m in summary.items()], "",
        "The ensemble's OOF mAP is in-sample: its parameters were tuned on these predictions, so it is",
        "optimistic. The nested figure is honest: for each fold k the same search ran on the other folds",
        "and its choice was scored on fold k (mean over folds; a single model's fold mean needs no tuning)."
        if nested else "No nested figures: the parameters were tuned without folds.", "",
        "## Per-class AP", "", ap.map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}").to_markdown(), "",
        "## Precision-recall (gated ensemble, OOF)", "", "![PR curves](pr_curves.png)", "",
        "## Test images (the most confident findings of the submission, top 5 boxes each)", "", *[f"![{p.stem}]({p.name})" for p in drawn], "",
        f"Every fusion/gate candidate tried is in `search.csv` ({len(search)} rows).", "",
    ]
    with atomic_path(out / "index.md") as tmp:
        tmp.write_text("\n".join(lines))
    return summary


def _plot_pr(gt: pd.DataFrame, preds: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(3, 5, figsize=(15, 9), sharex=True, sharey=True)
    for c, ax in zip(range(NUM_CLASSES), axes.ravel()):
        g, p = gt[gt["class_id"] == c], preds[preds["class_id"] == c]
        if len(g) and len(p):
            precision, recall = class_pr(g, p)
            ax.plot(recall, precision)
        ax.set_title(CLASS_NAMES[c], fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _draw_test_images(data: DataFolder, preds: pd.DataFrame, out: Path, n: int, per_image: int = 5) -> list[Path]:
    """The ``n`` test images with the most confident findings, their top boxes drawn (original pixels
    converted to the PNG's), with class names and scores."""
    boxes = preds[preds["class_id"] != NO_FINDING].sort_values("score", ascending=False, kind="stable")
    ranked = boxes.groupby("image_id", sort=False)["score"].max().sort_values(ascending=False, kind="stable")
    sizes = data.test_sizes.set_index("image_id")
    paths = []
    rng = np.random.default_rng(0)
    for image_id in list(ranked.index[:n]):
        image = cv2.cvtColor(read_image(data.image("test", image_id)), cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        ow, oh = sizes.loc[image_id, ["width", "height"]]
        zoom = max(1, 512 // max(h, w))  # room for the labels on small PNGs
        image = cv2.resize(image, (zoom * w, zoom * h), interpolation=cv2.INTER_LINEAR)
        scale = np.array([zoom * w / ow, zoom * h / oh] * 2)
        for r in boxes[boxes["image_id"] == image_id].head(per_image).itertuples():
            color = tuple(int(v) for v in rng.integers(80, 255, 3))
            x0, y0, x1, y1 = (np.array([getattr(r, c) for c in BOX_COLUMNS]) * scale).astype(int)
            cv2.rectangle(image, (x0, y0), (x1, y1), color, 1)
            cv2.putText(image, f"{CLASS_NAMES[r.class_id]} {r.score:.2f}", (x0, max(y0 - 3, 10)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
        path = out / f"test_{image_id[:12]}.png"
        with atomic_path(path) as tmp:
            ok, buf = cv2.imencode(".png", image)
            tmp.write_bytes(buf.tobytes())
        paths.append(path)
    return paths
