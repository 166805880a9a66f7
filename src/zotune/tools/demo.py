"""``zotune demo`` (``make demo``): fine-tunes the default model on the default task with HZO,
prints zero-shot → fine-tuned accuracy, then a side-by-side of the methods on the default
model's shape: time per step and peak memory measured here, peak memory estimated for a GPU,
and the accuracy each reached with the demo's budget when it was measured (BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

from zotune.tools import bench
from zotune.recipe import config as cfg
from zotune.tools import memory
from zotune.recipe.train import train

# HZO, 3 first-order blocks: 84.7 % after 120 steps of 8 (BENCHMARKS.md, "HZO against LoRA-FT").
DEMO = dict(model="smollm2", task="rt-sst2", method="hzo", steps=120, batch_size=8, lr_fo=1e-3, deep_blocks=3,
            n_train=1000, n_dev=0, n_test=300, eval_batch_size=32, output="runs/demo", overwrite=True)
# The forward-only rows' accuracies: benchmarks/convergence.py's committed results (a repository checkout has
# them), for its curves of the settings below.
CONVERGENCE = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "convergence.json"
# mezo-head: block 20 of the default model's 30, the block the preset's --head-layer 0.67 reads.
CURVES = {"mezo": "mezo,eps=1e-3,lr_zo=1e-4", "mezo-head": "mezo-head,eps=1e-2,head_layer=20,lr_zo=3e-3"}
# bench row -> (memory row, the method's settings, test accuracy on rt-sst2: after 120 steps of 8 from
# benchmarks/hzo_vs_lora.sh and compare_methods.sh, BENCHMARKS.md, 2026-11-26; the forward-only rows' (None)
# from the convergence benchmark, whose budgets are larger). mezo-head: its step reads kept features, and the
# run reads each training prompt once, at inference's peak.
SIDE_BY_SIDE = {
    "forward": ("inference", "two forwards, no training", "47.0 % (zero-shot)"),
    "mezo": ("mezo", "--lr-zo 1e-4 --eps 1e-3", None),
    "mezo-head": ("inference", "--preset mezo-head (its step reads kept features)", None),
    "lora-ft": ("lora-ft", "--lr-fo 5e-4", "86.0 %"),
    "lmao": ("lmao", "--lr-fo 5e-4 --lr-zo 1e-6", "86.3 %"),
    "hzo-k3": ("hzo", "--lr-fo 1e-3 --deep-blocks 3", "84.7 %"),
}
BATCH, LENGTH = 4, 64  # small: the side-by-side is a glance at relative cost, not a benchmark


def run(progress: bool = True) -> dict:
    config = cfg.from_mapping({**DEMO, "progress": progress})
    print(f"zotune demo: {config.method} on {config.model} / {config.task}, {config.steps} steps of "
          f"{config.batch_size} (zeroth order on the shallow blocks, AdamW on the last "
          f"{config.options.deep_blocks}); zero-shot and final accuracy on {config.n_test} test sentences", flush=True)
    result = train(config)
    print(f"zero-shot accuracy: {result['zero_shot_accuracy']:.1%}")
    print(f"fine-tuned accuracy: {result['test_accuracy']:.1%} ({config.method}, {result['steps']} steps, "
          f"{result['train_seconds']:.0f} s)", flush=True)
    text = side_by_side()
    print(text)
    Path(config.output, "side_by_side.md").write_text(text + "\n")
    print(f"run folder {config.output}: curves.png, side_by_side.md, metrics.jsonl, the model")
    return result


def side_by_side(model: str = "smollm2") -> str:
    """Time per step and peak memory of each method on the default model's shape (random init,
    fp32, this machine), the estimated GPU peak in fp16, and the accuracies measured earlier."""
    print(f"side by side: one step of each method, batch {BATCH} × {LENGTH} tokens ...", flush=True)
    rows = {r["method"]: r for r in bench.bench(model, BATCH, LENGTH, "fp32", "cpu", list(SIDE_BY_SIDE), 1)}
    peaks = memory.estimate(memory.shape_of(bench.build_config(model)), BATCH, LENGTH, "fp16", deep_blocks=3)
    forward = rows["forward"]["seconds"]
    lines = ["| method | settings | s/step here (random init, full LM loss) | × two forwards | peak here, fp32 (GiB) "
             "| est. GPU peak, fp16 (GiB) | test accuracy (measured earlier; 120 steps of 8 unless said) |",
             "|---|---|---|---|---|---|---|"]
    for name, (row, settings, accuracy) in SIDE_BY_SIDE.items():
        seconds, peak = rows[name]["seconds"], rows[name]["peak_gib"]
        here = "" if peak is None else f"{peak:.2f}"
        accuracy = accuracy or measured_curve(CURVES[name])
        lines.append(f"| {name} | {settings} | {seconds:.2f} | {seconds / forward:.2f} | {here} | "
                     f"{peaks[row] / 2**30:.2f} | {accuracy} |")
    return "\n".join(lines)


def measured_curve(label: str, task: str = "rt-sst2", results: Path = CONVERGENCE) -> str:
    """A curve of the convergence benchmark in a few words: its accuracy (the mean over seeds) at its first and
    last budgets in example-forwards."""
    try:
        curves = json.loads(results.read_text())
    except (OSError, ValueError):
        return "see BENCHMARKS.md (the benchmark's results are in a repository checkout)"
    by_budget: dict[int, list[float]] = {}
    seeds = 0
    for curve in curves:
        current = curve["folder"] == f"seed{curve['seed']}"  # not an older run kept aside as seedN.K-steps
        if curve["task"] == task and curve["label"] == label and current and curve["points"]:
            seeds += 1
            for point in curve["points"]:
                by_budget.setdefault(point["example_forwards"], []).append(point["test_accuracy"])
    if not by_budget:
        return f"not measured yet ({label} in {results.name})"
    budgets = sorted(by_budget)
    shown = budgets[:1] + budgets[1:][-1:]
    return ", ".join(f"{100 * sum(by_budget[b]) / len(by_budget[b]):.1f} % after {b:,}" for b in shown) + \
        f" example-forwards ({seeds} seed{'s' * (seeds > 1)}, {results.name})"
