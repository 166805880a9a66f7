"""Evolution strategies (ES) as a ``torch.optim.Optimizer``: MeZO's machinery, maximising a reward.

A step evaluates a population of ``population`` perturbed copies, antithetic pairs
``W ± sigma z_j`` with ``z_j`` regenerated from its seed, shapes their rewards (centred ranks
or z-scores) and moves the weights towards the better ones:

    W <- W + lr * sum_i r~_i z_i / (population * sigma)

Everything else is :class:`~zotune.core.optim.MeZO`'s: the step is recorded as seeds and
coefficients, so :func:`~zotune.core.optim.replay`, resume and kilobyte trajectory
checkpoints work unchanged; the perturbations are exact in every dtype (the stored weights
are never rounded by them), updates of bfloat16/float16 weights are rounded
stochastically, and low-rank directions perturb a layer's output instead of its weight, so
that a whole population decodes in one stacked forward.
"""

from __future__ import annotations

from zotune.core.estimate import SHAPINGS
from zotune.core.optim import MeZO


class ES(MeZO):
    r"""Evolution strategies with antithetic pairs (Salimans et al. 2017; Qiu et al. 2025).

    The closure takes no arguments and returns the reward of the current (perturbed)
    weights, higher being better; with ``stacked=True`` it takes ``copies`` and returns one
    reward per copy of its batch (the population in one forward, or one batched decoding).
    ``step(closure)`` returns the population's mean reward.

    Args:
        params: as for :class:`~zotune.core.optim.MeZO`.
        lr: the step α (in ``param_groups``, so LR schedulers work).
        sigma: the perturbation scale σ.
        population: perturbed copies per step, an even number (``population / 2`` seeds, each
            evaluated at +σz and -σz).
        shaping: ``"ranks"`` (centred ranks in [-0.5, 0.5]) or ``"zscore"`` ((r - mean) / std).
        weight_decay, direction, seed, stochastic_rounding, stacked, merge, parallel, materialize: as
            for :class:`~zotune.core.optim.MeZO` (``materialize`` suits dense directions decoded one copy after
            another).
    """

    def __init__(self, params, lr: float, sigma: float = 1e-3, population: int = 8, shaping: str = "ranks",
                 weight_decay: float = 0.0, direction="gaussian", seed: int = 0, stochastic_rounding: bool = True,
                 stacked: bool = False, merge: str = "step", parallel=None, materialize: bool = False):
        if not (isinstance(population, int) and population >= 2 and population % 2 == 0):
            raise ValueError(f"population must be an even integer >= 2 (antithetic pairs), got {population!r}")
        if shaping not in SHAPINGS:
            raise ValueError(f"unknown shaping {shaping!r}: use one of {', '.join(SHAPINGS)}")
        super().__init__(params, lr=lr, eps=sigma, weight_decay=weight_decay, n_samples=population // 2,
                         estimator=f"es-{shaping}", direction=direction, seed=seed,
                         stochastic_rounding=stochastic_rounding, stacked=stacked, merge=merge, parallel=parallel,
                         materialize=materialize)

    @property
    def population(self) -> int:
        return 2 * self.n_samples
