"""Training on rewards (issue 26): held-out reward against training time, one curve per recipe.

Every run trains the default model on ``--task`` (arith: one-digit + - *, or countdown) for ``--minutes`` of
training time (evaluation not counted), scores the fixed test problems every ``--eval-every`` steps, and records
the tokens it decoded. Runs live in ``runs/es/TASK/LABEL`` and resume where they stopped (trajectory checkpoints
every 5 steps), so a budget can span sessions.

    python benchmarks/es_rewards.py run es-lowrank --minutes 60
    python benchmarks/es_rewards.py run mezo-nll --minutes 60 --set lr_zo=1e-5
    python benchmarks/es_rewards.py table        # JSON, Markdown, plot

Recipes: ``es-lowrank`` (the ES default: rank-4 output deltas, population 8, one batch), ``es-dense`` (dense
Gaussian directions, the copies one after another, each copy's weights built once: ``--materialize``) and ``mezo-nll`` (the supervised forward-only baseline: MeZO on
the gold answer's negative log-likelihood). Zero-shot is every run's step 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from task_plots import per_task
from zotune.recipe.config import from_mapping
from zotune.recipe.train import Interrupted, Run, prepare_output

ROOT = Path("runs/es")
RESULTS = Path(__file__).parent / "results"
COMMON = dict(model="smollm2", n_train=200, n_dev=0, n_test=100, batch_size=8, max_new_tokens=8, steps=100_000,
              save_every=5, checkpoint="trajectory", progress=False)
RECIPES = {
    "es-lowrank": dict(method="es"),
    "es-dense": dict(method="es", direction="gaussian", stacked=False, materialize=True),
    "mezo-nll": dict(method="mezo", objective="loss", lr_zo=1e-5, eps=1e-3),
}


class TimedRun(Run):
    """A run scored on its test problems every ``every`` steps, stopped after ``seconds`` of training."""

    def __init__(self, config, resume: bool, seconds: float, every: int):
        super().__init__(config, resume)
        self.seconds, self.every = seconds, every
        self.state.setdefault("generated_tokens", 0)

    def evaluate(self, examples, desc) -> dict:
        self.last_evaluation = super().evaluate(examples, desc)
        return self.last_evaluation

    def log(self, record: dict):
        if record.get("step") == 0 and "test_reward" in record:  # zero-shot: its exact match too
            record["test_em"] = self.last_evaluation["em"]
        if "generated_tokens" in record:
            self.state["generated_tokens"] += record["generated_tokens"]
        step = record.get("step", 0)
        out_of_time = step and self.state["train_seconds"] >= self.seconds
        if step and (step % self.every == 0 or out_of_time):
            result = self.evaluate(self.split.test, "test")
            record["test_reward"], record["test_em"] = result["score"], result["em"]
            record["train_seconds"] = round(self.state["train_seconds"], 1)
            record["total_generated_tokens"] = self.state["generated_tokens"]
            print(f"  {self.out}: step {step}, {record['train_seconds']:.0f} s, test reward "
                  f"{record['test_reward']:.3f}", flush=True)
        super().log(record)
        if out_of_time:
            self._stop = True


def train(task: str, recipe: str, settings: dict, minutes: float, every: int, label: str | None = None) -> Path:
    out = ROOT / task / (label or recipe + "".join(f",{k}={v}" for k, v in sorted(settings.items())))
    values = {**COMMON, **RECIPES[recipe], **settings, "task": task, "output": str(out)}
    config = from_mapping(values)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    if rows and rows[-1].get("train_seconds", 0) >= minutes * 60:
        return out
    resume = (out / "checkpoint").is_dir() or (out / "checkpoint.old").is_dir()
    if not resume:
        prepare_output(config, overwrite=True)
    print(f"{out}: {minutes:g} minutes of training{' (resumed)' if resume else ''}", flush=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            TimedRun(config, resume, minutes * 60, every).run()
        except Interrupted:
            pass  # out of time: the checkpoint is saved and the curve is complete
    return out


def read_curves() -> list[dict]:
    curves = []
    for metrics in sorted(ROOT.glob("*/*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        zero = next((row for row in rows if row.get("step") == 0), {})
        points = [{k: row[k] for k in ("step", "train_seconds", "test_reward", "test_em", "total_generated_tokens")
                   if k in row} for row in rows if row.get("step") and "test_reward" in row]
        curves.append({"task": metrics.parents[1].name, "label": metrics.parent.name,
                       "zero_shot": zero.get("test_reward"), "zero_shot_em": zero.get("test_em"), "points": points})
    return curves


def table(curves: list[dict]) -> str:
    lines = ["| task | recipe | zero-shot reward (em) | best reward | last reward (em) | steps | minutes | tokens decoded |",
             "|---|---|---|---|---|---|---|---|"]
    for c in curves:
        if not c["points"]:
            continue
        last = c["points"][-1]
        best = max(p["test_reward"] for p in c["points"])
        zero = "" if c["zero_shot"] is None else f"{c['zero_shot']:.1%} ({c['zero_shot_em'] or 0:.1%})"
        lines.append(f"| {c['task']} | {c['label']} | {zero} | {best:.1%} | {last['test_reward']:.1%} "
                     f"({last.get('test_em', 0):.1%}) | "
                     f"{last['step']} | {last['train_seconds'] / 60:.0f} | {last.get('total_generated_tokens', '')} |")
    return "\n".join(lines)


def plot(curves: list[dict], path: Path) -> None:
    def draw(axis, group):
        for c in (c for c in group if c["points"]):
            minutes = [0.0] + [p["train_seconds"] / 60 for p in c["points"]]
            axis.plot(minutes, [c["zero_shot"]] + [p["test_reward"] for p in c["points"]], marker="o", label=c["label"])

    per_task(curves, path, draw, "training minutes", "held-out reward")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train (or resume) one curve")
    one.add_argument("recipe", choices=RECIPES)
    one.add_argument("--task", default="arith")
    one.add_argument("--minutes", type=float, default=60)
    one.add_argument("--eval-every", type=int, default=10)
    one.add_argument("--label", help="the run folder's name (default: the recipe and its settings)")
    one.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="zotune train options")
    commands.add_parser("table", help="write the JSON and the plot, print the Markdown table")
    args = parser.parse_args()
    if args.command == "run":
        settings = dict(pair.split("=", 1) for pair in args.set)
        train(args.task, args.recipe, {k.replace("-", "_"): v for k, v in settings.items()}, args.minutes,
              args.eval_every, args.label)
        return 0
    curves = read_curves()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "es_rewards.json").write_text(json.dumps(curves, indent=1))
    print(table(curves))
    plot(curves, RESULTS / "es_rewards.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
