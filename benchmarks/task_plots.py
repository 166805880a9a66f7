"""One panel per task: the figure the curve benchmarks (convergence, es_rewards) write."""

from __future__ import annotations

from pathlib import Path


def per_task(curves: list[dict], path: Path, draw, xlabel: str, ylabel: str, xscale: str = "linear") -> None:
    """``draw(axis, curves of one task)`` on a panel per task, labelled, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks_seen = sorted({c["task"] for c in curves})
    figure, axes = plt.subplots(1, len(tasks_seen), figsize=(7 * len(tasks_seen), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks_seen):
        draw(axis, [c for c in curves if c["task"] == task])
        axis.set(xscale=xscale, xlabel=xlabel, ylabel=ylabel, title=task)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
