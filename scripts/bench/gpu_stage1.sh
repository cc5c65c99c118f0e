#!/usr/bin/env bash
# Stage-1 GPU benchmark alone (one GPU, ~4.5 min): img/s, MFU, peak memory at 256² and 512², ours vs naive, batch sweep,
# each optimisation on its own. Random weights at SD2.1-base / OpenCLIP-H / SigLIP-so400m shapes; nothing downloaded.
# It is part 1 of scripts/bench/gpu_all.sh (same setup: carried packages, budgets, results under $OUT or runs/bench/gpu/);
# run that for every part of issue #21. Dry mode on a CPU: bash scripts/bench/gpu_stage1.sh --cpu
exec bash "$(dirname "$0")/gpu_all.sh" --only stage1 "$@"
