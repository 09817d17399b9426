"""DICOM pixels as the standard defines them and the fast JPEG 2000 decode.

Files are written here by pydicom (uncompressed, or JPEG 2000 lossless through pylibjpeg-openjpeg);
the real VinDr DICOMs in ../shared/data are read in place. The reference is the per-pixel float
arithmetic with pydicom's own helpers, in the standard's order: modality LUT, VOI LUT, MONOCHROME1.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxr import dicom
from cxr.images import convert_one, resize, squash
from tests.conftest import real

REAL_DICOMS = "vindr-cxr-images/dfloreaa"


def reference(path: Path, modality_first: bool = True) -> np.ndarray:
    """What the standard asks, by pydicom's helpers, pixel by pixel in float64."""
    ds = pydicom.dcmread(path)
    data = ds.pixel_array
    data = apply_voi_lut(apply_modality_lut(data, ds) if modality_first else data, ds)
    data = np.asarray(data, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        data = data.max() - data
    return dicom.to_uint8(data)


def ramp(h: int = 64, w: int = 64) -> np.ndarray:
    return np.linspace(0, 4095, h * w).reshape(h, w).astype(np.uint16)


def test_rescale_comes_before_a_window_in_rescaled_units(tmp_path):
    """Stored 0..4095, rescaled 2x - 1000 (-1000..7190); the window 1047..5143 (rescaled units)
    is the middle half of the stored values: a quarter saturates at each end. Taken on the
    stored values (the old order) it would cut only the darkest quarter and stretch the rest."""
    path = dicom.write_dicom(tmp_path / "r.dcm", ramp(), rescale=(2, -1000), window=(3095, 4096))
    image = dicom.read_dicom(path)
    np.testing.assert_array_equal(image, reference(path))
    saturated = np.mean((image == 0) | (image == 255))
    assert 0.48 < saturated < 0.52, saturated
    assert abs(np.mean(image == 0) - np.mean(image == 255)) < 0.02
    old = reference(path, modality_first=False)
    assert 0.24 < np.mean(old == 0) < 0.28 and np.mean(old == 255) < 0.01
    inverted = dicom.read_dicom(dicom.write_dicom(tmp_path / "r1.dcm", ramp(), "MONOCHROME1", rescale=(2, -1000),
                                                  window=(3095, 4096)))
    assert np.abs(inverted.astype(int) - (255 - image.astype(int))).max() <= 1


def voi_lut_sequence(path: Path) -> Path:
    """Add a VOI LUT Sequence that is not monotonic (a sawtooth): the table must count values, not assume order."""
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.array([(v * 37) % 65536 for v in range(4096)], np.uint16).tobytes()
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    return path


@pytest.mark.parametrize("case", ["plain", "monochrome1_window", "rescale", "signed_rescale_window", "voi_lut_sequence",
                                  "sigmoid", "flat"])
def test_display_table_equals_the_per_pixel_arithmetic(tmp_path, case):
    px = ramp(48, 40)
    px[::7, ::5] = 17  # values out of order, some repeated
    path = tmp_path / f"{case}.dcm"
    if case == "plain":
        dicom.write_dicom(path, px)
    elif case == "monochrome1_window":
        dicom.write_dicom(path, px, "MONOCHROME1", window=(1500, 800))
    elif case == "rescale":
        dicom.write_dicom(path, px, rescale=(0.5, 100))
    elif case == "signed_rescale_window":
        dicom.write_dicom(path, (px.astype(np.int32) - 2048).astype(np.int16), rescale=(1, 1024), window=(500, 1500))
    elif case == "voi_lut_sequence":
        voi_lut_sequence(dicom.write_dicom(path, px))
    elif case == "sigmoid":
        dicom.write_dicom(path, px, "MONOCHROME1", window=(2000, 1000))
        ds = pydicom.dcmread(path)
        ds.VOILUTFunction = "SIGMOID"
        ds.save_as(path)
    else:
        dicom.write_dicom(path, np.full((20, 30), 700, np.uint16), window=(600, 100))
    np.testing.assert_array_equal(dicom.read_dicom(path), reference(path))


def test_real_dicoms_give_the_same_pixels_as_before():
    """No rescale, no window in the VinDr files: the standard's order changes nothing for them."""
    path = min(real(REAL_DICOMS).rglob("*.dicom"))
    ds = pydicom.dcmread(path)
    assert "RescaleSlope" not in ds and "WindowCenter" not in ds
    before = ds.pixel_array.astype(np.float64)  # the old reader: VOI LUT (none here), invert, stretch
    np.testing.assert_array_equal(dicom.read_dicom(path), dicom.to_uint8(before.max() - before))


# ---------------------------------------------------------------------------- the fast JPEG 2000 path


def radiograph(h: int, w: int, seed: int, reach: bool) -> np.ndarray:
    """12-bit stored values like a DX image: smooth anatomy, grain noise; ``reach``: a collimator
    edge at 0 and a saturated marker at 4095 (most real files), else everything inside 300..3800."""
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:h, 0:w]
    body = np.exp(-(((x - w / 2) / (0.35 * w)) ** 2 + ((y - h / 2) / (0.45 * h)) ** 2))
    data = 600 + 2400 * body + 300 * low + rng.normal(0, 15, (h, w))
    data = np.clip(data, 300, 3800)
    if reach:
        data[:, : w // 25] = 0
        data[h // 10: h // 10 + h // 20, w - w // 8: w - w // 16] = 4095
    return data.astype(np.uint16)


def differences(exact: np.ndarray, fast: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, largest shift in output pixels by phase correlation)."""
    a, b = exact.astype(np.float32), fast.astype(np.float32)
    inner = (slice(8, -8), slice(8, -8))  # replicated borders would weigh in
    (dx, dy), _ = cv2.phaseCorrelate(a[inner].copy(), b[inner].copy())
    return float(np.abs(a - b).mean()), max(abs(dx), abs(dy))


CASES = [  # photometric, window (center, width) in stored units or None, reaches its display range
    ("MONOCHROME2", None, True),
    ("MONOCHROME1", None, True),
    ("MONOCHROME2", (2000, 1500), True),  # the window lies inside the data: both ends are reached
    ("MONOCHROME1", (1800, 2000), True),
    ("MONOCHROME2", None, False),
    ("MONOCHROME1", None, False),
    ("MONOCHROME2", (2048, 9000), False),  # wider than the data: neither end is reached
]


@pytest.mark.parametrize("photometric, window, reach", CASES)
def test_fast_decode_matches_the_exact_one(tmp_path, photometric, window, reach):
    """Within 1.5 grey levels and 0.25 px of the full decode at both sizes; an image that does not
    reach its display range falls back to the full decode (identical). Odd sizes: 1001 px is
    where Pillow's reduced size disagrees with OpenJPEG's at 1/4."""
    stored = radiograph(1001, 1103, seed=len(tmp_path.name), reach=reach)
    path = dicom.write_dicom(tmp_path / "x.dicom", stored, photometric, window=window, jpeg2000=True)
    exact = dicom.read(path, exact=True)
    np.testing.assert_array_equal(exact.image, reference(path))
    for size in (512, 256):
        before = dict(dicom.DECODES)
        fast = dicom.read(path, size=size)
        assert (fast.height, fast.width) == (1001, 1103)
        if reach:
            assert fast.level >= 1 and min(fast.image.shape) >= 0.9 * size, (fast.level, fast.image.shape)
        else:
            assert fast.level == 0 and dicom.DECODES["full_again"] == before["full_again"] + 1
        mad, shift = differences(resize(exact.image, size), squash(fast, size))
        assert mad <= 1.5 and shift < 0.25, (size, fast.level, mad, shift)


def test_fast_decode_of_a_cut_file_is_an_error(tmp_path):
    path = dicom.write_dicom(tmp_path / "x.dicom", radiograph(600, 500, 1, True), jpeg2000=True)
    data = path.read_bytes()
    for cut in (10, len(data) // 3):
        (tmp_path / "cut.dicom").write_bytes(data[:-cut])
        with pytest.raises(dicom.DataError, match="cut.dicom: truncated"):
            dicom.read(tmp_path / "cut.dicom", size=128)


def test_real_dicoms_fast_within_1_5_grey_levels_and_3x_faster_at_512(figures):
    """The 5 VinDr JPEG 2000 DICOMs (~2000 px): at 1024 (half resolution, or full for the 1840 px
    one) and 512 (quarter), mean difference <= 1.5 and no shift; per core >= 3x at 512."""
    files = sorted(real(REAL_DICOMS).rglob("*.dicom"))
    cpu = {"exact": 0.0, "fast": 0.0}
    worst = {1024: 0.0, 512: 0.0}
    for path in files:
        start = time.process_time()
        exact = dicom.read(path, exact=True)
        cpu["exact"] += time.process_time() - start
        for size in (1024, 512):
            start = time.process_time()
            fast = dicom.read(path, size=size)
            if size == 512:
                cpu["fast"] += time.process_time() - start
                assert fast.level >= 1
            mad, shift = differences(resize(exact.image, size), squash(fast, size))
            assert mad <= 1.5 and shift < 0.25, (path.name, size, fast.level, mad, shift)
            worst[size] = max(worst[size], mad)
    ratio = cpu["exact"] / cpu["fast"]
    figures(f"real DICOMs: decode at 512 px {ratio:.1f}x faster per core; worst mean difference "
            f"{worst[1024]:.2f} (1024) / {worst[512]:.2f} (512) grey levels")
    assert ratio >= 3, cpu


def test_kaggle_size_3x_faster_per_core_at_1024(tmp_path, figures):
    """Two Kaggle-size (2800 x 2500 px) JPEG 2000 files through convert_one (decode, table, squash,
    PNG): the default is at least 3x faster per core than --exact, within 1.5 grey levels."""
    files = [dicom.write_dicom(tmp_path / f"k{k}.dicom", radiograph(2800, 2500, k, True), photometric, jpeg2000=True)
             for k, photometric in enumerate(("MONOCHROME1", "MONOCHROME2"))]
    cpu = {True: 0.0, False: 0.0}
    for f in files:
        pngs = {}
        for exact in (True, False):
            start = time.process_time()
            assert convert_one((str(f), str(tmp_path / f"{f.stem}.{exact}.png"), 1024, exact))[3] == ""
            cpu[exact] += time.process_time() - start
            pngs[exact] = cv2.imread(str(tmp_path / f"{f.stem}.{exact}.png"), cv2.IMREAD_GRAYSCALE)
        mad, shift = differences(pngs[True], pngs[False])
        assert mad <= 1.5 and shift < 0.25, (f.name, mad, shift)
    ratio = cpu[True] / cpu[False]
    figures(f"Kaggle-size JPEG 2000 at 1024 px: {ratio:.1f}x faster per core (exact {cpu[True] / 2:.2f} s, "
            f"fast {cpu[False] / 2:.2f} s per image)")
    assert ratio >= 3, cpu
