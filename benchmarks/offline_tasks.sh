#!/bin/sh
# Zero-shot and in-context (ICL) baselines of the offline tasks on the default model (MeZO protocol sizes where
# they fit a CPU: 300 test examples, demonstrations from the seed-0 training sample).
# Usage: sh benchmarks/offline_tasks.sh [K]   (prints one JSON line per task and baseline)
K=${1:-4}
for task in rt-sst2 rt-sst5 rt-subj tweet-3 rt-movie-qa; do
  .venv/bin/zotune eval --model smollm2 --task "$task" --n-train 100 --n-dev 0 --n-test 300 --no-progress
  .venv/bin/zotune eval --model smollm2 --task "$task" --n-train 100 --n-dev 0 --n-test 300 --icl "$K" \
    --max-length 512 --eval-batch-size 8 --no-progress
done
