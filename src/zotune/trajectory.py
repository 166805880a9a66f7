"""The record of a zeroth-order run: a few numbers per step rebuild the weights.

MeZO's storage trick (Malladi et al. §2.1): each update is
``W -= lr * (sum_j g_j z_j / n + wd * W)`` with z_j regenerated from seed s_j,
so the initial weights plus (seeds, projected gradients, lr, wd) per step
rebuild the final weights. :func:`replay` does this through the optimizer's own
update code, so the result is bit-identical on the same device and dtypes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

FORMAT = "zotune-trajectory/1"


@dataclass
class TrajectoryStep:
    """One optimizer step: what the update used."""

    step: int
    seeds: list[int]
    grads: list[float]
    lrs: list[float]  # per parameter group, as applied
    weight_decays: list[float]  # per parameter group
    skipped: list[str] = field(default_factory=list)  # keys frozen (requires_grad=False) then


@dataclass
class Trajectory:
    """Parameter layout plus the steps; save/load as JSON."""

    keys: list[list[str]]  # per group, the parameters' direction keys
    sizes: list[list[int]]  # per group, numel of each parameter (checked by replay)
    distributions: list[str]  # per group
    steps: list[TrajectoryStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a zotune trajectory (format {data.get('format')!r}, expected {FORMAT!r})")
        steps = [TrajectoryStep(**step) for step in data["steps"]]
        return cls(data["keys"], data["sizes"], data["distributions"], steps)

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as handle:
            json.dump(self.to_dict(), handle)
        os.replace(tmp, path)  # a crash mid-write leaves the old file intact

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        with open(path) as handle:
            return cls.from_dict(json.load(handle))


def replay(params, trajectory: Trajectory | dict | str | os.PathLike) -> None:
    """Apply every step of ``trajectory`` to ``params`` in place.

    ``params`` must be given as to the optimizer that recorded the trajectory
    (same groups, order and names) and hold the initial weights.
    """
    from zotune.mezo import MeZO  # the optimizer owns the update rule

    if isinstance(trajectory, dict):
        trajectory = Trajectory.from_dict(trajectory)
    elif not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    optimizer = MeZO(params, lr=0.0)
    layout = optimizer.trajectory
    if layout.keys != trajectory.keys or layout.sizes != trajectory.sizes:
        raise ValueError(
            "replay needs the parameters of the recorded run, in the same groups, "
            "order and naming (named_parameters() if the run used names)"
        )
    for group, distribution in zip(optimizer.param_groups, trajectory.distributions):
        group["distribution"] = distribution
    for step in trajectory.steps:
        optimizer.apply_step(step)
