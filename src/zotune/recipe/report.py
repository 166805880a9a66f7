"""Pictures and comparisons of run folders: ``curves.png`` of a run (loss, dev/test metric,
projected gradient, learning rate) and ``zotune report`` (a Markdown table of runs and
one figure overlaying their curves). matplotlib is an optional extra (``zotune[plot]``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from zotune.errors import UserError
from zotune.recipe.config import from_mapping, load_run
from zotune.tasks.metrics import shown

PANELS = (("loss", "training loss"), ("metric", "dev / test metric"), ("projected_grad", "projected gradient"),
          ("lr", "learning rate"))


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_run(folder: Path | str) -> dict:
    """A run folder (``zotune.read_run``): ``config`` (its :class:`~zotune.recipe.config.TrainConfig`, older
    config files upgraded; None without config.yaml), ``result`` (result.json; empty while the run is
    unfinished) and ``rows`` (metrics.jsonl, one dict per logged step; unreadable rows are skipped)."""
    folder = Path(folder)
    if not (folder / "metrics.jsonl").is_file():
        raise UserError(f"{folder} is not a zotune run folder (no metrics.jsonl)")
    config = from_mapping(load_run(folder)) if (folder / "config.yaml").is_file() else None
    rows = []
    for line in (folder / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    result = {}
    if (folder / "result.json").is_file():
        try:
            result = json.loads((folder / "result.json").read_text())
        except ValueError:
            raise UserError(f"{folder / 'result.json'} is damaged") from None
    return {"name": folder.name, "folder": folder, "config": config, "rows": rows, "result": result}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _metric_keys(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith(("dev_", "test_"))})


def _final_test(run: dict) -> tuple[str, int, float] | None:
    """The test score of a finished run at its last step (metrics.jsonl holds step 0's only)."""
    result = run["result"]
    metric = result.get("metric", "accuracy")
    if not isinstance(result.get(f"test_{metric}"), (int, float)):
        return None
    return f"test_{metric}", result.get("steps") or 0, result[f"test_{metric}"]


def _draw(axes, run: dict, label: str | None = None) -> None:
    rows = run["rows"]
    last = max([row["step"] for row in rows if isinstance(row.get("step"), int)] or [0])
    final = _final_test(run)
    for axis, (key, title) in zip(axes.flat, PANELS):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.set_xlim(0, max(last, 1))
        keys = _metric_keys(rows) if key == "metric" else [key]
        if key == "metric" and final and final[0] not in keys:
            keys.append(final[0])
        drawn = False
        for name in keys:
            steps, values = _series(rows, name)
            if key == "metric" and final and name == final[0]:
                steps, values = steps + [final[1]], values + [final[2]]
            if not values:
                continue
            drawn = True
            if key == "loss" and len(values) > 20:  # a moving average: minibatch losses are noisy
                window = max(1, len(values) // 20)
                values = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                          for i in range(len(values))]
            tag = name if key == "metric" else None
            text = " ".join(t for t in (label, tag) if t)
            axis.plot(steps, values, marker="o" if key == "metric" or len(values) < 3 else None, label=text or None)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        elif not drawn and not axis.lines:
            axis.text(0.5, 0.5, "not recorded by this method", ha="center", va="center", transform=axis.transAxes,
                      fontsize=9, color="gray")
            axis.set_yticks([])


def curves(folder: Path) -> Path | None:
    """Draws ``curves.png`` in a run folder; None without matplotlib."""
    if not has_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = read_run(folder)
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    _draw(axes, run)
    method = run["result"].get("method", "")
    figure.suptitle(f"{run['name']} {method}".strip())
    figure.tight_layout()
    path = Path(folder) / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def table(runs: list[dict]) -> str:
    """The Markdown comparison of finished runs."""
    lines = ["| run | method | task | steps | zero-shot | test | s/step | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = run["result"]
        metric = r.get("metric", "accuracy")
        zero, test = r.get(f"zero_shot_{metric}"), r.get(f"test_{metric}")
        steps = r.get("steps") or (run["rows"][-1]["step"] if run["rows"] else 0)
        per_step = r["train_seconds"] / steps if r.get("train_seconds") and steps else None
        cells = [run["name"], r.get("method", "?"), r.get("task", "?"), str(steps),
                 "" if zero is None else shown(metric, zero),
                 "unfinished" if test is None else f"{metric} {shown(metric, test)}",
                 "" if per_step is None else f"{per_step:.2f}",
                 "" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(folders: list[str], output: str) -> str:
    """``zotune report``: writes ``output``/report.md (and curves.png with matplotlib); returns the table."""
    runs = [read_run(Path(folder)) for folder in folders]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "report.md").write_text(text + "\n")
    if has_matplotlib():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(2, 2, figsize=(10, 7))
        for run in runs:
            _draw(axes, run, label=run["name"])
        figure.tight_layout()
        figure.savefig(out / "curves.png", dpi=100)
        plt.close(figure)
    return text
