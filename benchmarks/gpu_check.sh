#!/usr/bin/env bash
# The GPU check, on the device machine: install the carried wheels (benchmarks/gpu_wheels.sh made them),
# then run benchmarks/gpu_check.py (tiny-preset checks, then the 1.3b preset for a few steps). Usage there: bash benchmarks/gpu_check.sh "$OUT/gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR}
# --find-links with names (not files) lets pip pick the pydantic-core wheel of this Python.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site --find-links .whl \
  omegaconf pydantic pydantic-core annotated-types typing-inspection hjson deepspeed
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 benchmarks/gpu_check.py --out "$out"
