"""A forward-only training step on a quantized base (issue 27): peak memory and time, against the float base.

Each setting runs in a fresh process: load the model (``fp32``, or quantized ``int8`` / ``int4``), then time
``--steps`` MeZO steps on rt-sst2-style prompts of ``--length`` tokens, batch ``--batch``, scored as the recipe
scores them (the next-token logits of the candidates only), or with ``--objective lm`` the language-model loss of
every token (the whole logits: what ``zotune memory`` assumes). The float base trains every weight (plain MeZO); the
quantized ones train their scales (``--peft scales``). Memory is the model's tensors (parameters and buffers) plus
the step's transient peak above what was allocated before it (glibc's malloc counters, sampled by a thread), so
that the tokenizer and the interpreter, the same in every setting, do not dilute the ratio.

Each row also has ``zotune memory``'s estimate for the same model, batch and setting.

    python benchmarks/quantized.py --settings fp32,int8,int4 --batch 8 --length 64 [--objective lm]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

RESULTS = "benchmarks/results/quantized_step_{objective}_g{group_size}.json"


def estimated(model, setting: str, batch: int, length: int, group_size: int) -> int:
    from zotune.tools import memory

    quantize = "none" if setting == "fp32" else setting
    estimates = memory.estimate(memory.shape_of(model.config), batch, length, "fp32", quantize=quantize,
                                group_size=group_size)
    return estimates["mezo" if quantize == "none" else f"{quantize} mezo"]


def measure(setting: str, batch: int, length: int, steps: int, group_size: int, objective: str) -> dict:
    import torch

    import zotune
    from zotune.assets import models
    from zotune.methods.adapters import train_scales
    from zotune.tasks.scoring import Scorer
    from zotune.tools.meters import host_allocated_bytes, host_peak

    quantize = "none" if setting == "fp32" else setting
    model, tokenizer, kind = models.load("smollm2", quantize=quantize, group_size=group_size, device="cpu")
    if quantize != "none":
        train_scales(model)
    tensors = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    scorer = Scorer(model, tokenizer, [" terrible", " great"], kind, max_length=length)
    words = "the film is a slow and thoughtful look at a family that never quite says what it means " * 8
    prompts = [" ".join(words.split()[i:i + length - 4]) + " It was" for i in range(batch)]
    labels = [i % 2 for i in range(batch)]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr, eps = (1e-6, 1e-3) if quantize == "none" else (1e-8, 1e-5)
    optimizer = zotune.MeZO(params, lr=lr, eps=eps, seed=0)
    if objective == "lm":
        ids = tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
        closure = lambda: model(input_ids=ids.input_ids, labels=ids.input_ids).loss  # noqa: E731
    else:
        closure = lambda: scorer.loss(prompts, labels)  # noqa: E731
    optimizer.step(closure)  # warm-up: allocator pools, kernels
    before = host_allocated_bytes()
    times = []
    with host_peak() as peak:
        for _ in range(steps):
            begin = time.perf_counter()
            optimizer.step(closure)
            times.append(time.perf_counter() - begin)
    transient = None if before is None else peak[0] - before
    return dict(setting=setting, objective=objective, batch=batch, length=length, group_size=group_size,
                tensor_bytes=tensors, transient_bytes=transient,
                peak_bytes=None if transient is None else tensors + transient,
                estimated_bytes=estimated(model, setting, batch, length, group_size), trained_params=trained,
                step_seconds=statistics.median(times), threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="fp32,int8,int4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--objective", choices=("candidates", "lm"), default="candidates")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.length, args.steps, args.group_size, args.objective)))
        return
    rows = []
    for setting in args.settings.split(","):
        child = [sys.executable, __file__, "--one", setting, "--batch", str(args.batch), "--length",
                 str(args.length), "--steps", str(args.steps), "--group-size", str(args.group_size), "--objective",
                 args.objective]
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout
                               .strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{setting}: tensors {row['tensor_bytes'] / 2**20:.1f} MiB + step transient "
              f"{(row['transient_bytes'] or 0) / 2**20:.1f} MiB = {(row['peak_bytes'] or 0) / 2**20:.1f} MiB "
              f"(zotune memory: {row['estimated_bytes'] / 2**20:.1f} MiB); {row['step_seconds']:.2f} s a step",
              flush=True)
    base = next((r for r in rows if r["setting"] == "fp32"), None)
    if base is not None:
        for row in rows:
            row["peak_vs_fp32"] = round(row["peak_bytes"] / base["peak_bytes"], 3)
            row["time_vs_fp32"] = round(row["step_seconds"] / base["step_seconds"], 2)
            print(f"{row['setting']}: peak {row['peak_vs_fp32']:.3f}x fp32, step {row['time_vs_fp32']:.2f}x fp32")
    with open(RESULTS.format(objective=args.objective, group_size=args.group_size), "w") as f:
        json.dump({"machine": platform.node(), "processor": platform.processor(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
