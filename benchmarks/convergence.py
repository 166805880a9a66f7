"""Forward-only convergence: test accuracy against example-forwards, one curve per recipe.

An example-forward is one example through one forward pass: a MeZO step of batch 16 with
two-point SPSA costs 32, a stacked forward counts the examples it carries. Budgets are in
example-forwards, not steps, so that recipes with more points per step pay for them.

Every run trains the default model on ``--task`` (1,000 training examples drawn with the
run's seed) and is scored on the same 300 test sentences for every seed (the draw of seed
0), at each budget. Runs live in ``benchmarks/runs/TASK/LABEL/seedS``, checkpoint every
25 steps (kilobyte trajectory checkpoints for the zeroth-order recipes) and resume where
they stopped when the same command runs again. Those folders are committed (their
``.gitignore`` leaves out the exported weights), so a long curve spans sessions and
machines, and every result can be replayed from its trajectory.

    python benchmarks/convergence.py run mezo --seed 0 --set lr_zo=1e-5       # one curve
    python benchmarks/convergence.py grid mezo --lr-zo 1e-6,1e-5,1e-4 --eps 1e-3,1e-2 --budget 4000
    python benchmarks/convergence.py table                                     # JSON, Markdown, plot

``table`` reads every run folder and writes ``benchmarks/results/convergence.json``, a
Markdown table (stdout) and ``benchmarks/results/convergence.png``. Curves already in the
JSON whose folders are not here (runs made before the folders were committed) are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from task_plots import per_task
from zotune import tasks
from zotune.core.estimate import get as estimator
from zotune.recipe.config import from_mapping
from zotune.recipe.train import Interrupted, Run, prepare_output

ROOT = Path("benchmarks/runs")  # relative: config.yaml records it, and the folders move with the checkout
RESULTS = Path(__file__).parent / "results"
BUDGETS = (4_000, 8_000, 16_000, 32_000)
COMMON = dict(model="smollm2", n_train=1000, n_dev=0, n_test=300, batch_size=16, eval_batch_size=32, max_length=64,
              zero_shot=False, save_every=25, progress=False)
# name -> the options of `zotune train` (searched ones are set with --set or by `grid`)
RECIPES = {
    "mezo": dict(method="mezo", eps=1e-3),  # the paper's MeZO: dense Gaussian, SPSA, every weight
    "mezo-sparse": dict(method="mezo", direction="sparse", sparse_fraction=0.25, eps=1e-3),
    "mezo-lowrank": dict(method="mezo", direction="lowrank", rank=2, resample_every=50, eps=1e-3),  # LOZO
    "mezo-momentum": dict(method="mezo", eps=1e-3, momentum=0.9, momentum_window=8),
    "mezo-nschedule": dict(method="mezo", eps=1e-3, n_samples=1, n_samples_final=4),  # 1 -> 4 directions a step
    "mezo-normalized": dict(method="mezo", eps=1e-3, normalize_window=16),  # steps of lr_zo in units of z
    "mezo-linear": dict(method="mezo", eps=1e-3, lr_schedule="linear"),  # the rate decays to 0 at 32,000
    "mezo-lora": dict(method="mezo", peft="lora"),
    "mezo-prefix": dict(method="mezo", peft="prefix"),
    "fzoo": dict(method="mezo", estimator="fzoo", direction="rademacher", n_samples=4, stacked=True),
    # The candidate words' output rows (a linear probe by zeroth order): a step's 2 x 64 points share one forward
    "mezo-head": dict(method="mezo", peft="head", n_samples=64),
    "lora-ft": dict(method="lora-ft", lr_fo=5e-4),  # the first-order yardstick: its wall-clock to 80 %
}


def spending(options, method: str, batch_size: int, steps: int) -> list[int]:
    """Example-forwards spent after each step of a run of ``steps``: the batch times the points the estimator
    evaluates (with ``n_samples_final``, a number that grows over the run); first order: one forward a step (its
    backward is not a forward); --peft head: one forward a step too, which every point reuses (its points cost a
    product with a 2 x 576 matrix, not a forward)."""
    total, spent = 0, []
    for step in range(steps):
        if method == "mezo" and options.peft != "head":
            total += batch_size * len(estimator(options.estimator).plan(options.n_samples_at(step, steps)))
        else:
            total += batch_size
        spent.append(total)
    return spent


def plan(values: dict, budgets) -> tuple[list[int], dict[int, int]]:
    """The spending of the shortest run that reaches the largest budget, and the step at which each budget is
    reached (1-based)."""
    options = from_mapping({**values, "steps": 1}).options
    steps = max(1, max(budgets) // (values["batch_size"] * 64))  # no step evaluates more than 64 points
    spent = spending(options, values["method"], values["batch_size"], steps)
    while spent[-1] < max(budgets):
        steps = max(steps + 1, math.ceil(steps * max(budgets) / spent[-1]) - 1)
        spent = spending(options, values["method"], values["batch_size"], steps)
    return spent, {next(i for i, total in enumerate(spent, 1) if total >= budget): budget for budget in budgets}


class CurveRun(Run):
    """A run scored on the fixed test sentences whenever it has spent a budget."""

    def __init__(self, config, resume: bool, budgets: dict[int, int], spent: list[int], stop_step: int | None = None):
        super().__init__(config, resume)
        fixed = tasks.sample(self.task, config.n_train, 0, config.n_test, seed=0).test
        self.split = tasks.Split(self.split.train, self.split.dev, fixed)
        self.budgets, self.spent, self.stop_step = budgets, spent, stop_step

    def log(self, record: dict):
        budget = self.budgets.get(record.get("step"))
        if budget is not None:
            record["test_accuracy"] = self.evaluate(self.split.test, "test")["score"]
            record["example_forwards"] = self.spent[record["step"] - 1]
            record["train_seconds"] = round(self.state["train_seconds"], 2)
            print(f"  {self.out}: {record['example_forwards']} example-forwards, test accuracy "
                  f"{record['test_accuracy']:.3f} ({record['train_seconds']:.0f} s)", flush=True)
        super().log(record)
        if record.get("step") == self.stop_step:  # a grid point: checkpointed here, its curve resumes from it
            self._stop = True


def label_of(recipe: str, settings: dict) -> str:
    return recipe + "".join(f",{k}={v}" for k, v in sorted(settings.items()))


def train_curve(task: str, recipe: str, settings: dict, seed: int, budgets=BUDGETS, stop_at: int | None = None):
    """Trains (or resumes) the curve of ``budgets``; with ``stop_at`` (a grid point) only that far, checkpointed
    so that the whole curve continues from it later."""
    values = {**COMMON, **RECIPES[recipe], **settings, "task": task, "seed": seed}
    values["batch_size"] = int(values["batch_size"])
    spent, steps = plan(values, sorted({*budgets, *([stop_at] if stop_at else [])}))
    out = ROOT / task / label_of(recipe, settings) / f"seed{seed}"
    values.update(steps=len(spent), output=str(out),
                  checkpoint="trajectory" if values["method"] == "mezo" else "full")
    config = from_mapping(values)
    stop_step = None if stop_at is None else next(step for step, budget in steps.items() if budget == stop_at)
    if (out / "result.json").is_file() and json.loads((out / "result.json").read_text())["steps"] < len(spent):
        shorter = out.with_name(f"{out.name}.{json.loads((out / 'result.json').read_text())['steps']}-steps")
        print(f"{out} finished before its curve's end: kept as {shorter.name}, the curve starts again", flush=True)
        out.rename(shorter)
    done = [row["step"] for row in read_rows(out) if "example_forwards" in row]
    if (out / "result.json").is_file() or (stop_step is not None and stop_step in done):
        return out
    resume = (out / "checkpoint").is_dir() or (out / "checkpoint.old").is_dir()
    if not resume:
        prepare_output(config, overwrite=True)
    print(f"{out}: to step {stop_step or len(spent)} of {len(spent)}, {spent[-1]} example-forwards in all"
          f"{' (resumed)' if resume else ''}", flush=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            CurveRun(config, resume, steps, spent, stop_step).run()
        except Interrupted:
            return out
    if (out / "trajectory.json").is_file():  # 0.5 GB a run: zotune replay rebuilds it from the kilobytes
        shutil.rmtree(out / "model", ignore_errors=True)
    return out


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key.replace("-", "_")] = value
    return settings


def read_rows(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []


def read_curves() -> list[dict]:
    curves = []
    for metrics in sorted(ROOT.glob("*/*/seed*/metrics.jsonl")):
        rows = read_rows(metrics.parent)
        points = [{k: row[k] for k in ("example_forwards", "test_accuracy", "train_seconds")}
                  for row in rows if "example_forwards" in row]
        run = metrics.parent
        peaks = [row["peak_memory_mb"] for row in rows if row.get("peak_memory_mb") is not None]
        curves.append({"task": run.parents[1].name, "label": run.parent.name,
                       "seed": int(re.match(r"seed(\d+)", run.name)[1]), "folder": run.name,
                       "finished": (run / "result.json").is_file(), "points": points,
                       "peak_rss_mb": max(peaks, default=None)})
    return curves


def merged(curves: list[dict], previous: Path) -> list[dict]:
    """The curves read from the run folders, and those of ``previous`` (the committed JSON) whose folders are gone
    or are further along there (a run started again from scratch): their numbers stay in the results."""
    def key(curve):
        return curve["task"], curve["label"], curve["seed"], curve["folder"]

    best = {key(curve): curve for curve in json.loads(previous.read_text())} if previous.is_file() else {}
    for curve in curves:
        if len(curve["points"]) >= len(best.get(key(curve), {}).get("points", ())):
            best[key(curve)] = curve
    return [best[k] for k in sorted(best)]


def table(curves: list[dict]) -> str:
    budgets = sorted({p["example_forwards"] for c in curves for p in c["points"]})
    lines = [f"| task | recipe | seed | {' | '.join(f'{b:,}' for b in budgets)} | s to last | peak RSS (MB) |",
             "|---|---|---|" + "---|" * len(budgets) + "---|---|"]
    for c in curves:
        at = {p["example_forwards"]: p for p in c["points"]}
        cells = [f"{at[b]['test_accuracy']:.1%}" if b in at else "" for b in budgets]
        last = f"{c['points'][-1]['train_seconds']:.0f}" if c["points"] else ""
        peak = "" if c.get("peak_rss_mb") is None else f"{c['peak_rss_mb']:.0f}"
        lines.append(f"| {c['task']} | {c['label']} | {c['seed']} | {' | '.join(cells)} | {last} | {peak} |")
    return "\n".join(lines)


def plot(curves: list[dict], path: Path) -> None:
    def draw(axis, task_curves):
        for label, group in itertools.groupby(sorted(task_curves, key=lambda c: c["label"]), key=lambda c: c["label"]):
            group = list(group)
            budgets = sorted({p["example_forwards"] for c in group for p in c["points"]})
            means = [sum(p["test_accuracy"] for c in group for p in c["points"] if p["example_forwards"] == b)
                     / sum(1 for c in group for p in c["points"] if p["example_forwards"] == b) for b in budgets]
            axis.plot(budgets, means, marker="o", label=f"{label} ({len(group)} seed{'s' * (len(group) > 1)})")

    # Curves only (a grid point is one number: the table has it), each seed's current run (not one kept aside as
    # seedN.K-steps when its curve was lengthened).
    curves = [c for c in curves if len(c["points"]) > 1 and c["folder"] == f"seed{c['seed']}"]
    per_task(curves, path, draw, "example-forwards", "test accuracy", xscale="log", legend_below=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one curve (resumes an unfinished one)")
    one.add_argument("recipe", choices=RECIPES)
    one.add_argument("--task", default="rt-sst2")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="zotune train options")
    one.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    grid = commands.add_parser("grid", help="every combination of the given options, at one budget")
    grid.add_argument("recipe", choices=RECIPES)
    grid.add_argument("--task", default="rt-sst2")
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--budget", type=int, default=BUDGETS[0])
    grid.add_argument("--lr-zo", default="")
    grid.add_argument("--lr-fo", default="")
    grid.add_argument("--eps", default="")
    grid.add_argument("--batch-size", default="", help="a searched axis too: budgets count examples, not steps")
    commands.add_parser("table", help="results JSON, Markdown table and plot from every run folder")
    args = parser.parse_args(argv)
    if args.command == "run":
        train_curve(args.task, args.recipe, parse_settings(args.set), args.seed,
                    [int(b) for b in args.budgets.split(",")])
    elif args.command == "grid":
        axes = {name: values.split(",") for name, values in
                (("lr_zo", args.lr_zo), ("lr_fo", args.lr_fo), ("eps", args.eps),
                                    ("batch_size", args.batch_size)) if values}
        for combination in itertools.product(*axes.values()):
            begin = time.perf_counter()
            train_curve(args.task, args.recipe, dict(zip(axes, combination)), args.seed, stop_at=args.budget)
            print(f"  ({time.perf_counter() - begin:.0f} s)", flush=True)
    else:
        curves = merged(read_curves(), RESULTS / "convergence.json")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "convergence.json").write_text(json.dumps(curves, indent=1))
        print(table(curves))
        plot(curves, RESULTS / "convergence.png")
        print(f"wrote {RESULTS / 'convergence.json'} and {RESULTS / 'convergence.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
