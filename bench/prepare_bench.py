"""`cxr prepare` per image: the exact JPEG 2000 decode against the fast (reduced-resolution) one.

    .venv/bin/python bench/prepare_bench.py [--sizes 1024 512] [--kaggle 6] [--png]

Two sets of JPEG 2000 DICOMs, each converted twice in this one process (``convert_one``: decode,
display table, squash, PNG encode, write), exactly (``--exact``) and fast (the default):

* the 5 real VinDr DICOMs in ../shared/data (1840-2008 x 1984-2280 px, 12 bit, MONOCHROME1);
* ``--kaggle N`` Kaggle-size files written here into a temp folder (2500-3000 px: the real
  pixels upscaled, with noise that restores the fine-grain entropy; MONOCHROME1 and 2, half
  of them with a window in rescaled units), as JPEG 2000 lossless by pydicom.

Printed per set and size: images/s per core (CPU seconds of this process, so the machine's load
and core count do not enter), the ratio, the mean absolute grey-level difference between the two
PNGs (mean and worst image), the largest single-pixel difference, the largest shift (phase
correlation, output pixels) and how many files fell back to a full decode; then the hours the
18,000 Kaggle images take on 2 and 16 cores at 1024 px. ``--png`` adds the wall-clock rate of
whole ``prepare`` runs on the real PNG sets. Copies nothing into the repo. Not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from cxr import dicom
from cxr.images import convert_one, prepare_png_set

SHARED = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_DICOMS = "vindr-cxr-images/dfloreaa"
PNG_SOURCES = {
    "PNG 1024 px (k-Rohit; copied)": "vindr-cxr-images/k-Rohit",
    "PNG 512-3072 px (aqx95; resized)": "vindr-cxr-images/aqx95",
}
KAGGLE_IMAGES = 18_000  # train + test


def kaggle_size_files(real: list[Path], folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG 2000 DICOMs of 2500-3000 px made from the real ones (see the module docstring)."""
    import pydicom

    rng = np.random.default_rng(seed)
    files = []
    for k in range(n):
        stored = pydicom.dcmread(real[k % len(real)]).pixel_array.astype(np.float32)
        h, w = int(rng.integers(2700, 3000)), int(rng.integers(2500, 2900))
        big = cv2.resize(stored, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w))
        big = np.clip(big, 0, 4095).astype(np.uint16)
        windowed = k % 2 == 1  # rescale 2x - 1000, window over the middle of the rescaled range
        photometric = "MONOCHROME1" if k % 4 < 2 else "MONOCHROME2"
        files.append(dicom.write_dicom(folder / f"kaggle{k}.dicom", big, photometric, rescale=(2, -1000) if windowed else None,
                                       window=(3000, 6000) if windowed else None, jpeg2000=True))
    return files


def compare(files: list[Path], size: int, tmp: Path) -> dict:
    """CPU seconds of both paths over ``files`` and the differences of their PNGs."""
    cpu = {True: 0.0, False: 0.0}
    mads, worst, shifts = [], 0, []
    before = dict(dicom.DECODES)
    for f in files:
        pngs = {}
        for exact in (True, False):
            dst = tmp / f"{f.stem}.{'exact' if exact else 'fast'}.png"
            start = time.process_time()
            _, _, _, error = convert_one((str(f), str(dst), size, exact))
            cpu[exact] += time.process_time() - start
            if error:
                sys.exit(f"{f}: {error}")
            pngs[exact] = cv2.imread(str(dst), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        diff = np.abs(pngs[True] - pngs[False])
        mads.append(float(diff.mean()))
        worst = max(worst, int(diff.max()))
        inner = (slice(8, -8), slice(8, -8))  # the borders' replicated pixels would weigh in
        (dx, dy), _ = cv2.phaseCorrelate(pngs[True][inner].copy(), pngs[False][inner].copy())
        shifts.append(max(abs(dx), abs(dy)))
    return {"n": len(files), "exact": len(files) / cpu[True], "fast": len(files) / cpu[False],
            "mad_mean": float(np.mean(mads)), "mad_max": max(mads), "max_diff": worst, "shift": max(shifts),
            "fallbacks": dicom.DECODES["full_again"] - before["full_again"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--kaggle", type=int, default=6, help="Kaggle-size files to write and convert (0: none)")
    p.add_argument("--png", action="store_true", help="also time whole prepare runs on the real PNG sets")
    a = p.parse_args()
    real = sorted((SHARED / REAL_DICOMS).rglob("*.dicom"))
    if not real:
        sys.exit(f"{SHARED / REAL_DICOMS}: no DICOMs (set CXR_SHARED_DATA)")
    cv2.setNumThreads(1)  # one core: per-core figures
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"real VinDr DICOMs (~2000 px)": real}
        if a.kaggle:
            (tmp / "kaggle").mkdir()
            sets[f"Kaggle-size J2K ({a.kaggle} written, 2500-3000 px)"] = kaggle_size_files(real, tmp / "kaggle", a.kaggle)
        print(f"{'set':44s} {'size':>5s} {'n':>3s} {'exact/s':>8s} {'fast/s':>7s} {'ratio':>6s} "
              f"{'MAD mean':>8s} {'MAD max':>8s} {'max diff':>8s} {'shift px':>8s} {'full again':>10s}")
        for name, files in sets.items():
            for size in a.sizes:
                r = compare(files, size, tmp)
                rates[name, size] = r
                print(f"{name:44s} {size:5d} {r['n']:3d} {r['exact']:8.2f} {r['fast']:7.2f} {r['fast'] / r['exact']:5.2f}x "
                      f"{r['mad_mean']:8.3f} {r['mad_max']:8.3f} {r['max_diff']:8d} {r['shift']:8.3f} {r['fallbacks']:10d}")
    print("images/s per core = images / CPU seconds of decode + display table + squash + PNG encode + write")
    for (name, size), r in rates.items():
        if name.startswith("Kaggle") and size == 1024:
            for cores in (2, 16):
                print(f"{KAGGLE_IMAGES} Kaggle images at 1024 px on {cores:2d} cores: exact "
                      f"{KAGGLE_IMAGES / r['exact'] / cores / 3600:.2f} h, fast {KAGGLE_IMAGES / r['fast'] / cores / 3600:.2f} h")
    if a.png:
        cores = os.cpu_count() or 1
        for name, rel in PNG_SOURCES.items():
            for workers in sorted({1, cores}):
                with tempfile.TemporaryDirectory() as tmp:
                    r = prepare_png_set(SHARED / rel, tmp, 1024, workers, progress=False)
                print(f"{name:38s} -> 1024px, {workers:2d} worker(s): {len(r.meta)} images in {r.seconds:5.1f} s = "
                      f"{r.converted / r.seconds:6.2f} images/s (wall)")


if __name__ == "__main__":
    main()
