#!/usr/bin/env bash
# GPU check of every full profile at its own size (see bench/gpu_check.py), each model in its own process and
# time limit: AMP training steps, a prediction pass, images/s, peak memory and the hours of a 5-fold run on this
# card; a table of every model at the end, exit 1 when any failed (its log and run folder are kept).
# At most 6 minutes in all (--budget; per-model limits: --limit); about 3-4 minutes expected on one H100/H200.
#
# Usage: bash bench/gpu_check.sh [--models yolo,effdet] [--limit [MODEL=]SECONDS] [--budget SECONDS]
#                                [--workers N] [--keep] [--json FILE] [--smoke] [--fail MODEL[:hang]]
#        bash bench/gpu_check.sh yolo,effdet           (the old form: = --models yolo,effdet)
#        PYTHON=/path/to/python bash bench/gpu_check.sh   (default: this checkout's .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: no Python at $PYTHON: run make install, or set PYTHON=/path/to/python" >&2
    exit 2
fi
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
    set -- --models "$@"
fi
# every card as the driver numbers them (CUDA_VISIBLE_DEVICES may reorder them for torch: the check prints its own)
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" bench/gpu_check.py "$@"
