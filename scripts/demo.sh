#!/usr/bin/env bash
# The main job on the embedded defaults: set up ./.venv, prepare the Shakespeare corpus into
# ./cache (downloaded once, never committed), train the `tiny` preset (a hierarchical mHC
# FFN) on this machine within its time budget, and print the validation loss.
# Extra arguments are config overrides, e.g. scripts/demo.sh model.ffn.kind=progressive
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/engram train configs/tiny.yaml "$@"
