#!/usr/bin/env bash
# The test command: set up ./.venv (scripts/setup.sh), lint (ruff) and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k router -x).
# Kernel tests run the Triton kernels on the CPU through TRITON_INTERPRET=1 (set by
# tests/kernels/conftest.py when there is no GPU); GPU-marked tests are skipped without one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The linter first (a second or so; pyproject.toml [tool.ruff]): style breaks fail CI too.
.venv/bin/ruff check .
# pytest's exit code 5 (no tests collected) is a failure here like any other non-zero code.
exec .venv/bin/python -m pytest "$@"
