#!/usr/bin/env bash
# Zero-shot, MeZO, LoRA-FT and LMAO at equal steps on the default model and task.
# Each method runs in its own process so that peak RSS (CPU) / peak CUDA memory is its own.
#   benchmarks/compare_methods.sh [STEPS] [N_TEST] [OUT]
# ZO="--direction rademacher --estimator one-sided" passes zeroth-order options to mezo and lmao.
set -euo pipefail
steps=${1:-60}; n_test=${2:-300}; out=${3:-runs/compare}
common=(--model smollm2 --task rt-sst2 --steps "$steps" --batch-size 8 --n-train 1000 --n-dev 0
        --n-test "$n_test" --no-progress --overwrite)
zotune=${ZOTUNE:-.venv/bin/zotune}
read -r -a zo <<< "${ZO:-}"
$zotune train "${common[@]}" --method lora-ft --lr-fo 5e-4 --output "$out/lora-ft"
$zotune train "${common[@]}" --method lmao --lr-fo 5e-4 --lr-zo 1e-6 --eps 1e-3 --no-zero-shot "${zo[@]}" --output "$out/lmao"
$zotune train "${common[@]}" --method mezo --lr-zo 1e-6 --eps 1e-3 --no-zero-shot "${zo[@]}" --output "$out/mezo"
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {m: json.loads((out / m / "result.json").read_text()) for m in ("lora-ft", "lmao", "mezo")}
print("| method | test accuracy | train s | s/step | peak memory (MB) |")
print("|---|---|---|---|---|")
print(f"| zero-shot | {rows['lora-ft']['zero_shot_accuracy']:.1%} | | | |")
for m, r in rows.items():
    print(f"| {m} | {r['test_accuracy']:.1%} | {r['train_seconds']:.0f} | {r['train_seconds'] / r['steps']:.2f} "
          f"| {r['peak_memory_mb']:.0f} |")
PY
