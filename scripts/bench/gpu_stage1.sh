#!/usr/bin/env bash
# Stage-1 GPU benchmark (one GPU, < 6 minutes): img/s, MFU, peak memory at 256², batches 16 and 64, ours vs naive.
# Random weights at SD2.1-base / OpenCLIP-H / SigLIP-so400m shapes; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"; [[ -x "$PY" ]] || PY=python
export HF_HUB_OFFLINE=1
timeout 340 "$PY" scripts/bench/gpu_stage1.py --batches 16 64 --steps 10 "$@"
