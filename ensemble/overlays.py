"""Pictures of findings, shared by the run report and predict-images: overlays and offline pages.

* :func:`draw` boxes on a radiograph with its ORIGINAL aspect ratio, each finding in its class
  colour (:data:`PALETTE`, the same everywhere) with the class name (and score); labels are placed
  where they overlap no other label and no banner, so several findings stay readable.
* :func:`write_index` predict-images' thumbnail page; :func:`page` the HTML shell (inline CSS, no
  script, no CDN: a page opens from disk offline) that the report uses too, with :func:`legend`.

Text uses OpenCV's built-in Hershey fonts, so nothing (no font file) is downloaded.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
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
MIN_FONT_SCALE = 0.42  # Hershey text below ~10 px high is unreadable, whatever the picture's size

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1


def css_colour(class_id: int) -> str:
    """The class colour as CSS ``rgb(...)`` (the palette is BGR, as OpenCV draws)."""
    b, g, r = PALETTE[int(class_id)]
    return f"rgb({r},{g},{b})"


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
    scores: bool = True,
) -> np.ndarray:
    """Draw one image's findings with ``score >= threshold``; returns a BGR image the size of ``image``.

    ``image``: uint8 grayscale (or BGR) shown at its original aspect ratio (any scale, see
    :func:`display_size`); ``preds``: that image's rows of the prediction format, boxes in
    ORIGINAL pixels (``original_wh``), scaled here per axis to ``image``. ``scores=False`` draws
    ground truth: names only, every row (no ``score`` column needed). Boxes go first, labels on
    top of them, the most confident finding's label first (it gets the place next to its box).
    """
    h, w = image.shape[:2]
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    unit = max(w, h) / 1024  # text and lines are sized for a 1024-px view and scale with it
    thick = max(1, round(2 * unit))
    font_scale = max(0.6 * unit, MIN_FONT_SCALE)
    sx, sy = w / original_wh[0], h / original_wh[1]
    shown = preds[preds["class_id"] != NO_FINDING]
    if scores:
        shown = shown[shown["score"] >= threshold].sort_values("score", ascending=False, kind="stable")
    rects = [(round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)) for x0, y0, x1, y1 in
             zip(*(shown[k] for k in BOX_COLUMNS))]
    classes = shown["class_id"].astype(int).tolist()
    for c, (x0, y0, x1, y1) in reversed(list(zip(classes, rects))):  # the most confident box drawn last, on top
        cv2.rectangle(canvas, (x0, y0), (x1, y1), PALETTE[c], thick)
    taken = [_banner(canvas, title, font_scale, thick)] if title else []
    texts = [f"{CLASS_NAMES[c]} {s:.2f}" for c, s in zip(classes, shown["score"])] if scores else \
        [CLASS_NAMES[c] for c in classes]
    for c, text, rect in zip(classes, texts, rects):
        taken.append(_label(canvas, text, rect, PALETTE[c], font_scale, thick, taken))
    return canvas


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label(canvas: np.ndarray, text: str, box: Rect, colour: tuple[int, int, int], scale: float, thick: int,
           taken: Sequence[Rect]) -> Rect:
    """Text on a filled box of the class colour at the first free place around ``box``: above its
    top-left corner, inside it, below it, then further down the left edge; returns the place used."""
    weight = max(1, thick - 1)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, weight)
    pad = max(2, thick)
    lw, lh = tw + 2 * pad, th + base + 2 * pad
    H, W = canvas.shape[:2]
    x = min(max(0, box[0]), max(0, W - lw))
    tops = [box[1] - lh, box[1], box[3], box[3] - lh]
    tops += [box[1] + k * lh for k in range(1, 40)] + [box[1] - k * lh for k in range(2, 40)]
    places = [(x, min(max(0, y), max(0, H - lh))) for y in tops]
    free = [p for p in places if not any(_overlaps((p[0], p[1], p[0] + lw, p[1] + lh), t) for t in taken)]
    x, y = (free or places)[0]
    cv2.rectangle(canvas, (x, y), (x + lw, y + lh), colour, -1)
    b, g, r = colour
    ink = (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)  # dark text on light colours
    cv2.putText(canvas, text, (x + pad, y + pad + th), FONT, scale, ink, weight, cv2.LINE_AA)
    return x, y, x + lw, y + lh


def _banner(canvas: np.ndarray, text: str, scale: float, thick: int) -> Rect:
    weight = max(1, thick - 1)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, weight)
    if tw > canvas.shape[1] - 8:  # a narrow image: shrink the text rather than cut it
        scale *= (canvas.shape[1] - 8) / tw
        (tw, th), base = cv2.getTextSize(text, FONT, scale, weight)
    pad = max(3, 2 * thick)
    rect = (0, 0, min(canvas.shape[1], tw + 2 * pad), th + base + 2 * pad)
    cv2.rectangle(canvas, rect[:2], rect[2:], (32, 32, 32), -1)
    cv2.putText(canvas, text, (pad, pad + th), FONT, scale, (255, 255, 255), weight, cv2.LINE_AA)
    return rect


def side_by_side(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """BGR images next to each other on white, top-aligned."""
    h = max(i.shape[0] for i in images)
    tiles = [cv2.copyMakeBorder(i, 0, h - i.shape[0], 0, gap if k < len(images) - 1 else 0, cv2.BORDER_CONSTANT,
                                value=(255, 255, 255)) for k, i in enumerate(images)]
    return np.hstack(tiles)


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


CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #f4f4f4; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 22px 0 6px; } h3 { font-size: 14px; }
p, li { font-size: 13px; line-height: 1.45; max-width: 1100px; }
p.sub { margin: 0 0 12px; color: #555; }
.warn { background: #fde8e8; border: 2px solid #b00020; color: #b00020; font-weight: 600; padding: 8px 12px;
        margin: 8px 0 12px; max-width: 1100px; font-size: 14px; }
table { border-collapse: collapse; font-size: 12px; background: #fff; margin: 4px 0 10px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.l, th.l { text-align: left; }
table.kv td:first-child { font-weight: 600; text-align: left; background: #f7f7f7; } table.kv td { text-align: left; }
.swatch { display: inline-block; width: 11px; height: 11px; border: 1px solid #555; vertical-align: -1px;
          margin: 0 3px 0 10px; }
.legend { font-size: 12px; margin: 4px 0 8px; max-width: 1200px; line-height: 1.9; } .legend .item { white-space: nowrap; }
img.fig { display: block; max-width: 100%; background: #fff; border: 1px solid #ccc; margin: 4px 0 12px; }
details { margin: 4px 0; font-size: 13px; } summary { cursor: pointer; }
.muted { color: #666; } code { font-size: 12px; }
"""


def page(title: str, body: str, css: str = "") -> str:
    """A whole offline HTML page: ``body`` (trusted HTML) under the shared style."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}{css}</style></head>\n<body>\n{body}\n</body></html>\n")


def legend(classes: Sequence[int] = FINDING_CLASSES) -> str:
    """HTML: a colour swatch and the name of every class in ``classes`` (the overlays' colours)."""
    return '<div class="legend">' + "".join(
        f'<span class="item"><span class="swatch" style="background:{css_colour(c)}"></span>'
        f'{html.escape(CLASS_NAMES[c])}</span>' for c in classes) + "</div>"


def about_table(rows: Sequence[tuple[str, str]]) -> str:
    """HTML key/value table (values are text, escaped)."""
    return '<table class="kv">' + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def write_index(cards: pd.DataFrame, path: str | os.PathLike, title: str, subtitle: str = "",
                about: Sequence[tuple[str, str]] = (), warning: str = "") -> Path:
    """One offline page: thumbnails sorted by P(abnormal) (highest first), each opening its overlay.

    ``cards``: ``image_id, p_abnormal, findings`` (a short text), ``overlay`` and ``thumb``
    (paths relative to the page). ``about``: (key, value) rows naming what ran (run, models,
    parameters); ``warning``: a red line above everything (e.g. models trained on synthetic data).
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
    css = """
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 10px; }
.card { display: block; background: #fff; border: 1px solid #ccc; border-radius: 4px; text-decoration: none;
        color: inherit; overflow: hidden; }
.card:hover { border-color: #3367d6; }
.card img { display: block; width: 100%; height: 220px; object-fit: contain; background: #ddd; }
.cap { padding: 6px 8px; font-size: 12px; display: flex; flex-direction: column; gap: 2px; }
.p { font-weight: 600; } .p.high { color: #b00020; } .p.low { color: #1b5e20; }
.id { font-family: monospace; color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.f { color: #333; }
"""
    body = (f"<h1>{html.escape(title)}</h1>\n"
            + (f'<div class="warn">{html.escape(warning)}</div>\n' if warning else "")
            + (about_table(about) if about else "")
            + f'<p class="sub">{html.escape(subtitle)}</p>\n' + legend()
            + f'<div class="grid">\n{chr(10).join(items)}\n</div>')
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page(title, body, css), encoding="utf-8")
    return path


def findings_text(preds: pd.DataFrame, threshold: float, limit: int = 4) -> str:
    """'Cardiomegaly 0.81, Aortic enlargement 0.64, +2 more' for one image's findings above ``threshold``."""
    shown = preds[(preds["class_id"] != NO_FINDING) & (preds["score"] >= threshold)].sort_values("score", ascending=False)
    parts = [f"{CLASS_NAMES[int(c)]} {s:.2f}" for c, s in zip(shown["class_id"][:limit], shown["score"][:limit])]
    more = len(shown) - limit
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")
