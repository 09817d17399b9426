"""Read chest X-rays (DICOM, PNG, JPEG) as 8-bit grayscale and convert DICOM folders to PNG sets.

DICOM decoding follows what the radiologists saw: the VOI LUT / windowing stored in the
file is applied, MONOCHROME1 images (bright = air) are inverted, and the result is
stretched to 0..255. JPEG 2000 transfer syntaxes (the VinDr files) decode through
pylibjpeg-openjpeg or Pillow, whichever pydicom finds.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.dataset import DICOM_SUFFIXES, IMAGE_SUFFIXES
from cxr.io import DataError, atomic_path, write_table


def read_dicom(path: str | os.PathLike, voi_lut: bool = True) -> np.ndarray:
    """Decode a DICOM file to a ``uint8`` (H, W) array, body bright, air dark."""
    import pydicom
    from pydicom.pixels import apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        data = ds.pixel_array
    except Exception as e:  # pydicom raises many types; the caller needs the file name
        raise DataError(path, f"cannot decode DICOM: {e}") from e
    data = apply_voi_lut(data, ds) if voi_lut else data
    data = data.astype(np.float64)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        data = data.max() - data
    return _to_uint8(data)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image as ``uint8`` grayscale (H, W); RGB is converted, 16-bit rescaled."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path)
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(path, f"unsupported image type {suffix!r}; expected one of {IMAGE_SUFFIXES + DICOM_SUFFIXES}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(path, "cannot read image (missing or corrupt)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = _to_uint8(image.astype(np.float64))
    return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` like Kaggle's resized sets (per-axis factors, see cxr.boxes)."""
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def find_images(folder: str | os.PathLike) -> dict[str, Path]:
    """image_id -> file for every DICOM/PNG/JPEG under ``folder`` (id = file stem)."""
    found: dict[str, Path] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES and p.is_file():
            if p.stem in found:
                raise DataError(p, f"image_id {p.stem!r} also at {found[p.stem]}")
            found[p.stem] = p
    return found


def prepare_png_set(src: str | os.PathLike, out: str | os.PathLike, size: int, workers: int = 0) -> pd.DataFrame:
    """Convert every image under ``src`` to ``out/<image_id>.png`` at ``size`` px; write ``out/meta.csv``.

    ``meta.csv`` has Kaggle's columns ``image_id, dim0 (orig height), dim1 (orig width)``.
    Images already converted (PNG present and listed in meta.csv) are skipped, so an
    interrupted run resumes. Returns the meta table.
    """
    src, out = Path(src), Path(out)
    sources = find_images(src)
    if not sources:
        raise DataError(src, "no DICOM/PNG/JPEG files found")
    meta_path = out / "meta.csv"
    done = pd.read_csv(meta_path, dtype={"image_id": str}) if meta_path.exists() else pd.DataFrame(
        columns=["image_id", "dim0", "dim1"]
    )
    done = done.loc[[(out / f"{i}.png").exists() for i in done["image_id"]]]
    todo = [(str(p), str(out / f"{i}.png"), size) for i, p in sources.items() if i not in set(done["image_id"])]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    if todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in tqdm(pool.map(_convert_one, todo, chunksize=4), total=len(todo), desc=f"prepare {size}px"):
                rows.append(row)
    meta = pd.concat([done, pd.DataFrame(rows, columns=["image_id", "dim0", "dim1"])], ignore_index=True)
    meta = meta.sort_values("image_id").reset_index(drop=True)
    write_table(meta, meta_path)
    return meta


def _convert_one(job: tuple[str, str, int]) -> tuple[str, int, int]:
    src, dst, size = job
    image = read_image(src)
    h, w = image.shape
    with atomic_path(dst) as tmp:
        # cv2 picks the codec from the extension, so the temp name must end in .png
        png = tmp.with_suffix(".png")
        if not cv2.imwrite(str(png), resize(image, size)):
            raise DataError(dst, "cannot write PNG")
        os.replace(png, tmp)
    return Path(src).stem, h, w


def _to_uint8(data: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) / (hi - lo) * 255.0).astype(np.uint8)
