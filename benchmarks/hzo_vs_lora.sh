#!/usr/bin/env bash
# HZO against LoRA-FT (and MeZO, LMAO) at the demo's budget on the default model and task.
# Each run in its own process, one after another: prints accuracy, median s/step and peak RSS.
#   benchmarks/hzo_vs_lora.sh [OUT] [STEPS]
set -euo pipefail
out=${1:-runs/hzo-vs-lora}; steps=${2:-120}
common=(--model smollm2 --task rt-sst2 --steps "$steps" --batch-size 8 --n-train 1000 --n-dev 0 --n-test 300
        --no-progress --overwrite)
zotune=${ZOTUNE:-.venv/bin/zotune}
run() {
  name=$1; shift
  $zotune train "${common[@]}" --output "$out/$name" "$@" > /dev/null
  python3 - "$out/$name" "$name" <<'PY'
import json, statistics, sys, pathlib
folder, name = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
seconds = [8 / r["examples_per_s"] for r in rows if "examples_per_s" in r][1:]
result = json.loads((folder / "result.json").read_text())
print(f"| {name} | {result['test_accuracy']:.1%} | {statistics.median(seconds):.2f} | {result['peak_memory_mb']:.0f} |")
PY
}
echo "| run | test accuracy | s/step (median) | peak RSS (MB) |"
echo "|---|---|---|---|"
run lora-ft --method lora-ft --lr-fo 5e-4
run hzo-k1 --method hzo --lr-fo 3e-4 --no-zero-shot
run hzo-k3 --method hzo --lr-fo 1e-3 --deep-blocks 3 --no-zero-shot
run hzo-k4 --method hzo --lr-fo 1e-3 --deep-blocks 4 --no-zero-shot
run hzo-paper --method hzo --lr-fo 1e-3 --deep-blocks 3 --order zo-first --estimator spsa --no-stacked --no-zero-shot
run mezo --method mezo --lr-zo 1e-6 --eps 1e-3 --no-zero-shot
run lmao --method lmao --lr-fo 5e-4 --lr-zo 1e-6 --eps 1e-3 --no-zero-shot
