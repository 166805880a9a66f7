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


def centred_ranks(values: list[float]) -> list[float]:
    """Each value's rank scaled to [-0.5, 0.5] (ties share their mean rank): the fitness shaping of
    OpenAI's ES, blind to the rewards' scale and outliers."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    top = max(len(values) - 1, 1)
    return [rank / top - 0.5 for rank in ranks]


def z_scores(values: list[float]) -> list[float]:
    """(r - mean) / std over the population (ES at scale); all equal: all 0, no signal."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


class Evolution(TwoSided):
    """Evolution strategies on rewards (higher is better) at antithetic pairs W ± sigma z_j: the N = 2n rewards
    are shaped (centred ranks or z-scores) and the update is W <- W + lr sum_i r~_i z_i / (N sigma), that is
    coefficient -(r~_j+ - r~_j-) / (N sigma) for direction j. ``grads`` are the projected gradients of minus the
    raw reward; the step reports the mean reward."""

    min_samples = 1

    def __init__(self, name: str, shaping):
        self.name, self.shaping = name, shaping

    def combine(self, rewards: list[float], n: int, eps: float) -> Estimate:
        shaped = self.shaping(rewards)
        population = 2 * n
        grads = [-(rewards[2 * j] - rewards[2 * j + 1]) / (2 * eps) for j in range(n)]
        coeffs = [-(shaped[2 * j] - shaped[2 * j + 1]) / (population * eps) for j in range(n)]
        return Estimate(grads, coeffs, sum(rewards) / len(rewards))


SHAPINGS = {"ranks": centred_ranks, "zscore": z_scores}
ESTIMATORS = {estimator.name: estimator for estimator in (
    TwoSided(), OneSided(), FZOO(), *(Evolution(f"es-{name}", shaping) for name, shaping in SHAPINGS.items()))}


def get(name: str):
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: use one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]
