#!/usr/bin/env bash
# Create ./.venv and install the project with everything the demo and the tests need.
# Idempotent and quick when nothing changed (a stamp file records the last install).
#
# torch is installed first, explicitly, so pip never picks a wheel by accident:
#   * a machine with an NVIDIA GPU (nvidia-smi works) gets PyPI's default torch (CUDA build,
#     with its matching triton);
#   * any other machine gets torch==2.13.0 (the CPU wheel on our dev/CI machines) plus
#     triton==3.6.0, the version on our GPU machine, for TRITON_INTERPRET=1 kernel tests.
# Override with TORCH_SPEC="torch==X" and/or TORCH_INDEX_URL=... (for instance PyTorch's CPU
# wheel index on a CPU-only machine elsewhere, to avoid downloading CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
VPY=.venv/bin/python
STAMP=.venv/.engram-installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
    exit 0
fi

pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HAS_GPU=1
else
    HAS_GPU=0
fi

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch (gpu=$HAS_GPU)"
    if [ "$HAS_GPU" = 1 ]; then
        pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch}"
    else
        pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
if [ "$HAS_GPU" = 0 ] && [ "$(uname -s)" = Linux ]; then
    pip_install "triton==3.6.0"
fi

echo "setup: installing the project and its dependencies into .venv"
pip_install -e ".[dev]"
touch "$STAMP"
