"""Read chest X-rays (DICOM, PNG, JPEG) as 8-bit grayscale and convert folders to square PNG sets.

DICOM pixels follow the standard (:mod:`cxr.dicom`): modality LUT (rescale), then VOI LUT /
window, then MONOCHROME1 inverted, stretched to 0..255. JPEG 2000 DICOMs decode at the lowest
stored resolution that still covers the target size unless ``exact`` is asked for. A folder is
written by one run at a time (:func:`writing`); every file that cannot be used is listed with
its reason and skipped (:func:`scan_images`, ``failed.csv``).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import re
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.dataset import DICOM_SUFFIXES, IMAGE_SUFFIXES, META_COLUMNS
from cxr.dicom import Pixels, check_not_empty, first_line, read_dicom, to_uint8
from cxr.dicom import read as read_dicom_pixels
from cxr.io import SAFE_ID, DataError, atomic_path, is_temp, read_table, write_table


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image at full resolution as ``uint8`` grayscale (H, W); RGB is converted,
    16-bit rescaled.

    Empty, truncated or mislabelled files (text named ``.png``) are a :class:`DataError`; bytes
    after a complete image (some writers append them) are ignored, as every decoder does.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path)
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(path, f"unsupported image type {suffix!r}; expected one of {IMAGE_SUFFIXES + DICOM_SUFFIXES}")
    check_not_empty(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror}") from None
    _check_complete(path, suffix, data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(path, "cannot read image (corrupt)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = to_uint8(image.astype(np.float64))
    return image


def load(path: str | os.PathLike, size: int | None = None, exact: bool = False) -> Pixels:
    """Read an image for squashing to ``size`` px: JPEG 2000 DICOMs may decode at a lower resolution
    (at least ``size`` x 0.9 per axis, see :mod:`cxr.dicom`) unless ``exact``; the original size
    is returned either way. Feed the result to :func:`squash` / :func:`fit`, which undo the small
    offset of a reduced decode."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return read_dicom_pixels(path, size, exact)
    image = read_image(path)
    return Pixels(image, *image.shape, 0)


def _check_complete(path: Path, suffix: str, data: bytes) -> None:
    """PNG: signature, then chunks up to a whole IEND; JPEG: SOI, then segments up to EOI.

    Decoders fill a cut file with grey instead of failing, so truncation is checked on the bytes,
    by walking the file's own structure: anything after the end marker is ignored.
    """
    if suffix == ".png":
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            raise DataError(path, f"not a PNG file (starts with {data[:8]!r})")
        if not _png_complete(data):
            raise DataError(path, "truncated PNG (no IEND chunk at the end)")
    else:
        if data[:2] != b"\xff\xd8":
            raise DataError(path, f"not a JPEG file (starts with {data[:8]!r})")
        if not _jpeg_complete(data):
            raise DataError(path, "truncated JPEG (no end-of-image marker)")


def _png_complete(data: bytes) -> bool:
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos += 12 + length  # length, type, data, CRC
    return False


def _jpeg_complete(data: bytes) -> bool:
    """True when the marker structure reaches EOI (FFD9) within ``data``.

    Segments carry their length; entropy-coded data after SOS holds no marker except RSTn and
    stuffed FF00, so the next other marker ends it. A structure this walk cannot follow falls
    back to "an EOI somewhere after the first scan".
    """
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:  # not at a marker: an odd writer; be lenient
            return data.find(b"\xff\xd9", pos) >= 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xD9:
            return True
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
        else:
            if pos + 4 > n:
                return False
            end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if end > n:
                return False
            pos = end
            if marker == 0xDA:  # start of scan: skip the entropy-coded data to the next real marker
                while True:
                    pos = data.find(b"\xff", pos)
                    if pos < 0 or pos + 1 >= n:
                        return False
                    following = data[pos + 1]
                    if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                        pos += 1 if following == 0xFF else 2
                        continue
                    break
    return False


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` like Kaggle's resized sets (per-axis factors, see cxr.boxes)."""
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def squash(pixels: Pixels, size: int) -> np.ndarray:
    """``size`` x ``size``, as :func:`resize` of the full-resolution image."""
    return _recentre(resize(pixels.image, size), pixels)


def fit(pixels: Pixels, width: int, height: int) -> np.ndarray:
    """``width`` x ``height`` (area average when shrinking), as from the full-resolution image."""
    image = pixels.image
    interpolation = cv2.INTER_AREA if width * height < image.size else cv2.INTER_LINEAR
    return _recentre(cv2.resize(image, (width, height), interpolation=interpolation), pixels)


def _recentre(out: np.ndarray, pixels: Pixels) -> np.ndarray:
    """Map a resized reduced JPEG 2000 decode onto the grid of the resized full image.

    Sample k of the 1/2**r image is centred on full-resolution pixel 2**r k (the wavelet's
    low-pass is centred on the even samples), and the M = ceil(N / 2**r) samples span 2**r M >= N
    pixels; resizing treats them as M blocks evenly filling the image. Per axis, output pixel x
    therefore shows what the exact path shows at x' = k x + t (k = N / (2**r M); see the comment
    below for t): without this the picture sits ~0.13 px (512 from 2000 px, r = 1) to ~0.4 px
    (r = 2) right of and below the exact one, more for odd sizes (measured by phase correlation).
    """
    if not pixels.level:
        return out
    h, w = out.shape[:2]
    m_h, m_w = pixels.image.shape[:2]
    power = 1 << pixels.level
    rows = []
    for size, full, reduced in ((w, pixels.width, m_w), (h, pixels.height, m_h)):
        k = full / (power * reduced)
        # the exact output x (centre x + 0.5) shows full position (x + 0.5) N / S, which is reduced
        # position (that - 0.5) / 2**r + 0.5 in block units, i.e. x' + 0.5 = that * S / M in the resized output
        t = (0.5 - 0.5 / power) * size / reduced + 0.5 * k - 0.5
        rows.append((k, t))
    (kx, tx), (ky, ty) = rows
    inverse = np.float32([[kx, 0, tx], [0, ky, ty]])  # output pixel -> pixel of the resized reduced image
    return cv2.warpAffine(out, inverse, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def scan_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None
                ) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """(image_id -> file, [(file, reason)]) for every DICOM/PNG/JPEG under ``folder`` (id = file stem).

    Searched recursively, following links to folders (each folder once: a link back up is
    listed, not followed). Files that cannot be used are listed with the reason instead of
    returned: a dangling link, a link loop, not a regular file, an unsafe id (ids name files
    and CSV cells downstream). Hidden files and folders (temp files of a killed run, ``._*``
    resource forks) and the folder ``exclude`` (an output folder inside the source) are ignored.
    The same id in two or more files: none of them is used (which one is meant is unknown), each is
    listed naming the others, and the rest goes on.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: dict[str, list[Path]] = {}
    failed: list[tuple[str, str]] = []
    seen = {os.path.realpath(folder)}

    def unreadable(e: OSError) -> None:
        failed.append((str(e.filename), f"cannot read folder: {e.strerror}"))

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        kept = []
        for d in sorted(dirs):
            full = os.path.join(root, d)
            real = os.path.realpath(full)
            if d.startswith(".") or real == skip:
                continue
            if real in seen:  # a link back up (a loop) or a second way into a folder already searched
                failed.append((full, f"link to a folder already searched ({real}): not searched again"))
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES + DICOM_SUFFIXES:
                continue
            reason = _unusable(path)
            if not reason and not re.fullmatch(SAFE_ID, path.stem):
                reason = f"unsafe image_id {path.stem!r} (letters, digits, '_', '-', '.' only)"
            if reason:
                failed.append((str(path), reason))
                continue
            found.setdefault(path.stem, []).append(path)
    for image_id, paths in found.items():
        if len(paths) > 1:
            failed.extend((str(p), f"image_id {image_id!r} is also at {', '.join(str(q) for q in paths if q != p)}: "
                                   "neither is used (rename one)") for p in paths)
    return {i: paths[0] for i, paths in sorted(found.items()) if len(paths) == 1}, failed


def _unusable(path: Path) -> str:
    """Why a directory entry cannot be read as an image file, or ``""``."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"dangling symbolic link (target {os.readlink(path)} not found)"
        return f"cannot read: {e.strerror}"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return ""


def find_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> dict[str, Path]:
    """image_id -> file of the usable images under ``folder`` (see :func:`scan_images`)."""
    return scan_images(folder, exclude)[0]


LOCK_NAME = ".lock"  # in the folder being written; holds the writer's pid while it runs


class Busy(DataError):
    """Another run holds the folder: one line, ``OUT is being written by another run (pid N)``."""

    def __init__(self, path: str | os.PathLike, pid: str):
        ValueError.__init__(self, f"{path} is being written by another run (pid {pid})")
        self.path, self.message, self.row = str(path), f"is being written by another run (pid {pid})", None


@contextlib.contextmanager
def writing(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out`` (created if missing) for this run: a second run on it is a :class:`Busy` error.

    ``fcntl.flock`` (non-blocking) on ``out/.lock``, so the kernel frees it when the holder dies
    (a killed run never blocks the next). The file is removed on exit; a run that took the lock
    of a file just removed tries again on the new one. An ``out`` this call created and nothing
    filled is removed again, so a run refused early leaves no empty folder. Local file systems.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(out, _holder(path)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty


def _holder(path: Path) -> str:
    """The pid in a held lock file (the holder writes it just after taking the lock)."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        time.sleep(0.05)
    return "unknown"


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
    src: str | os.PathLike, out: str | os.PathLike, size: int, workers: int = 0, progress: bool = True,
    exact: bool = False,
) -> PrepareResult:
    """Convert every image under ``src`` to ``out/<image_id>.png`` at ``size`` x ``size``; write ``out/meta.csv``.

    ``meta.csv`` has Kaggle's columns ``image_id, dim0 (orig height), dim1 (orig width)``.
    A file that cannot be used (unreadable, truncated, a dangling link, an unsafe name) is
    skipped and listed in ``out/failed.csv`` (``file, reason``); everything else is converted.
    Work resumes image by image: an image whose PNG exists at ``size`` and is recorded in
    ``meta.csv`` or the journal is not redone (whichever decode made it); a PNG of another size is
    redone. Temp files of a killed run are removed. ``workers=0``: one process per core.
    JPEG 2000 DICOMs decode at a reduced resolution unless ``exact`` (:mod:`cxr.dicom`).
    A second run on the same ``out`` while this one runs stops at once (:class:`Busy`).
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if size < 1:
        raise DataError(src, f"--size must be a positive number of pixels, got {size}")
    if workers < 0:
        raise DataError("--workers", f"must be 0 (one per core) or more, got {workers}")
    if src.resolve() == out.resolve():
        raise DataError(out, "OUT must differ from SRC (the PNGs would replace the source images)")
    sources, failed = scan_images(src, exclude=out)
    if not sources and not failed:
        raise DataError(src, "no DICOM/PNG/JPEG files found")
    with writing(out):
        return _prepare(sources, failed, out, size, workers, progress, exact, start)


def _prepare(sources: dict[str, Path], failed: list[tuple[str, str]], out: Path, size: int, workers: int,
             progress: bool, exact: bool, start: float) -> PrepareResult:
    for stale in out.iterdir():
        if is_temp(stale):
            stale.unlink()
    done = _done(out, size)
    done = done[done["image_id"].isin(set(sources))]
    todo = [(str(p), str(out / f"{i}.png"), size, exact) for i, p in sources.items() if i not in set(done["image_id"])]
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


def convert_one(job: tuple) -> tuple[str, int, int, str]:
    """Convert one file, job ``(src, dst, size[, exact])``; returns ``(image_id, orig height, orig
    width, error)``, error ``""`` on success.

    Runs in a worker process: it returns the error as text rather than raising, so one bad file
    never breaks the pool and the parent always learns which file failed and why.
    """
    src, dst, size = job[:3]
    exact = bool(job[3]) if len(job) > 3 else False
    image_id = Path(src).stem
    try:
        pixels = load(src, size, exact)  # decoded even when copied below: that is what finds a corrupt file
        h, w = pixels.height, pixels.width
        if (w, h) == (size, size) and _is_gray8_png(src):  # a PNG set at the wanted size: copy, no re-encode
            data = Path(src).read_bytes()
        else:
            ok, png = cv2.imencode(".png", squash(pixels, size))
            if not ok:
                raise DataError(dst, "cannot encode PNG")
            data = png.tobytes()
        with atomic_path(dst) as tmp:
            tmp.write_bytes(data)
        return image_id, h, w, ""
    except DataError as e:
        return image_id, 0, 0, e.message if e.path == src else str(e)
    except Exception as e:  # anything else from a decoder: report it against this file, keep going
        return image_id, 0, 0, f"{type(e).__name__}: {first_line(e)}"
