"""Image reading on the real files: JPEG 2000 DICOMs, RGB/grayscale PNG, JPEG; PNG-set preparation; box resizing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from cxr.boxes import to_original, to_resized
from cxr.cli import main
from cxr.images import load, prepare_png_set, read_dicom, read_image
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


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("cut", [10, 200_000])
def test_real_jpeg2000_dicom_cut_short_is_an_error(manifest, tmp_path, cut, exact):
    """A cut JPEG 2000 DICOM must fail, not decode into a partly grey image; the reduced decode
    never reads the last bytes, so it must check for the end itself."""
    row = manifest[manifest["format"].str.startswith("DICOM")].iloc[0]
    data = (SHARED / row.file).read_bytes()
    (tmp_path / "cut.dicom").write_bytes(data[:-cut])
    with pytest.raises(DataError, match="cut.dicom: truncated"):
        load(tmp_path / "cut.dicom", 256, exact=exact)


# ---------------------------------------------------------------------------- files that cannot be used


def unusable_folder(root: Path) -> dict[str, str]:
    """A source folder with usable images (trailing bytes after the end marker included, one behind
    a folder link) and every kind of unusable entry; returns path under ``root/src`` -> expected reason."""
    src, elsewhere = root / "src", root / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (40, 36), dtype=np.uint8)
    cv2.imwrite(str(src / "good.png"), image)
    cv2.imwrite(str(elsewhere / "far.png"), image)
    (src / "linked").symlink_to(elsewhere)  # a link to a folder: searched like a folder
    png = (src / "good.png").read_bytes()
    (src / "tail.png").write_bytes(png + b"bytes some writers append")
    (src / "tail.jpg").write_bytes(cv2.imencode(".jpg", image)[1].tobytes() + b"\0" * 10 + b"after EOI")
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    (src / "progressive.jpg").write_bytes(progressive + b"xyz")
    (src / "a b.png").write_bytes(png)
    (src / "dangling.png").symlink_to(src / "gone.png")
    (src / "loop1.png").symlink_to(src / "loop2.png")
    (src / "loop2.png").symlink_to(src / "loop1.png")
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to(src)  # a folder link back up: a loop
    os.mkfifo(src / "pipe.png")  # reading it would block the run forever
    return {"a b.png": "unsafe image_id 'a b'", "dangling.png": "dangling symbolic link", "loop1.png": "symbolic link loop",
            "loop2.png": "symbolic link loop", "sub/up": "link to a folder already searched", "pipe.png": "not a regular file"}


USABLE = ["far", "good", "progressive", "tail"]  # tail.png and tail.jpg share the id: one of them is left out below


def test_prepare_lists_every_unusable_file_and_converts_the_rest(tmp_path, capsys):
    expected = unusable_folder(tmp_path)
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "tail.png").rename(src / "tail2.png")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--src", str(src), "--out", str(out), "--size", "16", "--workers", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {out / 'failed.csv'}: {len(expected)} file(s) failed and were skipped (file, reason)"
    failed = pd.read_csv(out / "failed.csv")
    reasons = {str(Path(f).relative_to(src)): r for f, r in zip(failed["file"], failed["reason"])}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
    assert sorted(pd.read_csv(out / "meta.csv")["image_id"]) == sorted([*USABLE, "tail2"])
    assert not (out / ".lock").exists()


def test_trailing_bytes_are_read_and_cut_files_still_refused(tmp_path):
    unusable_folder(tmp_path)
    src = tmp_path / "src"
    clean = read_image(src / "good.png")
    np.testing.assert_array_equal(read_image(src / "tail.png"), clean)
    for name in ("tail.jpg", "progressive.jpg"):
        data = (src / name).read_bytes()
        assert read_image(src / name).shape == clean.shape
        end = data.rindex(b"\xff\xd9")
        for cut in (end, end - 50):
            (tmp_path / "cut.jpg").write_bytes(data[:cut])
            with pytest.raises(DataError, match="truncated JPEG"):
                read_image(tmp_path / "cut.jpg")
    png = (src / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:-12] + b"\0" * 30)  # IEND lost, zero padding after it
    with pytest.raises(DataError, match="truncated PNG"):
        read_image(tmp_path / "cut.png")


def test_predict_images_lists_unusable_files_and_predicts_the_rest(tmp_path, monkeypatch, capsys):
    """The models are stubbed (no trained run needed): what is tested is which files reach them."""
    from cxr.dataset import PREDICTION_COLUMNS
    from ensemble import predict_images

    expected = unusable_folder(tmp_path)
    (tmp_path / "src" / "tail.png").unlink()
    run = tmp_path / "run"
    (run / "ensemble").mkdir(parents=True)
    (run / "ensemble" / "params.json").write_text("{}")
    monkeypatch.setattr(predict_images, "load_ensemble", lambda *args: None)
    monkeypatch.setattr(predict_images, "predict_view", lambda ens, view, ids: pd.DataFrame(columns=PREDICTION_COLUMNS))
    out = tmp_path / "out"
    predict_images.main(["--src", str(tmp_path / "src"), "--run-dir", str(run), "--out", str(out), "--size", "32",
                         "--workers", "0", "--overlay-px", "64"])
    captured = capsys.readouterr()
    summary = json.loads([line for line in captured.out.splitlines() if line.startswith("{")][-1])
    assert summary["images"] == len(USABLE) and summary["failed"] == len(expected), summary
    failed = pd.read_csv(out / "failed.csv")
    reasons = {str(Path(f).relative_to(tmp_path / "src")): r for f, r in zip(failed["file"], failed["reason"])}
    assert set(reasons) == set(expected) and "Traceback" not in captured.err
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == USABLE
