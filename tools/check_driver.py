"""Before ``make install`` downloads ~7 GB: can this machine's NVIDIA driver and cards run the torch build?

    python3 tools/check_driver.py [--cuda 13.0|12.6]        (make install runs it first; TORCH_CUDA picks the build)

Reads ``nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader``. Without
``nvidia-smi`` there is nothing to check (a CPU machine: the tests and the demo run there). A driver
older than the build needs, or a card outside the build's compute capabilities, is one line naming the
build to use instead, exit 2. Standard library only: it runs before the venv exists.

The builds (the PyTorch release notes and NVIDIA's CUDA release notes, "CUDA Toolkit and Corresponding
Driver Versions" and the minor-version compatibility table):

- 13.0 (PyPI's default torch wheel on Linux): driver R580 or newer (580.65.06); cards of compute
  capability 7.5 to 12.0 (Turing T4/RTX 20 and newer: A10, A100, L4, L40S, H100, H200, RTX 30/40/50).
- 12.6 (``TORCH_CUDA=12.6``: download.pytorch.org/whl/cu126): driver R525 or newer (525.60.13, CUDA 12's
  minor-version compatibility); compute capability 5.0 to 9.0, which adds Pascal (P100, Kaggle's P100)
  and Volta (V100).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

BUILDS = {  # CUDA build -> (lowest driver, lowest and highest compute capability)
    "13.0": ((580, 65, 6), (7, 5), (12, 0)),
    "12.6": ((525, 60, 13), (5, 0), (9, 0)),
}


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split("."))


def problems(cards: list[tuple[str, str, str]], build: str) -> list[str]:
    """What stops ``build`` on these cards: (name, driver version, compute capability) from nvidia-smi."""
    driver_min, cc_low, cc_high = BUILDS[build]
    other = next(b for b in BUILDS if b != build)
    found = []
    for name, driver, cc in cards:
        if version(driver) < driver_min:
            fix = f"TORCH_CUDA={other}" if version(driver) >= BUILDS[other][0] else "a newer NVIDIA driver"
            found.append(f"driver {driver} is older than R{driver_min[0]} ({'.'.join(map(str, driver_min))}), "
                         f"which the CUDA {build} build of torch needs: make install {fix} "
                         f"(or update the driver)")
        elif not cc_low <= version(cc)[:2] <= cc_high:
            low, high = BUILDS[other][1:]
            fix = f"TORCH_CUDA={other}" if low <= version(cc)[:2] <= high else "another card"
            found.append(f"{name} (compute capability {cc}) is outside the CUDA {build} build's "
                         f"{'.'.join(map(str, cc_low))}-{'.'.join(map(str, cc_high))}: make install {fix}")
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/check_driver.py", description=__doc__.splitlines()[0])
    p.add_argument("--cuda", default="13.0", help=f"the torch build: {', '.join(BUILDS)} (make's TORCH_CUDA)")
    a = p.parse_args(argv)
    if a.cuda not in BUILDS:
        print(f"error: TORCH_CUDA={a.cuda}: one of {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    smi = shutil.which("nvidia-smi")
    if smi is None:
        print(f"driver check: no nvidia-smi (a machine without NVIDIA GPUs): torch's CUDA {a.cuda} build runs on the CPU")
        return 0
    done = subprocess.run([smi, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60, check=False)
    rows = [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or not rows or any(len(r) != 3 for r in rows):
        print(f"error: nvidia-smi cannot report the cards (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
              f" -- is the NVIDIA driver loaded?", file=sys.stderr)
        return 2
    try:
        found = problems([tuple(r) for r in rows], a.cuda)
    except ValueError:
        print(f"error: nvidia-smi printed {done.stdout.strip()!r}, not name, driver version, compute capability",
              file=sys.stderr)
        return 2
    if found:
        print(f"error: {found[0]}", file=sys.stderr)
        return 2
    print(f"driver check: {len(rows)} card(s) ({', '.join(sorted({r[0] for r in rows}))}), driver {rows[0][1]}: "
          f"the CUDA {a.cuda} build of torch runs here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
