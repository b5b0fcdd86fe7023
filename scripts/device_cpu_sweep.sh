#!/usr/bin/env bash
# Runs on a larger machine (the GPU box's CPUs): the four FFN kinds at equal active parameters
# (train.max_minutes each, 2 threads per run, like our 2-core machine) and the memory ablation
# for several seeds, all concurrently, each process pinned to 2 threads. Usage:
#   bash scripts/device_cpu_sweep.sh OUT_DIR [KIND_MINUTES] [ABLATE_MINUTES] [SEEDS...]
set -uo pipefail
out=${1:?OUT_DIR}; kind_min=${2:-8}; abl_min=${3:-5}; shift 3 || true
seeds=${*:-0 1 2}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 MHC_KERNELS=torch
for k in dense flat_moe hierarchical progressive; do
    python3 -m sessions train configs/tiny.yaml model.ffn.kind=$k train.device=cpu \
        train.threads=2 train.max_minutes=$kind_min --out "$work/kind_$k" --quiet --json \
        > "$out/kind_$k.json" 2> "$work/kind_$k.err" &
done
for s in $seeds; do
    python3 -m sessions ablate configs/tiny.yaml train.device=cpu train.threads=2 --seeds $s \
        --minutes "$abl_min" --out "$work/ablate_$s" --quiet > "$work/ablate_$s.log" 2>&1 &
done
wait
for s in $seeds; do cp "$work/ablate_$s/ablation.json" "$out/ablation_seed$s.json"; done
tail -n 3 "$work"/*.err "$work"/ablate_*.log
