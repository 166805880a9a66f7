"""MeZO / ZO-SGD as a ``torch.optim.Optimizer``: the public face of the core.

:class:`MeZO` is the optimizer: its parameter groups, the update half of a step, its
records and resume. The estimation half (evaluating the closure at perturbed points)
is :class:`~zotune.core.evaluation.Evaluation`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch

from zotune.core import directions, estimate, kernels
from zotune.core.directions import Draw, local_part
from zotune.core.evaluation import Evaluation
from zotune.core.factored import FactoredUpdates
from zotune.core.rng import rounding_seed
from zotune.core.trajectory import Trajectory, TrajectoryStep

MERGES = ("step", "resample")


def decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Named parameter groups of the trainable parameters, with decay on matrices only (not biases or norms)."""
    decay, no_decay = ([], []), ([], [])
    for name, param in named_parameters:
        if param.requires_grad:
            target = decay if param.ndim >= 2 and "norm" not in name.lower() else no_decay
            target[0].append(param)
            target[1].append(name)
    return [{"params": params, "param_names": names, "weight_decay": wd}
            for (params, names), wd in ((decay, weight_decay), (no_decay, 0.0)) if params]


class MeZO(Evaluation, torch.optim.Optimizer):
    r"""Zeroth-order SGD (MeZO, Malladi et al. 2023) with exact, seeded perturbations.

    Each step draws ``n_samples`` seeds; the estimator evaluates the closure at
    perturbed points ``W ± eps z_j`` (z_j regenerated from its seed, never stored) and
    gives coefficients c_j; then, per parameter group,

    .. math:: W \leftarrow W - \mathrm{lr}\,\Big(\sum_j c_j z_j + \lambda W\Big).

    With the default two-sided SPSA estimator c_j = g_j / n, g_j = (L+ - L-) / (2 eps).
    Every parameter the loss reads is perturbed, however it is read (see
    :mod:`zotune.core.perturb`); the weights are never rounded by a perturbation, so with
    ``lr=0`` a step leaves them bit-identical in every dtype. Updates are computed in
    float32 (float64 for float64 weights) and rounded once into the weights' dtype:
    stochastically for bfloat16/float16 when ``stochastic_rounding`` (exact in
    expectation, from the same counter-based stream, so replay stays bit-identical).

    The closure takes no arguments and returns the minibatch loss (tensor or float). It
    is called under ``torch.no_grad()``; put the model in ``eval()`` mode so that dropout
    does not differ between the calls. Losses stay on their device until one transfer
    per step. ``step(closure)`` returns the estimator's loss (two-sided: the mean of the
    perturbed losses; one-sided and FZOO: the unperturbed loss) as a float.

    Args:
        params: parameters, ``named_parameters()`` (names become the keys of the
            directions: readable and order-proof) or parameter groups (dicts may
            override lr, eps, weight_decay, direction).
        lr: learning rate; lives in ``param_groups`` so LR schedulers work.
        eps: perturbation scale (the same for all groups).
        weight_decay: lambda above (per group: give norms and biases 0).
        n_samples: perturbations per step (n-SPSA).
        estimator: ``"spsa"`` (two-sided), ``"one-sided"`` or ``"fzoo"``.
        direction: ``"gaussian"``, ``"rademacher"``, ``"lowrank"`` or a
            :class:`~zotune.core.directions.Direction` such as ``LowRank(rank=2, interval=50)``.
        seed: base seed; step t, sample j uses a seed derived from (seed, t, j).
        stochastic_rounding: round bfloat16/float16 updates stochastically.
        stacked: evaluate all perturbed points of a step in one forward. The closure then
            takes ``copies`` and returns a tensor of ``copies`` losses for its batch repeated
            ``copies`` times along dim 0 (copy-major); ``closure(1)`` is one plain loss.
            With low-rank directions the weights are read once instead of 2n times;
            activation memory grows ``copies``-fold.
        merge: ``"step"``: every update is written into the weights; ``"resample"``: the
            updates of low-rank matrices stay an m×r factor applied on the layer's output
            until V is redrawn (:mod:`zotune.core.factored`). Call :meth:`merge_factors`
            before reading the weights themselves (saving a model).
        parallel: a :class:`zotune.engine.distributed.Parallel` when several processes share
            the step: one all-reduce of the step's losses (data mode: the closure's loss is
            the rank's slice's; perturbation mode: each rank evaluates its own samples).
        momentum: heavy-ball β: each update also adds β^k times the estimate of k steps ago,
            for 0 < k < ``momentum_window``. Those directions are regenerated from their seeds
            (recorded in the step as ``echoes``), so no momentum buffer is kept; each step's
            update costs ``momentum_window`` passes over the weights instead of one.
            Dense and sparse directions only.
        normalize_window: when W > 0, each update is divided by the root mean square of the
            projected gradients of the last W steps (this one included): a scalar RMSprop on
            the estimate, so that the step's size no longer follows the gradient's scale. A
            step whose |g| jumps (the start of a divergence) moves the weights less, and the
            small gradients of a plateau move them as much as the large ones of the start.
            ``lr`` is then the step in units of z. No state: the recent gradients are in the
            step records.
        materialize: build every perturbed weight once per evaluation (a whole perturbed copy of
            the trained weights in memory while the closure runs) instead of once per forward of
            its module: for closures that run the model many times, such as decoding, where a
            dense direction would otherwise be regenerated at every token.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, n_samples: int = 1,
                 estimator: str = "spsa", direction="gaussian", seed: int = 0, stochastic_rounding: bool = True,
                 stacked: bool = False, merge: str = "step", parallel=None, momentum: float = 0.0,
                 momentum_window: int = 8, normalize_window: int = 0, materialize: bool = False):
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(momentum_window, int) and momentum_window >= 1):
            raise ValueError(f"momentum_window must be an integer >= 1, got {momentum_window!r}")
        if not (isinstance(normalize_window, int) and normalize_window >= 0):
            raise ValueError(f"normalize_window must be an integer >= 0, got {normalize_window!r}")
        self.materialize = bool(materialize)
        if self.materialize and stacked:
            raise ValueError("materialize builds one perturbed copy of the weights per evaluation: use stacked=False")
        self.momentum, self.momentum_window = float(momentum), momentum_window
        self.normalize_window = normalize_window
        self.merge = merge
        self._factored = FactoredUpdates(seed) if merge == "resample" else None
        self.estimator = estimate.get(estimator)
        if n_samples < self.estimator.min_samples:
            raise ValueError(f"estimator {estimator!r} needs n_samples >= {self.estimator.min_samples}")
        self.n_samples, self.seed, self.stochastic_rounding = n_samples, seed, bool(stochastic_rounding)
        self.stacked = bool(stacked)
        self.parallel = parallel
        # Sharded parameters: the gathered parameter a forward reads instead (zotune.engine.sharding).
        self.forward_aliases: dict[int, torch.Tensor] = {}
        self.steps_done = 0
        self._pending: TrajectoryStep | None = None
        self._history: list[TrajectoryStep] = []
        self._directions: dict[str, directions.Direction] = {}
        self._read_outside: dict[frozenset, set[int]] = {}
        self._scratch: dict = {}  # perturbed weights' buffers, reused across evaluations on the CPU
        self._warned_unread = False
        self._deferred: set[int] = set()
        self._deferred_device = None
        self._receivers: list = []
        self._history_in_state = True
        self.rider_values: list[float] = []
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, direction=directions.make(direction).spec)
        super().__init__(params, defaults)
        if self.momentum and any(isinstance(self._direction(g["direction"]), directions.LowRank)
                                 for g in self.param_groups):
            raise ValueError("momentum adds earlier directions again, and a low-rank one depends on the V of its "
                             "interval: use dense or sparse directions")

    def add_param_group(self, param_group: dict) -> None:
        position = sum(len(group["params"]) for group in self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["direction"] = self._direction(group["direction"]).spec
        names = group.get("param_names")
        group["keys"] = list(names) if names is not None else [f"#{position + i}" for i in range(len(group["params"]))]
        seen = [k for g in self.param_groups[:-1] for k in g["keys"]]
        if set(seen) & set(group["keys"]) or len(set(group["keys"])) != len(group["keys"]):
            raise ValueError("parameter names must be unique across groups")

    def _direction(self, spec) -> directions.Direction:
        # Called per group on every step with the group's spec dict: look it up before building anything.
        if isinstance(spec, dict) and repr(sorted(spec.items())) in self._directions:
            return self._directions[repr(sorted(spec.items()))]
        direction = directions.make(spec)
        label = repr(sorted(direction.spec.items()))
        return self._directions.setdefault(label, direction)  # one object per spec: its V cache is shared

    # -- update -----------------------------------------------------------

    def step(self, closure=None, unperturbed_loss=None, riders=()) -> float | None:
        """One step: ``estimate(closure, unperturbed_loss, riders)`` (if a closure is given) then the update."""
        loss = self.estimate(closure, unperturbed_loss, riders) if closure is not None else None
        if self._pending is None:
            raise RuntimeError("MeZO.step() needs a closure, or a call to estimate(closure) first")
        record = self._pending
        record.lrs = [float(group["lr"]) for group in self.param_groups]
        record.weight_decays = [float(group["weight_decay"]) for group in self.param_groups]
        if self.normalize_window:
            record.coeffs = self._normalized(record)
        if self.momentum and self.momentum_window > 1:
            record.echoes = self._echoes()
        self._commit(record)
        self._pending = None
        self.steps_done += 1
        return loss

    def _normalized(self, record: TrajectoryStep) -> list[float]:
        earlier = self._history[max(0, len(self._history) - self.normalize_window + 1):]
        recent = [g for step in earlier for g in step.grads] + list(record.grads)
        rms = math.sqrt(sum(g * g for g in recent) / len(recent))
        return [c / rms if rms > 0 else 0.0 for c in record.coefficients()]

    def _echoes(self) -> list[list]:
        """β^k times the coefficients of the step k steps back, for 0 < k < the window, with their seeds."""
        echoes = []
        for k, earlier in enumerate(reversed(self._history[-(self.momentum_window - 1):]), 1):
            weight = self.momentum ** k
            echoes += [[earlier.step, seed, weight * c] for seed, c in zip(earlier.seeds, earlier.coefficients())]
        return echoes

    def _commit(self, record: TrajectoryStep) -> None:
        self.apply_step(record, skip=self._deferred)
        for receiver in self._receivers:
            receiver(self, record)
        self._history.append(record)

    def defer_updates(self, params, receiver, device=None) -> None:
        """Leave the updates of ``params`` to ``receiver(optimizer, record)``, called after each
        step, who applies them later with ``apply_step(record, only=...)`` (block offload) on
        ``device`` (where their factors live)."""
        self._deferred |= {id(p) for p in params}
        self._deferred_device = device
        self._receivers.append(receiver)

    @torch.no_grad()
    def apply_step(self, record: TrajectoryStep, only: set[int] | None = None, skip: set[int] = frozenset()) -> set:
        """Apply one recorded update (used by :meth:`step` and :func:`replay`), to the
        parameters whose ids are in ``only`` (default: all) and not in ``skip``. Returns the
        ids of the parameters whose weights it wrote (a factored update may write none)."""
        written = set()
        coeffs = record.coefficients()
        draws = [Draw(self.seed, record.step, seed) for seed in record.seeds]
        if record.echoes:
            coeffs = coeffs + [coeff for _, _, coeff in record.echoes]
            draws += [Draw(self.seed, step, seed) for step, seed, _ in record.echoes]
        rounding = rounding_seed(self.seed, record.step) if self.stochastic_rounding else None
        skipped = set(record.skipped)
        for group, lr, wd in zip(self.param_groups, record.lrs, record.weight_decays):
            if lr == 0:
                continue
            direction = self._direction(group["direction"])
            for param, key in zip(group["params"], group["keys"]):
                if key in skipped or id(param) in skip or (only is not None and id(param) not in only):
                    continue
                half_rounding = rounding if param.dtype in kernels.HALF else None
                if self._factored is not None and self._factored.covers(key):
                    if wd:
                        raise ValueError(f"{key}: factored updates (merge='resample') need weight_decay 0")
                    if self._factored.update(param, key, direction, record.step, draws, coeffs, lr, half_rounding):
                        written.add(id(param))
                else:
                    held, start = local_part(param)
                    if held is param:
                        direction.update_(param, key, draws, coeffs, lr, wd, half_rounding)
                    elif not isinstance(direction, directions.Dense):
                        raise ValueError(f"{key} is sharded: use dense directions (gaussian or rademacher)")
                    elif held.numel():  # this rank's rows, with the unsharded run's z there
                        direction.update_(held, key, draws, coeffs, lr, wd, half_rounding, start=start)
                    written.add(id(param))
        return written

    @torch.no_grad()
    def merge_factors(self, only: set[int] | None = None) -> set:
        """Writes the pending low-rank factors (of ``only``, default all) into the weights; returns the ids written."""
        if self._factored is None:
            return set()
        rounding = (lambda step: rounding_seed(self.seed, step)) if self.stochastic_rounding else None
        return self._factored.merge(only, rounding)

    @torch.no_grad()
    def _rebuild_factors(self) -> None:
        """The factors of a resumed run, re-accumulated from its history (the weights hold every merge)."""
        self._factored.clear()
        for g, group in enumerate(self.param_groups):
            direction = self._direction(group["direction"])
            for param, key in zip(group["params"], group["keys"]):
                if not self._factored.covers(key):
                    continue
                updates = [r for r in self._history if r.lrs[g] != 0 and key not in r.skipped]
                if not updates:
                    continue
                epoch = direction.epoch(updates[-1].step)
                device = self._deferred_device if id(param) in self._deferred else None
                for record in updates:
                    if direction.epoch(record.step) == epoch:
                        draws = [Draw(self.seed, record.step, seed) for seed in record.seeds]
                        self._factored.accumulate(param, key, direction, record.step, draws, record.coefficients(),
                                                  record.lrs[g], device)

    # -- records and resume -----------------------------------------------

    @property
    def last_step(self) -> TrajectoryStep | None:
        """The record of the latest step (seeds, projected gradients, lrs), or None before the first."""
        return self._history[-1] if self._history else None

    @property
    def trajectory(self) -> Trajectory:
        """Everything :func:`replay` needs to rebuild the weights."""
        factored = None if self._factored is None or self._factored.keys is None else sorted(self._factored.keys)
        return Trajectory(keys=[list(g["keys"]) for g in self.param_groups],
                          sizes=[[p.numel() for p in g["params"]] for g in self.param_groups],
                          directions=[dict(g["direction"]) for g in self.param_groups], seed=self.seed,
                          stochastic_rounding=self.stochastic_rounding, steps=list(self._history),
                          merge=self.merge, factored=factored)

    @contextmanager
    def history_apart(self):
        """Inside it, :meth:`state_dict` leaves out the step records: a trajectory checkpoint
        stores them apart, append-only, and gives them back to :meth:`catch_up`."""
        self._history_in_state = False
        try:
            yield self
        finally:
            self._history_in_state = True

    @torch.no_grad()
    def catch_up(self, history: list[TrajectoryStep], start: int, wrap=iter) -> None:
        """Resume from weights that hold the first ``start`` steps of ``history`` (a snapshot, or
        the initial weights), after :meth:`load_state_dict` of a state saved under
        :meth:`history_apart`: applies the other steps as the run applied them (offloaded ones
        through the engine, factors merged when V was redrawn), so the weights, factors and
        pending updates are the uninterrupted run's. ``wrap`` wraps the steps' iterator (a
        progress bar)."""
        if len(history) != self.steps_done or not 0 <= start <= len(history):
            raise ValueError(f"catch_up needs the {self.steps_done} recorded steps and a start within them, got "
                             f"{len(history)} steps and start {start}")
        self._history = list(history[:start])
        if self._factored is not None:
            self._rebuild_factors()
        for record in wrap(history[start:]):
            self._commit(record)

    def state_dict(self) -> dict:
        state = super().state_dict()
        pending = None if self._pending is None else Trajectory([], [], [], steps=[self._pending]).to_dict()
        trajectory = self.trajectory.to_dict()
        if not self._history_in_state:
            trajectory["steps"] = []
        state["zotune"] = {"steps_done": self.steps_done, "n_samples": self.n_samples,
                           "estimator": self.estimator.name, "pending": pending, "trajectory": trajectory}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zotune", None)
        if extra is None:
            raise ValueError("not a zotune MeZO state dict (no 'zotune' entry)")
        recorded = Trajectory.from_dict(extra["trajectory"])
        if recorded.keys != self.trajectory.keys or recorded.sizes != self.trajectory.sizes:
            raise ValueError("the state dict was saved for different parameters")
        super().load_state_dict(state_dict)
        self.steps_done, self.n_samples = extra["steps_done"], extra["n_samples"]
        self.estimator = estimate.get(extra["estimator"])
        self.seed, self.stochastic_rounding = recorded.seed, recorded.stochastic_rounding
        pending = extra["pending"]
        self._pending = None if pending is None else Trajectory.from_dict(pending).steps[0]
        self._history = recorded.steps
        if recorded.merge != self.merge:
            raise ValueError(f"the state dict was saved with merge={recorded.merge!r}, not {self.merge!r}")
        if self._factored is not None:
            self._factored.base_seed = self.seed
            self._factored.keys = None if recorded.factored is None else set(recorded.factored)
            self._rebuild_factors()



def replay(params, trajectory: Trajectory | dict | str | os.PathLike) -> None:
    """Apply every step of ``trajectory`` to ``params`` in place.

    ``params`` must be given as to the optimizer that recorded the trajectory (same
    groups, order and names) and hold the initial weights.
    """
    if isinstance(trajectory, dict):
        trajectory = Trajectory.from_dict(trajectory)
    elif not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    optimizer = MeZO(params, lr=0.0, seed=trajectory.seed, stochastic_rounding=trajectory.stochastic_rounding,
                     merge=trajectory.merge)
    if trajectory.factored is not None:
        optimizer._factored.keys = set(trajectory.factored)
    layout = optimizer.trajectory
    if layout.keys != trajectory.keys or layout.sizes != trajectory.sizes:
        raise ValueError("replay needs the parameters of the recorded run, in the same groups, order and naming "
                         "(named_parameters() if the run used names)")
    for group, spec in zip(optimizer.param_groups, trajectory.directions):
        group["direction"] = optimizer._direction(spec).spec
    for step in trajectory.steps:
        optimizer.apply_step(step)
    optimizer.merge_factors()
