"""Throughput of `cxr prepare` on the real images in ../shared/data (JPEG 2000 DICOMs, PNGs).

    .venv/bin/python bench/prepare_bench.py [--size 1024] [--workers 0]

Copies nothing into the repo: converts into a temp folder and prints images/s per source kind,
with one worker and with one per core. Not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cxr.images import prepare_png_set

SHARED = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCES = {
    "JPEG 2000 DICOM (1840-2008 px wide)": "vindr-cxr-images/dfloreaa",
    "PNG 1024 px (k-Rohit; copied)": "vindr-cxr-images/k-Rohit",
    "PNG 512-3072 px (aqx95; resized)": "vindr-cxr-images/aqx95",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="0: one per core")
    a = p.parse_args()
    cores = a.workers or os.cpu_count() or 1
    for name, rel in SOURCES.items():
        src = SHARED / rel
        if not src.is_dir():
            sys.exit(f"{src} not found (set CXR_SHARED_DATA)")
        for workers in sorted({1, cores}):
            with tempfile.TemporaryDirectory() as tmp:
                r = prepare_png_set(src, tmp, a.size, workers, progress=False)
            print(f"{name:38s} -> {a.size}px, {workers:2d} worker(s): {len(r.meta)} images in {r.seconds:5.1f} s = "
                  f"{r.converted / r.seconds:6.2f} images/s" + (f", {len(r.failed)} failed" if len(r.failed) else ""))


if __name__ == "__main__":
    main()
