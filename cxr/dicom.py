"""DICOM -> 8-bit grayscale as the standard defines the pixels, with a fast JPEG 2000 path.

The order is the standard's (PS3.3 C.11, as pydicom's helpers apply it): stored values ->
modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) -> VOI LUT (Window
Center/Width in rescaled units, or a VOI LUT Sequence) -> MONOCHROME1 inverted (air dark,
body bright) -> stretched to 0..255 by the image's own min and max.

All of that depends on the stored value only, so it runs as ONE lookup table indexed by the
stored values (:func:`display_lut`, one ``np.take``), computed by pydicom's own functions on every
possible stored value: the same pixels as the per-pixel float arithmetic, 4 ms instead of 21-37 ms
for a 1840 x 2072 VinDr image.

Fast path (:func:`read`, ``size`` given, ``exact=False``): JPEG 2000 codestreams keep every
half resolution; the file is decoded at the smallest one that still has ``size`` x
:data:`MIN_SCALE` pixels on both axes (Pillow's ``reduce``: half resolution costs ~0.25x of the
full decode, quarter ~0.07x). Three traps, all handled here:

* the reduced decode overshoots at sharp edges, beyond the stored bit range (VinDr: 12-bit values
  in 16-bit codestreams decode to up to ~5300 at half resolution): clipped to the stored range;
* the min/max stretch needs the FULL image's min and max, which smoothed reduced pixels do not
  carry. The range taken from the reduced image is used only where the reduced image reaches
  the two extremes of the display table over the whole stored range (stored 0 and 4095 without
  a window; both ends of the window with one): a reduced pixel is a local average, so the full
  image has pixels at least as far out, and nothing lies beyond the extremes. (The exception, an
  undershoot at an edge within a few stored values of the limit, moves the stretch by those few
  values: far below one grey level.) Otherwise the file is decoded again at full resolution
  (counted in :data:`DECODES`). Decided from measurements: the 5 real VinDr DICOMs here (12 bit,
  MONOCHROME1, no window; 0.05% of the pixels at 0 and 0.02-2.8% at 4095) all reach stored 0
  and 4095 at half and quarter resolution, so none falls back; an image that stays inside its range costs a reduced plus a full
  decode (~1.25x the exact path). The tags cannot tell instead (VinDr strips Smallest/Largest
  Image Pixel Value), and no pass cheaper than the full decode sees every full-resolution pixel;
* the reduced samples sit on the even full-resolution pixels, not block centres:
  :func:`cxr.images.squash` maps them back onto the exact grid (else a 0.1-0.4 px shift).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.io import DataError

# JPEG 2000 Lossless Only and JPEG 2000: the transfer syntaxes whose codestream keeps lower resolutions
JPEG2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
# The reduced image may be a little smaller than the target (then upscaled by at most 1/0.9).
# Measured (bench/prepare_bench.py, per core): with 1.0, 17.5% of the 15,000 Kaggle train images
# (shorter side 1843-2047 px) need the full decode at 1024 px and the real ~2000 px DICOMs here
# gain 0.99x at 1024 / 3.6x at 512 (mean difference 0.40 grey levels); with 0.9, 0.5% need it and
# they gain 2.4x / 8.7x (0.56 / 0.61 grey levels, worst image 0.88): well inside the 1.5 allowed.
MIN_SCALE = 0.9
# Reduced decodes, and those that were decoded again in full (this process); the bench reports them.
DECODES = {"reduced": 0, "full_again": 0}


@dataclass
class Pixels:
    """A decoded image: ``image`` (uint8, H x W, maybe reduced by 2**level), the ORIGINAL size."""

    image: np.ndarray
    height: int
    width: int
    level: int = 0  # 0: full resolution; k: decoded at 1/2**k


def read_dicom(path: str | os.PathLike, voi_lut: bool = True) -> np.ndarray:
    """Decode a DICOM file at full resolution to a ``uint8`` (H, W) array, body bright, air dark.

    ``voi_lut=False`` skips the window / VOI LUT (the modality LUT still applies). A truncated
    file, a file without pixel data or one the decoders refuse is a :class:`DataError`.
    """
    return read(path, voi_lut=voi_lut).image


def read(path: str | os.PathLike, size: int | None = None, exact: bool = False, voi_lut: bool = True) -> Pixels:
    """Decode a DICOM to display pixels; with ``size``, JPEG 2000 may decode at a lower resolution.

    The result has at least ``size`` (times :data:`MIN_SCALE`) pixels on both axes, or the full
    resolution; ``exact=True`` always decodes at full resolution. The original size is returned
    either way. Errors are :class:`DataError` naming the file.
    """
    ds = _open(path)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    level = 0 if exact or size is None else _level(ds, rows, cols, size)
    reduced = _decode_reduced(path, ds, level) if level else None
    if reduced is not None:
        DECODES["reduced"] += 1
        lut, index = display_lut(ds, reduced[0], voi_lut, reaches_extremes=True)
        if lut is not None:
            return Pixels(np.take(lut, index), rows, cols, reduced[1])
        DECODES["full_again"] += 1
    stored = _decode_full(path, ds)
    if stored.ndim != 2:
        raise DataError(path, f"expected one grayscale frame, got pixel array of shape {stored.shape}")
    lut, index = display_lut(ds, stored, voi_lut)
    image = np.take(lut, index) if lut is not None else _display_float(ds, stored, voi_lut)
    return Pixels(image, *stored.shape, 0)


# ---------------------------------------------------------------------------- decoding


def _open(path: str | os.PathLike):
    import pydicom

    check_not_empty(path)
    try:
        # pydicom only warns when the file ends early; a cut file must fail, not decode half an image.
        # Other warnings (odd tag values are common in real exports) stay warnings.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=r"(?i).*(end of file|truncat)", category=UserWarning)
            return pydicom.dcmread(path)
    except UserWarning as e:
        raise DataError(path, f"truncated or damaged DICOM: {e}") from None
    except Exception as e:  # pydicom raises many types; the caller needs the file name
        raise DataError(path, f"cannot decode DICOM: {first_line(e)}") from None


def _decode_full(path: str | os.PathLike, ds) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=r"(?i).*(end of file|truncat)", category=UserWarning)
            return ds.pixel_array
    except UserWarning as e:
        raise DataError(path, f"truncated or damaged DICOM: {e}") from None
    except Exception as e:
        raise DataError(path, f"cannot decode DICOM: {first_line(e)}") from None


def stored_range(ds) -> tuple[int, int]:
    """The values Bits Stored allows: [0, 2**b - 1] unsigned, [-2**(b-1), 2**(b-1) - 1] signed."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _level(ds, rows: int, cols: int, size: int) -> int:
    """The reduction level to decode at: the largest k with both sides >= size * MIN_SCALE at 1/2**k.

    0 (full decode) unless this is a single-frame, unsigned, one-sample JPEG 2000 image of at most
    16 bits whose codestream has that many resolution levels.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if (syntax not in JPEG2000_SYNTAXES or "PixelData" not in ds or not rows or not cols
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1
            or int(ds.get("PixelRepresentation", 0)) != 0 or not 1 <= int(ds.get("BitsStored", 0)) <= 16):
        return 0
    need = size * MIN_SCALE
    level = 0
    while -(-min(rows, cols) // (1 << (level + 1))) >= need:
        level += 1
    return level


def _decode_reduced(path: str | os.PathLike, ds, level: int) -> tuple[np.ndarray, int] | None:
    """(stored values at 1/2**k, k) for the largest k <= ``level`` the codestream allows, clipped to
    the stored range; None when it cannot be decoded that way: the caller decodes it in full."""
    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as e:
        raise DataError(path, f"cannot decode DICOM: {first_line(e)}") from None
    # a cut file can lose only the last bytes: the reduced decode would not notice (it never reads them)
    if not frame.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise DataError(path, "truncated or damaged DICOM: the JPEG 2000 codestream has no end marker")
    precision = _codestream_precision(frame)
    levels = _codestream_levels(frame)
    if precision is None or levels is None or precision > 16:
        return None
    level = min(level, levels)
    # Pillow sizes a reduced image as round(side / 2**k) where OpenJPEG gives ceil(side / 2**k), and
    # refuses the decode where they differ: take the next level up (k = 1 always agrees)
    while level > 1 and any((s + (1 << (level - 1))) >> level != -(-s // (1 << level)) for s in (ds.Rows, ds.Columns)):
        level -= 1
    if level < 1:
        return None
    try:
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = level
            im.load()
            data = np.asarray(im)
    except Exception:  # an odd codestream (tile-specific levels, ...): the full decode decides
        return None
    if data.ndim != 2:
        return None
    # Pillow scales samples of fewer bits up to its mode's depth (12 -> 16 bits: << 4); undo it
    depth = 8 if data.dtype == np.uint8 else 16
    if precision < depth:
        data = data >> (depth - precision)
    lo, hi = stored_range(ds)
    return np.clip(data, lo, hi).astype(np.uint16), level


def _codestream_marker(frame: bytes, marker: bytes, offset: int) -> int | None:
    """One byte of a main-header marker segment of a JPEG 2000 codestream (None if absent)."""
    pos = 2  # after SOC
    while pos + 4 <= len(frame) and frame[pos] == 0xFF:
        if frame[pos:pos + 2] == marker:
            return frame[pos + 2 + offset] if pos + 2 + offset < len(frame) else None
        if frame[pos + 1] == 0x90:  # first tile: the main header ended
            return None
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    return None


def _codestream_levels(frame: bytes) -> int | None:
    """Decomposition levels in the COD segment (Lcod 2, Scod 1, order 1, layers 2, MCT 1, levels)."""
    return _codestream_marker(frame, b"\xff\x52", 7)


def _codestream_precision(frame: bytes) -> int | None:
    """Bits of the first component (SIZ: Lsiz 2, Rsiz 2, 8 x 4 sizes, Csiz 2, then Ssiz = bits - 1)."""
    ssiz = _codestream_marker(frame, b"\xff\x51", 38)
    return None if ssiz is None or ssiz & 0x80 else (ssiz & 0x7F) + 1


# ---------------------------------------------------------------------------- display values


def _display_values(ds, values: np.ndarray, voi_lut: bool) -> np.ndarray:
    """Modality LUT, then VOI LUT / window, as pydicom applies them; float64."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_modality_lut(values, ds)
    if voi_lut:
        out = apply_voi_lut(out, ds)
    return np.asarray(out, dtype=np.float64)


def display_lut(ds, stored: np.ndarray, voi_lut: bool = True, reaches_extremes: bool = False
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(uint8 table, index array) with ``np.take(table, index)`` = the display image of ``stored``.

    The table covers every value of the stored dtype (uint8/uint16; int16 indexed by its bit
    pattern), so it is computed once per file on at most 65,536 values. The stretch uses the min
    and max over the values present in ``stored``, exactly as the per-pixel arithmetic did.
    ``reaches_extremes=True`` (reduced images): the stretch range must be the table's extremes
    over the whole stored range, reached by ``stored``; otherwise (None, None) and the caller
    decodes in full. (None, None) too for dtypes a table cannot index (32-bit, float).
    """
    if stored.dtype not in (np.uint8, np.uint16, np.int16):
        return None, None
    unsigned = np.dtype(f"uint{stored.dtype.itemsize * 8}")
    domain = np.arange(1 << (8 * stored.dtype.itemsize), dtype=unsigned).view(stored.dtype)
    values = _display_values(ds, domain, voi_lut)
    index = stored.view(unsigned)
    lo_s, hi_s = int(stored.min()), int(stored.max())
    # the min and max of the display values over the stored values present in the image
    span = values[lo_s:hi_s + 1] if stored.dtype != np.int16 else None
    if span is not None and (np.all(np.diff(span) >= 0) or np.all(np.diff(span) <= 0)):
        present_min, present_max = min(span[0], span[-1]), max(span[0], span[-1])
    else:  # not monotonic (a VOI LUT Sequence may not be), or signed: count which values occur
        present = np.bincount(index.ravel(), minlength=len(domain)) > 0
        present_min, present_max = values[present].min(), values[present].max()
    if reaches_extremes:
        lo, hi = stored_range(ds)
        whole = values[(domain >= lo) & (domain <= hi)]
        if (present_min, present_max) != (whole.min(), whole.max()):
            return None, None
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":  # stored bright = air
        values = present_max - values
        present_min, present_max = present_max - present_max, present_max - present_min
    if present_max <= present_min:
        return np.zeros(len(domain), np.uint8), index
    table = np.round((values - present_min) / (present_max - present_min) * 255.0)
    # values absent from the image may fall outside 0..255; they are never looked up
    return np.clip(table, 0, 255).astype(np.uint8), index


def _display_float(ds, stored: np.ndarray, voi_lut: bool) -> np.ndarray:
    """The per-pixel arithmetic, for stored dtypes a table cannot index."""
    data = _display_values(ds, stored, voi_lut)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        data = data.max() - data
    return to_uint8(data)


def to_uint8(data: np.ndarray) -> np.ndarray:
    """Stretch min..max to 0..255 (all zeros for a flat image)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) / (hi - lo) * 255.0).astype(np.uint8)


def check_not_empty(path: Path | str | os.PathLike) -> int:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror}") from None
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    return size


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def write_dicom(path: str | os.PathLike, stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                jpeg2000: bool = False) -> Path:
    """Write ``stored`` (uint16, or int16 for signed values) as a one-frame DX-like DICOM; tests and benches.

    ``window`` = (center, width) in rescaled units, ``rescale`` = (slope, intercept);
    ``jpeg2000``: JPEG 2000 lossless (pylibjpeg-openjpeg encodes it), else uncompressed.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    signed = stored.dtype == np.int16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    if jpeg2000:
        ds.compress(JPEG2000Lossless, stored)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
