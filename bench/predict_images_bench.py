"""Images/s of ``python -m ensemble.predict_images`` with the demo models (prints figures; not a test).

    .venv/bin/python bench/predict_images_bench.py [--run-dir runs/demo --data data/demo] [--images 64]
        [--workers 2] [--memory] [--work DIR]

Without ``--run-dir`` it trains a short demo-like run first (every model, 3 folds, the demo
profiles cut to 1 epoch / 8 iterations but with the demo's own inference settings: low score
thresholds, so the fusion sees as many boxes as the demo's does; about 2 minutes on 2 cores) with
the gate forced on, so all four models run. The "new studies" are ``--images`` synthetic
radiographs at the models' size (``cxr synth``, original sizes from its meta file).

Prints: the end-to-end rate (decoding in ``--workers`` processes, every fold of every model,
fusion, gate, overlays, page; model loading counted apart), then each stage alone on the same
images, the decode rate of the real VinDr DICOMs when ../shared/data has them, and with
``--memory`` the peak memory of whole runs on N and 4N images (flat = streaming works).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr.dataset import PREDICTION_COLUMNS  # noqa: E402
from cxr.synth import SynthConfig, generate  # noqa: E402
from cxr.wbf import fuse_predictions  # noqa: E402
from ensemble.ensemble import apply  # noqa: E402
from ensemble.predict_images import (  # noqa: E402
    Decoded, decode, load_ensemble, predict_folder, stream, write_pictures, write_view,
)
from models.common import predict_checkpoints  # noqa: E402

DICOMS = REPO.parent / "shared" / "data" / "vindr-cxr-images" / "dfloreaa"
# Training cut short; inference keys (score_thr, max_det, tta) left as the demo profiles set them.
SHORT = {
    "yolo": ["epochs=1", "workers=0"],
    "detectron": ["epochs=1", "workers=0"],
    "effdet": ["epochs=1", "workers=0"],
    "classifier": ["epochs=1", "workers=0"],
}


def _jobs(src: Path, meta: Path | None, size: int) -> list[tuple]:
    sizes = pd.read_csv(meta, dtype={"image_id": str}).set_index("image_id") if meta else None
    jobs = []
    for p in sorted(x for x in src.rglob("*") if x.suffix.lower() in (".png", ".dicom", ".dcm")):
        original = (int(sizes.loc[p.stem, "dim1"]), int(sizes.loc[p.stem, "dim0"])) if sizes is not None else None
        jobs.append((p.stem, str(p), size, 1024, original))
    return jobs


def stages(run: Path, src: Path, meta: Path, size: int, workers: int, batch: int) -> None:
    """Each stage alone on every image (decoded once, then reused)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = _jobs(src, meta, size)
    start = time.perf_counter()
    ens = load_ensemble(run, "classifier", None)
    print(f"  load models    {time.perf_counter() - start:6.1f} s  ({len(ens.detectors)} detectors"
          f"{' + classifier' if ens.classifier else ''}, {max(len(m.folds) for m in ens.detectors)} folds each; "
          "weight 0: none)")
    with ProcessPoolExecutor(workers) as pool:
        start = time.perf_counter()
        batches: list[list[Decoded]] = list(stream(jobs, batch, pool))
        _rate("decode+squash", len(jobs), time.perf_counter() - start, f"{workers} process(es)")
    with tempfile.TemporaryDirectory() as tmp:
        views = [(write_view(Path(tmp) / f"b{k}", b), [d.image_id for d in b]) for k, b in enumerate(batches)]
        tables: dict[str, list] = {}
        for m in ens.detectors:
            start = time.perf_counter()
            tables[m.name] = [[predict_checkpoints(f, v, "test", ids, m.batch, tta=m.tta, **m.views) for f in m.folds]
                              for v, ids in views]
            _rate(m.name, len(jobs), time.perf_counter() - start, f"{len(m.folds)} folds, tta={m.tta}")
        p_abnormal = []
        if ens.classifier:
            start = time.perf_counter()
            for v, ids in views:
                paths = [v.image("test", i) for i in ids]
                p_abnormal.append(pd.concat([pd.Series(f(paths), index=ids) for f in ens.classifier.folds], axis=1).mean(axis=1))
            _rate("classifier", len(jobs), time.perf_counter() - start, f"{len(ens.classifier.folds)} folds")
        start = time.perf_counter()
        fused = []
        for k, (v, ids) in enumerate(views):
            per_model = [fuse_predictions(tables[m.name][k], v.test_sizes) if m.folds else
                         pd.DataFrame(columns=PREDICTION_COLUMNS) for m in ens.detectors]
            fused.append(apply(ens.params, per_model, v.test_sizes, p_abnormal[k] if p_abnormal else None))
        boxes = sum(int((f["class_id"] != 14).sum()) for f in fused)
        _rate("fold+model WBF, gate", len(jobs), time.perf_counter() - start, f"{boxes / len(jobs):.0f} boxes/image out")
        start = time.perf_counter()
        for b, f in zip(batches, fused):
            write_pictures(b, f, Path(tmp) / "out", 0.3)
        _rate("overlays+thumbs", len(jobs), time.perf_counter() - start, "1024 px PNG + JPEG")


def _rate(name: str, n: int, seconds: float, note: str = "") -> None:
    print(f"  {name:22s} {n / seconds:7.2f} img/s  ({seconds:6.1f} s for {n}){'  ' + note if note else ''}", flush=True)


def peak_memory(run: Path, data: Path, n: int, root: Path, workers: int) -> float:
    """Peak RSS (MiB) of one whole command in a fresh process on ``n`` synthetic images."""
    src = generate(SynthConfig(out=str(root / f"mem{n}"), n_train=4, n_test=n, size=128, seed=11))
    # VmHWM of the process's own address space: ru_maxrss would carry the parent's peak across fork + exec
    code = (
        "import re, sys; from ensemble.predict_images import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code, "--src", str(src / "test"), "--run-dir", str(run),
                          "--out", str(root / f"out_mem{n}"), "--data", str(data), "--meta", str(src / "test_meta.csv"),
                          "--workers", str(workers)], capture_output=True, text=True, cwd=REPO, check=True)
    return int(out.stdout.split("MAXRSS")[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="a trained run with tuned parameters (default: train a short one)")
    p.add_argument("--data", help="its DATA folder (the input size)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--memory", action="store_true", help="also peak memory of whole runs on N and 4N images")
    p.add_argument("--work", help="working folder, kept (default: a temporary one); a short run trained there is reused")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.work or tmp)
        if a.run_dir:
            run, data = Path(a.run_dir), Path(a.data)
        elif (root / "short" / "run" / "ensemble" / "params.json").exists():
            run, data = root / "short" / "run", root / "short" / "data"
        else:
            from tests.test_predict_images import train_tiny_run

            start = time.perf_counter()
            trained = train_tiny_run(root / "short", n_train=60, n_test=6, n_folds=3, sets=SHORT)
            run, data = trained["run"], trained["data"]
            print(f"trained a short demo-like run in {time.perf_counter() - start:.0f} s")
        for old in ("out", "out_mem*"):  # outputs of an earlier call in --work: measure from scratch
            for d in root.glob(old):
                shutil.rmtree(d)
        new = generate(SynthConfig(out=str(root / "new"), n_train=4, n_test=a.images, size=128, seed=7))
        size = 128
        print(f"\n{a.images} new images at {size} px, run {run}, {os.cpu_count()} CPU(s), torch threads default")
        start = time.perf_counter()
        summary = predict_folder(new / "test", run, root / "out", size, str(new / "test_meta.csv"), None, 0.3,
                                 a.batch, a.workers)
        wall = time.perf_counter() - start
        print(f"end to end: {summary['images'] / wall:.2f} img/s ({wall:.1f} s for {summary['images']}, model loading included)")
        print("stages:")
        stages(run, new / "test", new / "test_meta.csv", size, a.workers, a.batch)
        if DICOMS.is_dir():
            jobs = _jobs(DICOMS, None, 1024)
            start = time.perf_counter()
            for j in jobs:
                decode(j)
            _rate("real DICOM decode", len(jobs), time.perf_counter() - start,
                  "JPEG 2000, ~2000x2000, one process; divide by --workers for the pool")
        if a.memory:
            small, large = peak_memory(run, data, a.images, root, a.workers), peak_memory(run, data, 4 * a.images, root, a.workers)
            print(f"peak memory of the command: {small:.0f} MiB on {a.images} images, {large:.0f} MiB on {4 * a.images}")
    print(f"(this process peaked at {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
