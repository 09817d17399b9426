"""Image reading on the real files: JPEG 2000 DICOMs, RGB/grayscale PNG, JPEG; PNG-set preparation; box resizing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxr.boxes import to_original, to_resized
from cxr.images import prepare_png_set, read_dicom, read_image
from cxr.io import DataError
from tests.conftest import MANIFEST, SHARED, real


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return pd.read_csv(real(MANIFEST), dtype={"image_id": str})


def test_real_dicoms_decode(manifest):
    dicoms = manifest[manifest["format"].str.startswith("DICOM")]
    assert len(dicoms) == 5
    for row in dicoms.itertuples():
        path = SHARED / row.file
        image = read_dicom(path)
        assert image.dtype == np.uint8 and image.shape == (row.height, row.width), row.file
        assert image.min() == 0 and image.max() == 255
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array.astype(float)[::8, ::8].ravel()
        corr = np.corrcoef(raw, image[::8, ::8].astype(float).ravel())[0, 1]
        # MONOCHROME1 stores air bright: decoding must invert it so the body is bright as in PNG sets
        expected_sign = -1 if ds.PhotometricInterpretation == "MONOCHROME1" else 1
        assert corr * expected_sign > 0.8, (row.file, ds.PhotometricInterpretation, corr)


def test_real_png_and_jpeg(manifest):
    for row in manifest[~manifest["format"].str.startswith("DICOM")].itertuples():
        if row.width > 1100:  # the 2-3k px originals only slow the test down
            continue
        image = read_image(SHARED / row.file)
        assert image.ndim == 2 and image.dtype == np.uint8 and image.shape == (row.height, row.width), row.file


def test_sixteen_bit_png_and_errors(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "x.png"), (np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16))
    image = read_image(tmp_path / "x.png")
    assert image.dtype == np.uint8 and image.shape == (32, 64) and image.max() == 255
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: not a PNG file"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(DataError, match="unsupported image type '.gif'"):
        read_image(tmp_path / "x.gif")
    (tmp_path / "bad.dicom").write_bytes(b"\0" * 200)
    with pytest.raises(DataError, match="bad.dicom: cannot decode DICOM"):
        read_dicom(tmp_path / "bad.dicom")


def test_prepare_dicom_folder_and_skip_done_work(manifest, tmp_path):
    src = real("vindr-cxr-images/dfloreaa")
    out = tmp_path / "png64"
    meta = prepare_png_set(src, out, size=64, workers=2, progress=False).meta
    truth = manifest[manifest["format"].str.startswith("DICOM")].set_index("image_id")
    assert sorted(meta["image_id"]) == sorted(truth.index)
    for row in meta.itertuples():
        assert (row.dim0, row.dim1) == (truth.loc[row.image_id, "height"], truth.loc[row.image_id, "width"])
        assert read_image(out / f"{row.image_id}.png").shape == (64, 64)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert prepare_png_set(src, out, size=64, progress=False).converted == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps  # nothing redone
    assert not list(out.glob("*.tmp"))


def test_box_round_trip_non_square():
    boxes = np.array([[100.0, 250.0, 900.0, 2400.0], [0, 0, 2048, 2500]])
    orig, small = (2048, 2500), (256, 256)
    resized = to_resized(boxes, orig, small)
    np.testing.assert_allclose(resized[1], [0, 0, 256, 256])  # the whole image fills the square
    np.testing.assert_allclose(resized[0], [12.5, 25.6, 112.5, 245.76])  # per-axis factors 1/8, 256/2500
    np.testing.assert_allclose(to_original(resized, small, orig), boxes)


def test_real_resized_png_matches_original(manifest):
    """Kaggle's squashed 1024 PNG of a train image equals the original squashed with our factors."""
    row = manifest[manifest["file"].str.contains("resize1024_")].iloc[0]
    orig_row = manifest[manifest["file"].str.contains("orig_")].iloc[0]
    small = read_image(SHARED / row.file).astype(float)
    big = read_image(SHARED / orig_row.file)
    import cv2

    ours = cv2.resize(big, (1024, 1024), interpolation=cv2.INTER_AREA).astype(float)
    assert np.corrcoef(small.ravel(), ours.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("cut", [10, 200_000])
def test_real_jpeg2000_dicom_cut_short_is_an_error(manifest, tmp_path, cut):
    """A cut JPEG 2000 DICOM must fail, not decode into a partly grey image."""
    row = manifest[manifest["format"].str.startswith("DICOM")].iloc[0]
    data = (SHARED / row.file).read_bytes()
    (tmp_path / "cut.dicom").write_bytes(data[:-cut])
    with pytest.raises(DataError, match="cut.dicom: truncated"):
        read_dicom(tmp_path / "cut.dicom")
