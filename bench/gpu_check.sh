#!/usr/bin/env bash
# One short GPU run over the real adapters (see bench/gpu_check.py). Usage: bash bench/gpu_check.sh [models]
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
.venv/bin/python bench/gpu_check.py ${1:+--models "$1"}  # default: every model in models/__init__.py
