#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install torch, then this package with its dev extras.
# Usage: bash tools/install.sh [VENV_DIR]   (used by `make train` / `make test`)
# torch: the pinned 2.13.0; with an NVIDIA GPU the default (CUDA) build, without one the CPU
# build: a local wheel if pip can find one (then its dependencies from the usual indexes), else
# PyTorch's CPU index (a plain `pip install torch`
# would pull several GB of CUDA libraries onto a machine that cannot use them).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
if command -v nvidia-smi >/dev/null 2>&1; then
  "$py" -m pip install --quiet "torch==2.13.0"
else
  # a local CPU wheel (pip's find-links) without its dependencies first, then the dependencies
  # from the usual indexes (torch is then satisfied, so no CUDA build is fetched)
  if "$py" -m pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    "$py" -m pip install --quiet "torch==2.13.0"
  else
    "$py" -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$py" -m pip install --quiet numpy
"$py" -m pip install --quiet -e ".[dev]"
"$py" -c "import torch, lightning; print('installed: torch', torch.__version__, 'lightning', lightning.__version__, 'in $venv')"
