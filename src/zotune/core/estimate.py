"""Estimators: which perturbed losses a step evaluates, and the update they give.

An estimator plans the evaluations of a step, ``(sample, sign)`` pairs where sample
``None`` is the unperturbed point, and turns the losses into projected gradients
``grads`` and update coefficients ``coeffs``: the update is
``W <- W - lr * (sum_j coeffs[j] z_j + weight_decay * W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Estimate:
    grads: list[float]  # projected gradient of each sample
    coeffs: list[float]  # weight of each sample's direction in the update
    loss: float  # what the step reports


class TwoSided:
    """SPSA (MeZO): g_j = (L(W + eps z_j) - L(W - eps z_j)) / (2 eps); the update averages g_j z_j."""

    name = "spsa"
    min_samples = 1

    def plan(self, n: int):
        return [(j, sign) for j in range(n) for sign in (1.0, -1.0)]

    def combine(self, losses: list[float], n: int, eps: float) -> Estimate:
        grads = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(n)]
        return Estimate(grads, [g / n for g in grads], sum(losses) / len(losses))


class OneSided:
    """g_j = (L(W + eps z_j) - L(W)) / eps; reports L(W)."""

    name = "one-sided"
    min_samples = 1

    def plan(self, n: int):
        return [(None, 0.0)] + [(j, 1.0) for j in range(n)]

    def combine(self, losses: list[float], n: int, eps: float) -> Estimate:
        grads = [(loss - losses[0]) / eps for loss in losses[1:]]
        return Estimate(grads, [g / n for g in grads], losses[0])


class FZOO(OneSided):
    """FZOO (methods.md §5): one-sided estimates whose step is divided by the std of the
    perturbed losses (n - 1 in the denominator), a zeroth-order normalised SGD. Use it
    with Rademacher directions and n >= 2."""

    name = "fzoo"
    min_samples = 2

    def combine(self, losses: list[float], n: int, eps: float) -> Estimate:
        estimate = super().combine(losses, n, eps)
        perturbed = losses[1:]
        mean = sum(perturbed) / n
        sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / (n - 1))
        scale = 1.0 / (n * sigma) if sigma > 0 else 0.0  # equal losses: no signal, no step
        estimate.coeffs = [g * scale for g in estimate.grads]
        return estimate


ESTIMATORS = {cls.name: cls() for cls in (TwoSided, OneSided, FZOO)}


def get(name: str):
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: use one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]
