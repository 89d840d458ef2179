#!/usr/bin/env bash
# Create .venv with raylm and everything it needs. Safe to re-run.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first,
# so nothing later pulls a multi-GB CUDA build. TORCH_SPEC overrides the pick.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's own warnings about this machine's pip.conf are noise; its exit status is not (pipefail keeps it).
quiet() { grep -v "is ignored" || true; }
python -m pip install -q --upgrade pip 2>&1 | quiet
if ! python -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      TORCH_SPEC="torch"
    else
      TORCH_SPEC="torch==2.13.0"  # the CPU wheel this machine kind keeps on disk
    fi
  fi
  echo "setup: installing $TORCH_SPEC"
  python -m pip install -q "$TORCH_SPEC" 2>&1 | quiet
fi
echo "setup: installing raylm and its dependencies"
# uv installs the ~180 packages in ~20 s where pip took ~2 min (2-core EPYC, 2026-12-01). It reads no pip.conf: the
# torch installed above is pinned so that nothing replaces it, and where uv fails (say, an index only pip.conf
# names) pip installs them.
python -m pip install -q uv 2>&1 | quiet
python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > .venv/torch-pin.txt
if ! python -m uv pip install -q --python "$(command -v python)" --constraint .venv/torch-pin.txt -e ".[test,hf]"; then
  echo "setup: uv could not install them; pip installs them"
  python -m pip install -q -e ".[test,hf]" 2>&1 | quiet
fi
python -c "import raylm, torch, deepspeed, ray, transformers, lm_eval, pytest_timeout, moto.server, gcp_storage_emulator" || { echo "setup: the install failed; see the output above" >&2; exit 1; }
# Where PYTHONDONTWRITEBYTECODE is set (these machines set it), no process caches its compiled modules, so each
# Ray worker, rank and CLI call would compile the raylm modules it imports again (all of raylm takes 0.16 s on a
# 2-core EPYC: hundreds of processes in the test suite); Python still reads compiled files that exist, and
# recompiles in memory any whose source changed since.
python -m compileall -q raylm tests benchmarks
echo "setup: ready (.venv)"
