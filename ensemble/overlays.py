"""Pictures of the ensemble's findings: one overlay PNG per image and an offline ``index.html``.

* :func:`draw` boxes on a radiograph shown at ``long_side`` px (1024 by default) with its
  ORIGINAL aspect ratio, each finding in its class colour with the class name and score;
  a banner names the image and its P(abnormal).
* :func:`write_index` a single HTML page (inline CSS, no script, no CDN: it opens from disk
  offline) with a thumbnail grid sorted by P(abnormal), each thumbnail linking to its overlay.

Text uses OpenCV's built-in Hershey fonts, so nothing (no font file) is downloaded.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from cxr.dataset import BOX_COLUMNS, CLASS_NAMES, FINDING_CLASSES, NO_FINDING
from cxr.io import DataError, atomic_path

# One colour per finding class (BGR), chosen to stay apart from each other and from grey.
PALETTE: dict[int, tuple[int, int, int]] = dict(zip(FINDING_CLASSES, [
    (48, 48, 230),    # Aortic enlargement: red
    (0, 160, 255),    # Atelectasis: orange
    (0, 230, 230),    # Calcification: yellow
    (60, 200, 60),    # Cardiomegaly: green
    (230, 160, 0),    # Consolidation: azure
    (200, 60, 200),   # ILD: magenta
    (255, 255, 0),    # Infiltration: cyan
    (128, 0, 255),    # Lung Opacity: pink-red
    (0, 100, 200),    # Nodule/Mass: brown-orange
    (180, 180, 255),  # Other lesion: light pink
    (255, 80, 80),    # Pleural effusion: blue
    (120, 255, 180),  # Pleural thickening: mint
    (200, 0, 120),    # Pneumothorax: purple
    (0, 255, 160),    # Pulmonary fibrosis: lime
]))
FONT = cv2.FONT_HERSHEY_SIMPLEX


def display_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) of an image shown with its original aspect ratio and ``long_side`` px on its longer side."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw(
    image: np.ndarray,
    preds: pd.DataFrame,
    original_wh: tuple[int, int],
    threshold: float,
    title: str,
) -> np.ndarray:
    """Draw one image's findings with ``score >= threshold``; returns a BGR image the size of ``image``.

    ``image``: uint8 grayscale shown at its original aspect ratio (any scale, see
    :func:`display_size`); ``preds``: that image's rows of the prediction format, boxes in
    ORIGINAL pixels (``original_wh``), scaled here per axis to ``image``.
    """
    h, w = image.shape[:2]
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    unit = max(w, h) / 1024  # text and lines are sized for a 1024-px view and scale with it
    thick = max(1, round(2 * unit))
    font_scale = 0.6 * unit
    sx, sy = w / original_wh[0], h / original_wh[1]
    shown = preds[(preds["class_id"] != NO_FINDING) & (preds["score"] >= threshold)].sort_values("score")
    for c, s, x0, y0, x1, y1 in zip(shown["class_id"], shown["score"], *(shown[k] for k in BOX_COLUMNS)):
        colour = PALETTE[int(c)]
        p0, p1 = (round(x0 * sx), round(y0 * sy)), (round(x1 * sx), round(y1 * sy))
        cv2.rectangle(canvas, p0, p1, colour, thick)
        _label(canvas, f"{CLASS_NAMES[int(c)]} {s:.2f}", p0, colour, font_scale, thick)
    _banner(canvas, title, font_scale, thick)
    return canvas


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], colour: tuple[int, int, int], scale: float,
           thick: int) -> None:
    """Text on a filled box of the class colour above the box corner (inside it at the top edge)."""
    (tw, th), base = cv2.getTextSize(text, FONT, scale, max(1, thick - 1))
    pad = max(2, thick)
    x = min(max(0, corner[0]), max(0, canvas.shape[1] - tw - 2 * pad))
    top = corner[1] - th - base - 2 * pad
    y = top if top >= 0 else corner[1]
    cv2.rectangle(canvas, (x, y), (x + tw + 2 * pad, y + th + base + 2 * pad), colour, -1)
    b, g, r = colour
    ink = (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)  # dark text on light colours
    cv2.putText(canvas, text, (x + pad, y + pad + th), FONT, scale, ink, max(1, thick - 1), cv2.LINE_AA)


def _banner(canvas: np.ndarray, text: str, scale: float, thick: int) -> None:
    (tw, th), base = cv2.getTextSize(text, FONT, scale, max(1, thick - 1))
    if tw > canvas.shape[1] - 8:  # a narrow image: shrink the text rather than cut it
        scale *= (canvas.shape[1] - 8) / tw
        (tw, th), base = cv2.getTextSize(text, FONT, scale, max(1, thick - 1))
    pad = max(3, 2 * thick)
    cv2.rectangle(canvas, (0, 0), (min(canvas.shape[1], tw + 2 * pad), th + base + 2 * pad), (32, 32, 32), -1)
    cv2.putText(canvas, text, (pad, pad + th), FONT, scale, (255, 255, 255), max(1, thick - 1), cv2.LINE_AA)


def write_image(image: np.ndarray, path: str | os.PathLike, jpeg_quality: int = 85) -> Path:
    """Write a PNG or JPEG atomically (the codec follows ``path``'s extension)."""
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise DataError(path, "cannot encode image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return path


def thumbnail(image: np.ndarray, long_side: int = 256) -> np.ndarray:
    w, h = display_size(image.shape[1], image.shape[0], long_side)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def write_index(cards: pd.DataFrame, path: str | os.PathLike, title: str, subtitle: str = "") -> Path:
    """One offline page: thumbnails sorted by P(abnormal) (highest first), each opening its overlay.

    ``cards``: ``image_id, p_abnormal, findings`` (a short text), ``overlay`` and ``thumb``
    (paths relative to the page).
    """
    cards = cards.sort_values(["p_abnormal", "image_id"], ascending=[False, True], kind="stable")
    items = []
    for r in cards.itertuples(index=False):
        hue = "high" if r.p_abnormal >= 0.5 else "low"
        items.append(
            f'<a class="card" href="{quote(r.overlay)}" target="_blank" title="{html.escape(r.image_id)}">'
            f'<img src="{quote(r.thumb)}" loading="lazy" alt="{html.escape(r.image_id)}">'
            f'<div class="cap"><span class="p {hue}">P(abnormal) {r.p_abnormal:.2f}</span>'
            f'<span class="id">{html.escape(r.image_id)}</span>'
            f'<span class="f">{html.escape(r.findings) or "no finding above threshold"}</span></div></a>'
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; background: #f4f4f4; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
p.sub {{ margin: 0 0 12px; color: #555; font-size: 13px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 10px; }}
.card {{ display: block; background: #fff; border: 1px solid #ccc; border-radius: 4px; text-decoration: none;
         color: inherit; overflow: hidden; }}
.card:hover {{ border-color: #3367d6; }}
.card img {{ display: block; width: 100%; height: 220px; object-fit: contain; background: #ddd; }}
.cap {{ padding: 6px 8px; font-size: 12px; display: flex; flex-direction: column; gap: 2px; }}
.p {{ font-weight: 600; }} .p.high {{ color: #b00020; }} .p.low {{ color: #1b5e20; }}
.id {{ font-family: monospace; color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.f {{ color: #333; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(subtitle)}</p>
<div class="grid">
{chr(10).join(items)}
</div>
</body></html>
"""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def findings_text(preds: pd.DataFrame, threshold: float, limit: int = 4) -> str:
    """'Cardiomegaly 0.81, Aortic enlargement 0.64, +2 more' for one image's findings above ``threshold``."""
    shown = preds[(preds["class_id"] != NO_FINDING) & (preds["score"] >= threshold)].sort_values("score", ascending=False)
    parts = [f"{CLASS_NAMES[int(c)]} {s:.2f}" for c, s in zip(shown["class_id"][:limit], shown["score"][:limit])]
    more = len(shown) - limit
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")

