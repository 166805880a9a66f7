#!/bin/sh
# MeZO on the default model with 1 and 2 processes on this machine's CPU (gloo): seconds per step.
# One process uses every core; each of 2 processes one core (torchrun's default).
# Usage: sh benchmarks/distributed.sh [STEPS]   (results: runs/dist-*/result.json, train_seconds / steps)
set -e
STEPS=${1:-10}
COMMON="--model smollm2 --task rt-sst2 --method mezo --steps $STEPS --batch-size 16 --n-train 1000 --n-dev 0
  --n-test 32 --no-zero-shot --max-length 64 --lr-zo 1e-6 --no-progress --overwrite --checkpoint trajectory"
TWO=".venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 -m zotune"
.venv/bin/zotune train $COMMON --output runs/dist-1
$TWO train $COMMON --output runs/dist-2-data
$TWO train $COMMON --shard --output runs/dist-2-shard
.venv/bin/zotune train $COMMON --n-samples 2 --output runs/dist-1-n2
$TWO train $COMMON --n-samples 2 --parallel perturbations --output runs/dist-2-perturbations
for run in dist-1 dist-2-data dist-2-shard dist-1-n2 dist-2-perturbations; do
  .venv/bin/python -c "import json,sys; r=json.load(open('runs/$run/result.json')); \
print('$run', round(r['train_seconds'] / r['steps'], 3), 's/step', r['peak_memory_mb'], 'MB peak RSS (rank 0)')"
done
