#!/bin/sh
# MeZO on rt-sst2 (default model) minimising cross-entropy against minus the minibatch accuracy, at equal steps.
# Usage: sh benchmarks/objectives.sh [STEPS]   (results: runs/objective-*/result.json)
set -e
STEPS=${1:-200}
for objective in loss accuracy; do
  .venv/bin/zotune train --method mezo --task rt-sst2 --objective "$objective" --steps "$STEPS" --batch-size 16 \
    --n-train 1000 --n-dev 0 --n-test 300 --eval-batch-size 32 --max-length 64 --lr-zo 1e-5 --eps 1e-3 \
    --no-progress --overwrite --output "runs/objective-$objective"
done
