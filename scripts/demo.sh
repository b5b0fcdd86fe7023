#!/usr/bin/env bash
# The main job on the embedded defaults: set up ./.venv and run the memory ablation on the
# `tiny` preset (train the Engram model on cross-session recall for ~8 minutes, train the
# no-memory baseline alike, evaluate every arm), printing the table; results in runs/ablate/.
# Extra arguments go to `engram ablate`, e.g. scripts/demo.sh --seeds 0 1 2 --minutes 5
# (the backbone alone: .venv/bin/engram train configs/tiny.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/engram ablate configs/tiny.yaml "$@"
