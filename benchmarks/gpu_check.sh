#!/usr/bin/env bash
# What one GPU can check (issue 16, point 5): the engine's CUDA code path against the executable
# specification, and speed and memory of one stage on the device (75 s on a 2-core CPU; capped at 300 s).
# Needs torch with CUDA and lightning (no hydra); never part of the tests or of .ci/run.
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 300 "${PYTHON:-python3}" benchmarks/gpu_check.py --device cuda "$@"
