"""One panel per task: the figure the curve benchmarks (convergence, es_rewards) write."""

from __future__ import annotations

from pathlib import Path


def per_task(curves: list[dict], path: Path, draw, xlabel: str, ylabel: str, xscale: str = "linear",
             legend_below: bool = False) -> None:
    """``draw(axis, curves of one task)`` on a panel per task, labelled, saved to ``path``; ``legend_below``: the
    legend under each panel, for panels with more lines than room."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks_seen = sorted({c["task"] for c in curves})
    figure, axes = plt.subplots(1, len(tasks_seen), figsize=(7 * len(tasks_seen), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks_seen):
        draw(axis, [c for c in curves if c["task"] == task])
        axis.set(xscale=xscale, xlabel=xlabel, ylabel=ylabel, title=task)
        axis.grid(alpha=0.3)
        if legend_below:
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2))
        else:
            axis.legend(fontsize=7)
    if legend_below:  # room for the longest legend, the panels keeping their height
        entries = max(len(axis.get_legend_handles_labels()[1]) for axis in axes[0])
        figure.set_size_inches(7 * len(tasks_seen), 4.5 + 0.2 * entries)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight" if legend_below else None)
