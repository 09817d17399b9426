"""Read chest X-rays (DICOM, PNG, JPEG) as 8-bit grayscale and convert DICOM folders to PNG sets.

DICOM decoding follows what the radiologists saw: the VOI LUT / windowing stored in the
file is applied, MONOCHROME1 images (bright = air) are inverted, and the result is
stretched to 0..255. JPEG 2000 transfer syntaxes (the VinDr files) decode through
pylibjpeg-openjpeg or Pillow, whichever pydicom finds.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.dataset import DICOM_SUFFIXES, IMAGE_SUFFIXES, META_COLUMNS
from cxr.io import SAFE_ID, DataError, atomic_path, is_temp, read_table, write_table


def read_dicom(path: str | os.PathLike, voi_lut: bool = True) -> np.ndarray:
    """Decode a DICOM file to a ``uint8`` (H, W) array, body bright, air dark.

    A truncated file, a file without pixel data or one the decoders refuse is a :class:`DataError`.
    """
    import pydicom
    from pydicom.pixels import apply_voi_lut

    _check_not_empty(path)
    try:
        # pydicom only warns when the file ends early; a cut file must fail, not decode half an image.
        # Other warnings (odd tag values are common in real exports) stay warnings.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=r"(?i).*(end of file|truncat)", category=UserWarning)
            ds = pydicom.dcmread(path)
            data = ds.pixel_array
        data = apply_voi_lut(data, ds) if voi_lut else data
    except UserWarning as e:
        raise DataError(path, f"truncated or damaged DICOM: {e}") from None
    except Exception as e:  # pydicom raises many types; the caller needs the file name
        raise DataError(path, f"cannot decode DICOM: {_first_line(e)}") from None
    if data.ndim != 2:
        raise DataError(path, f"expected one grayscale frame, got pixel array of shape {data.shape}")
    data = data.astype(np.float64)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        data = data.max() - data
    return _to_uint8(data)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image as ``uint8`` grayscale (H, W); RGB is converted, 16-bit rescaled.

    Empty, truncated or mislabelled files (text named ``.png``) are a :class:`DataError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path)
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(path, f"unsupported image type {suffix!r}; expected one of {IMAGE_SUFFIXES + DICOM_SUFFIXES}")
    _check_complete(path, suffix)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(path, "cannot read image (corrupt)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = _to_uint8(image.astype(np.float64))
    return image


def _check_not_empty(path: Path | str | os.PathLike) -> int:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror}") from None
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    return size


def _check_complete(path: Path, suffix: str) -> None:
    """PNG must start with its signature and end with IEND; JPEG start with SOI and end with EOI.

    Decoders fill a cut file with grey instead of failing, so truncation is checked on the bytes.
    """
    size = _check_not_empty(path)
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 64))
        tail = f.read().rstrip(b"\0")  # some writers pad with zeros after the end marker
    if suffix == ".png":
        if head != b"\x89PNG\r\n\x1a\n":
            raise DataError(path, f"not a PNG file (starts with {head!r})")
        if b"IEND" not in tail[-12:]:
            raise DataError(path, "truncated PNG (no IEND chunk at the end)")
    else:
        if head[:2] != b"\xff\xd8":
            raise DataError(path, f"not a JPEG file (starts with {head!r})")
        if not tail.endswith(b"\xff\xd9"):
            raise DataError(path, "truncated JPEG (no end-of-image marker)")


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` like Kaggle's resized sets (per-axis factors, see cxr.boxes)."""
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def find_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> dict[str, Path]:
    """image_id -> file for every DICOM/PNG/JPEG under ``folder`` (id = file stem).

    Hidden files (temp files of a killed run, ``._*`` resource forks) and anything under
    ``exclude`` (an output folder inside the source) are ignored. One id in two files is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel) or p.suffix.lower() not in IMAGE_SUFFIXES + DICOM_SUFFIXES:
            continue
        if exclude is not None and (p.resolve() == exclude or exclude in p.resolve().parents):
            continue
        if not p.is_file():
            continue
        if p.stem in found:
            raise DataError(p, f"image_id {p.stem!r} also at {found[p.stem]}")
        found[p.stem] = p
    return found


META_NAME = "meta.csv"
FAILED_NAME = "failed.csv"
# Written as images finish (one line each, flushed), so a killed run resumes image by image;
# folded into meta.csv and removed when a run completes.
JOURNAL_NAME = "meta.partial.csv"
JOURNAL_COLUMNS = ["image_id", "dim0", "dim1", "size"]


@dataclass
class PrepareResult:
    """What :func:`prepare_png_set` did: the meta table of every converted image, and the failures."""

    meta: pd.DataFrame  # image_id, dim0 (original height), dim1 (original width)
    failed: pd.DataFrame  # file, reason
    converted: int  # images converted by this run (the rest were already done)
    seconds: float


def prepare_png_set(
    src: str | os.PathLike, out: str | os.PathLike, size: int, workers: int = 0, progress: bool = True
) -> PrepareResult:
    """Convert every image under ``src`` to ``out/<image_id>.png`` at ``size`` x ``size``; write ``out/meta.csv``.

    ``meta.csv`` has Kaggle's columns ``image_id, dim0 (orig height), dim1 (orig width)``.
    A file that cannot be read is skipped and listed in ``out/failed.csv`` (``file, reason``);
    everything else is converted. Work resumes image by image: an image whose PNG exists at
    ``size`` and is recorded in ``meta.csv`` or the journal is not redone; a PNG of another
    size is redone. Temp files of a killed run are removed. ``workers=0``: one process per core.
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if size < 1:
        raise DataError(src, f"--size must be a positive number of pixels, got {size}")
    sources = find_images(src, exclude=out)
    if not sources:
        raise DataError(src, "no DICOM/PNG/JPEG files found")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if is_temp(stale):
            stale.unlink()
    unsafe = [i for i in sources if not re.fullmatch(SAFE_ID, i)]  # ids name files and CSV cells downstream
    failed = [(str(sources.pop(i)), f"unsafe image_id {i!r} (letters, digits, '_', '-', '.' only)") for i in unsafe]
    done = _done(out, size)
    done = done[done["image_id"].isin(set(sources))]
    todo = [(str(p), str(out / f"{i}.png"), size) for i, p in sources.items() if i not in set(done["image_id"])]
    journal_path = out / JOURNAL_NAME
    if not journal_path.exists():
        journal_path.write_text(",".join(JOURNAL_COLUMNS) + "\n")
    elif not journal_path.read_bytes().endswith(b"\n"):  # a kill cut the last line: end it before appending
        with open(journal_path, "a") as journal:
            journal.write("\n")
    converted = 0
    if todo:
        workers = workers or os.cpu_count() or 1
        # spawn, not fork: a child forked from a process whose OpenCV/torch thread pools ran (a
        # notebook, the test session) can hang in its first OpenCV call
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(convert_one, job): job[0] for job in todo}
            bar = tqdm(as_completed(futures), total=len(todo), desc=f"prepare {size}px", unit="img", disable=not progress)
            with open(journal_path, "a") as journal:
                for future in bar:
                    try:
                        image_id, h, w, error = future.result()
                    except BrokenProcessPool:  # a decoder crashed the worker process (e.g. out of memory)
                        image_id, h, w, error = Path(futures[future]).stem, 0, 0, "worker process died"
                    if error:
                        failed.append((futures[future], error))
                        (out / f"{image_id}.png").unlink(missing_ok=True)  # a PNG left from another --size
                        bar.set_postfix(failed=len(failed))
                        continue
                    journal.write(f"{image_id},{h},{w},{size}\n")
                    journal.flush()
                    converted += 1
        finally:  # Ctrl-C: drop the queued images instead of converting them all before exiting
            pool.shutdown(wait=True, cancel_futures=True)
    meta = pd.concat([done[META_COLUMNS], _journal(out, size)[META_COLUMNS]], ignore_index=True)
    meta = meta.drop_duplicates("image_id", keep="last").sort_values("image_id").reset_index(drop=True)
    write_table(meta, out / META_NAME)
    journal_path.unlink()
    failures = pd.DataFrame(sorted(failed), columns=["file", "reason"])
    if failed:
        write_table(failures, out / FAILED_NAME)
    else:
        (out / FAILED_NAME).unlink(missing_ok=True)
    return PrepareResult(meta, failures, converted, time.perf_counter() - start)


def _done(out: Path, size: int) -> pd.DataFrame:
    """Images finished by earlier runs: in meta.csv or the journal, with a PNG of ``size`` px."""
    meta_path = out / META_NAME
    parts = [_journal(out, size)]
    if meta_path.exists():
        parts.insert(0, read_table(meta_path, dtype={"image_id": str}))
    done = pd.concat(parts, ignore_index=True)
    if not set(META_COLUMNS) <= set(done.columns):
        raise DataError(meta_path, f"expected columns {META_COLUMNS}, got {list(done.columns)}")
    done = done.drop_duplicates("image_id", keep="last")
    ok = [png_size(out / f"{i}.png") == (size, size) for i in done["image_id"]]
    return done.loc[ok, META_COLUMNS].reset_index(drop=True)


def _journal(out: Path, size: int) -> pd.DataFrame:
    """The journal's complete lines for ``size`` (a kill can cut the last line; it is dropped)."""
    path = out / JOURNAL_NAME
    if not path.exists():
        return pd.DataFrame(columns=JOURNAL_COLUMNS)
    lines = path.read_text().splitlines()[1:]
    rows = [line.split(",") for line in lines]
    rows = [r for r in rows if len(r) == 4 and all(r) and r[1].isdigit() and r[2].isdigit() and r[3] == str(size)]
    df = pd.DataFrame(rows, columns=JOURNAL_COLUMNS)
    return df.astype({"dim0": int, "dim1": int})


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when the file is missing or not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _is_gray8_png(path: str | os.PathLike) -> bool:
    """An 8-bit grayscale PNG (IHDR bit depth 8, colour type 0): what prepare itself writes."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and head[24:26] == b"\x08\x00"


def convert_one(job: tuple[str, str, int]) -> tuple[str, int, int, str]:
    """Convert one file; returns ``(image_id, orig height, orig width, error)``, error ``""`` on success.

    Runs in a worker process: it returns the error as text rather than raising, so one bad file
    never breaks the pool and the parent always learns which file failed and why.
    """
    src, dst, size = job
    image_id = Path(src).stem
    try:
        image = read_image(src)  # decoded even when copied below: that is what finds a corrupt file
        h, w = image.shape
        if (w, h) == (size, size) and _is_gray8_png(src):  # a PNG set at the wanted size: copy, no re-encode
            data = Path(src).read_bytes()
        else:
            ok, png = cv2.imencode(".png", resize(image, size))
            if not ok:
                raise DataError(dst, "cannot encode PNG")
            data = png.tobytes()
        with atomic_path(dst) as tmp:
            tmp.write_bytes(data)
        return image_id, h, w, ""
    except DataError as e:
        return image_id, 0, 0, e.message if e.path == src else str(e)
    except Exception as e:  # anything else from a decoder: report it against this file, keep going
        return image_id, 0, 0, f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _to_uint8(data: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) / (hi - lo) * 255.0).astype(np.uint8)
