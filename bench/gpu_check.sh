#!/usr/bin/env bash
# GPU check of every full profile at its own size (see bench/gpu_check.py): AMP training steps, a prediction
# pass, images/s, peak memory and the hours of a 5-fold run on this card; at most 8 minutes on one modern GPU.
# Usage: bash bench/gpu_check.sh [yolo,effdet]   (default: every model in models/__init__.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv,noheader || true
exec .venv/bin/python bench/gpu_check.py ${1:+--models "$1"}
