#!/usr/bin/env bash
# The main job on the embedded defaults: set up ./.venv, then the memory ablation on
# five-session recall with the tiny preset (configs/experiments/recall5.yaml): train the
# Engram model and the no-memory baseline with the one trainer, evaluate every arm through the
# real trace store (LMDB + FAISS in runs/recall5-ablate/seed0/<arm>/store), print the table
# and the path of ablation.png. Extra arguments go to `engram ablate`, e.g.
#   scripts/demo.sh --seeds 0 1 2            (three training seeds: about three times as long)
#   scripts/demo.sh train.steps=300           (any key=value override of the experiment)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/engram ablate configs/experiments/recall5.yaml "$@"
