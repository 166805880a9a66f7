"""MeZO on the default model in float32 and bfloat16, with and without stochastic rounding.

Same seeds, same batches; records the training loss (mean of the two perturbed losses)
every step and the loss on a fixed batch of training examples every ``--eval-every``
steps, then projects each run's displacement W_T - W_0 onto the float32 run's.

    python benchmarks/precision_curves.py --steps 300 --out runs/precision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import zotune
from zotune.assets import models
from zotune import tasks
from zotune.recipe.config import TrainConfig
from zotune.tasks.scoring import Scorer

RUNS = {  # name: (dtype, stochastic rounding, seed)
    "fp32": ("fp32", True, 0),
    "fp32-seed1": ("fp32", True, 1),
    "bf16-stochastic": ("bf16", True, 0),
    "bf16-nearest": ("bf16", False, 0),
}


def run(name, dtype, stochastic, seed, args, split, task):
    model, tokenizer, kind = models.load("smollm2", dtype)
    scorer = Scorer(model, tokenizer, task.candidates, kind, 256)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    optimizer = zotune.MeZO(zotune.decay_groups(model.named_parameters(), 0.0), lr=args.lr, eps=args.eps, seed=seed,
                            stochastic_rounding=stochastic)
    fixed = split.train[: args.eval_size]
    fixed_prompts, fixed_labels = [task.prompt(e) for e in fixed], [e.label for e in fixed]
    curve, evals = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        if step % args.eval_every == 0:
            with torch.no_grad():
                evals.append((step, float(scorer.loss(fixed_prompts, fixed_labels))))
        batch = [split.train[(step * args.batch_size + i) % len(split.train)] for i in range(args.batch_size)]
        prompts, labels = [task.prompt(e) for e in batch], [e.label for e in batch]
        curve.append(optimizer.step(lambda: scorer.loss(prompts, labels)))
    with torch.no_grad():
        evals.append((args.steps, float(scorer.loss(fixed_prompts, fixed_labels))))
    seconds = (time.perf_counter() - start) / args.steps
    displacement = {n: p.detach().float() - initial[n] for n, p in model.named_parameters()}
    print(f"{name}: {seconds:.2f} s/step, fixed-batch loss {evals[0][1]:.4f} -> {evals[-1][1]:.4f}", flush=True)
    return {"curve": curve, "evals": evals, "seconds_per_step": seconds}, displacement


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS)
                        + "; the first is the reference of the displacement projections")
    parser.add_argument("--out", default="runs/precision")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = tasks.build_task(TrainConfig(task="rt-sst2"))
    split = tasks.sample(task, 1000, 0, 0, 0)
    results, reference = {}, None
    for name in args.runs.split(","):
        dtype, stochastic, seed = RUNS[name]
        results[name], displacement = run(name, dtype, stochastic, seed, args, split, task)
        if reference is None:
            reference = displacement
        dot = sum((displacement[n].double() * reference[n].double()).sum() for n in reference)
        norm = sum((reference[n].double() ** 2).sum() for n in reference)
        results[name]["projection_on_first"] = float(dot / norm)
        results[name]["displacement_norm"] = float(sum((d.double() ** 2).sum() for d in displacement.values()) ** 0.5)
        (out / "precision.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    plot(results, out / "precision.png")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        curve = torch.tensor(result["curve"])
        window = 20
        smooth = curve.unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        train_axis.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=name)
        eval_axis.plot(*zip(*result["evals"]), marker="o", label=name)
    train_axis.set(title="training loss (20-step mean)", xlabel="step", ylabel="loss")
    eval_axis.set(title="loss on --eval-size fixed training examples", xlabel="step", ylabel="loss")
    eval_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
