#!/bin/sh
# The fine-tuned column of the offline-tasks table: LoRA-FT on every offline task with the demo's budget
# (the settings of `zotune demo`: 120 steps of 8, lr 5e-4, 1000 training examples, 300 test examples).
# Usage: sh benchmarks/offline_methods.sh [METHOD] [STEPS]   (results: runs/offline-METHOD-TASK/result.json)
set -e
METHOD=${1:-lora-ft}
STEPS=${2:-120}
for task in rt-sst2 rt-sst5 rt-subj tweet-3 rt-movie-qa; do
  .venv/bin/zotune train --model smollm2 --task "$task" --method "$METHOD" --steps "$STEPS" --batch-size 8 --lr-fo 5e-4 \
    --n-train 1000 --n-dev 0 --n-test 300 --eval-batch-size 32 --no-progress --overwrite --output "runs/offline-$METHOD-$task"
done
