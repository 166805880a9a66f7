"""The record of a zeroth-order run: a few numbers per step rebuild the weights.

MeZO's storage trick (Malladi et al. §2.1): each update is
``W -= lr * (sum_j c_j z_j + wd * W)`` with z_j regenerated from its seed, so the
initial weights plus (seeds, coefficients, lr, wd) per step rebuild the final weights.
:func:`zotune.replay` applies them through the optimizer's own update code, so the
result is bit-identical on the same device, dtypes and kernel backend.

Format 2 records each group's direction spec, the base seed (low-rank V and the
stochastic-rounding bits derive from it) and the coefficients; format 1 files (zotune
0.1: dense directions, coefficients g/n, no stochastic rounding) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

FORMAT = "zotune-trajectory/2"
FORMAT_V1 = "zotune-trajectory/1"


@dataclass
class TrajectoryStep:
    """One optimizer step: what the update used."""

    step: int
    seeds: list[int]
    grads: list[float]  # projected gradients (for logs)
    lrs: list[float]  # per parameter group, as applied
    weight_decays: list[float]  # per parameter group
    skipped: list[str] = field(default_factory=list)  # keys frozen (requires_grad=False) then
    coeffs: list[float] | None = None  # the update's weights of the directions (None: grads / n)
    echoes: list[list] | None = None  # momentum: earlier directions the update adds, as [step, seed, coefficient]

    def coefficients(self) -> list[float]:
        return self.coeffs if self.coeffs is not None else [g / len(self.grads) for g in self.grads]


@dataclass
class Trajectory:
    """Parameter layout, directions and steps; save/load as JSON."""

    keys: list[list[str]]  # per group, the parameters' direction keys
    sizes: list[list[int]]  # per group, numel of each parameter (checked by replay)
    directions: list[dict]  # per group, the direction spec
    seed: int = 0  # the run's base seed
    stochastic_rounding: bool = False
    steps: list[TrajectoryStep] = field(default_factory=list)
    merge: str = "step"  # "resample": low-rank updates kept as factors until V is redrawn
    factored: list[str] | None = None  # the keys of the matrices updated that way

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        version = data.get("format") if isinstance(data, dict) else None
        if version == FORMAT_V1:
            # zotune 0.1: dense directions; its Rademacher stream used the top bit of each word
            names = {"gaussian": "gaussian", "rademacher": "rademacher-v1"}
            directions = [{"kind": "dense", "distribution": names[d]} for d in data["distributions"]]
            steps = [TrajectoryStep(**step) for step in data["steps"]]
            return cls(data["keys"], data["sizes"], directions, 0, False, steps)
        if version != FORMAT:
            raise ValueError(f"not a zotune trajectory (format {version!r}, expected {FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["steps"] = [TrajectoryStep(**step) for step in fields.get("steps", [])]
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as handle:
            json.dump(self.to_dict(), handle)
        os.replace(tmp, path)  # a crash mid-write leaves the old file intact

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        with open(path) as handle:
            return cls.from_dict(json.load(handle))
