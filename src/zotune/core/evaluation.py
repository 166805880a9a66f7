"""The first half of a MeZO step: the closure evaluated at the estimator's points.

The points are evaluated one by one under a :class:`~zotune.core.perturb.Perturbation`
(the first time, a probe finds the parameters read outside their modules), or all in one
forward under a :class:`~zotune.core.perturb.StackedPerturbation`. The losses reach the host
in one transfer (with the all-reduce when processes share the step), and the estimator
turns them into the step's record, which :class:`~zotune.core.optim.MeZO` then applies.
"""

from __future__ import annotations

import math
import warnings

import torch

from zotune.core import directions
from zotune.core.directions import Draw
from zotune.core.perturb import Perturbation, PerturbedParam, StackedPerturbation
from zotune.core.rng import derive_seed
from zotune.core.trajectory import TrajectoryStep


class Evaluation:
    """The estimation half of :class:`~zotune.core.optim.MeZO`, mixed into it.

    The optimizer holds the state: its groups and settings (``param_groups``, ``seed``,
    ``steps_done``, ``n_samples``, ``estimator``, ``stacked``, ``parallel``), what the probe
    found (``_read_outside``, ``_factored.keys``) and the CPU buffers (``_scratch``).
    :meth:`estimate` leaves the step's record in ``_pending`` for the update half.
    """


    def _active(self) -> tuple[list[PerturbedParam], list[str]]:
        active, skipped = [], []
        for group in self.param_groups:
            direction = self._direction(group["direction"])
            for param, key in zip(group["params"], group["keys"]):
                if param.requires_grad:
                    active.append(PerturbedParam(self.forward_aliases.get(id(param), param), key, direction))
                else:
                    skipped.append(key)
        return active, skipped

    def _eps(self) -> float:
        values = {group["eps"] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"all parameter groups must share one eps, got {sorted(values)}")
        return values.pop()

    def _evaluate(self, closure, active, draw: Draw | None, eps: float):
        if draw is None:
            return closure()
        signature = frozenset(id(item.param) for item in active)
        if getattr(self, "materialize", False):  # every perturbed weight built once, for the whole evaluation
            with Perturbation(active, draw, eps, whole=signature, scratch=self._scratch_for(active)):
                return closure()
        outside = self._read_outside.get(signature)
        scratch = self._scratch_for(active)
        if outside is None:  # first evaluation of this set: find parameters read outside their modules
            with Perturbation(active, draw, eps, probe=True, scratch=scratch) as probe:
                loss = closure()
            outside = self._read_outside[signature] = probe.read_outside
            self._warn_unread(probe, active)
            self._choose_factored(probe, active)
            if not outside:
                return loss
        with Perturbation(active, draw, eps, whole=outside, scratch=scratch):
            return closure()

    def _scratch_for(self, active):
        # Fresh host allocations of a weight's size cost page faults on every forward, so CPU buffers are kept
        # between evaluations; a GPU's caching allocator reuses memory by itself, and buffers kept there would
        # add to the peak of whatever runs between steps (LMAO's and HZO's first-order phases).
        return self._scratch if all(item.param.device.type == "cpu" for item in active) else None

    def _evaluate_stacked(self, closure, active, plan):
        if frozenset(id(item.param) for item in active) not in self._read_outside:
            first = next(((draw, scale) for draw, scale in plan if draw is not None), None)
            if first is not None:
                self._evaluate(lambda: closure(1), active, *first)  # the probe, once
        if any(self._read_outside.values()):
            raise ValueError("stacked evaluation cannot perturb parameters read outside their modules; "
                             "use stacked=False")
        # The unperturbed point is one more copy, perturbed by 0.
        copies = [(draw or Draw(self.seed, self.steps_done, 0), scale) for draw, scale in plan]
        with StackedPerturbation(active, copies):
            losses = closure(len(copies))
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(copies),):
            raise ValueError(f"with stacked=True the closure must return {len(copies)} losses, one per copy")
        return list(losses.unbind())

    def _choose_factored(self, probe: Perturbation, active) -> None:
        """Which low-rank matrices keep their updates as factors: those the probe saw perturbed
        through their layer's output alone, in groups without weight decay."""
        if self._factored is None or self._factored.keys is not None:
            return
        undecayed = {key for group in self.param_groups if group["weight_decay"] == 0
                     and isinstance(self._direction(group["direction"]), directions.LowRank) for key in group["keys"]}
        self._factored.keys = {item.key for item in active if item.key in undecayed and item.param.ndim == 2
                               and id(item.param) in probe.used - probe.substituted - probe.read_outside}

    def _warn_unread(self, probe: Perturbation, active) -> None:
        unread = [item.key for item in active if id(item.param) not in probe.used | probe.read_outside]
        if unread and not self._warned_unread:
            self._warned_unread = True
            listed = ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else "")
            warnings.warn(f"{len(unread)} of {len(active)} parameters were not read by the loss ({listed}); "
                          "their perturbation had no effect", stacklevel=4)

    def estimate(self, closure, unperturbed_loss=None, riders=()) -> float:
        """Evaluate the closure at the estimator's points and keep the step's coefficients.

        The first half of a step, for trainers that compute the loss themselves;
        :meth:`step` without a closure then applies the update. ``unperturbed_loss``: the
        loss at the current weights when the caller has it already (one-sided estimators
        then evaluate the perturbed points alone). ``riders``: scalar tensors (a first-order
        phase's loss) read in the same host transfer as the step's losses, so that the step
        waits for the device once; their values are then in :attr:`rider_values`.
        """
        active, skipped = self._active()
        eps = self._eps()
        seeds = [derive_seed(self.seed, self.steps_done, j) for j in range(self.n_samples)]
        entries = self.estimator.plan(self.n_samples)
        samples = [sample for sample, _ in entries]
        plan = [(None if sample is None else Draw(self.seed, self.steps_done, seeds[sample]), sign * eps)
                for sample, sign in entries]
        known = unperturbed_loss is not None and plan[0][0] is None
        if unperturbed_loss is not None and not known:
            raise ValueError(f"the {self.estimator.name} estimator does not evaluate the unperturbed point")
        parallel = self.parallel
        todo = [i for i in range(known, len(plan)) if parallel is None or parallel.evaluates(samples[i])]
        losses = [0.0] * len(plan)
        with torch.no_grad():
            if self.stacked:
                evaluated = self._evaluate_stacked(closure, active, [plan[i] for i in todo]) if todo else []
            else:
                evaluated = [self._evaluate(closure, active, *plan[i]) for i in todo]
        for i, loss in zip(todo, evaluated):
            losses[i] = loss
        if known:
            losses[0] = unperturbed_loss.detach() if isinstance(unperturbed_loss, torch.Tensor) else unperturbed_loss
        if parallel is not None:  # a point another rank owns counts there alone
            losses = [loss if parallel.contributes(sample) else 0.0 for loss, sample in zip(losses, samples)]
        values = _to_floats(losses, parallel, riders)  # the step's one host synchronisation (and all-reduce)
        values, self.rider_values = values[:len(losses)], values[len(losses):]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the closure returned a non-finite loss ({values}) at step {self.steps_done}; "
                                     "lower lr or eps, or use float32/bfloat16")
        result = self.estimator.combine(values, self.n_samples, eps)
        self._pending = TrajectoryStep(self.steps_done, seeds, result.grads, [], [], skipped, result.coeffs)
        return result.loss


def _to_floats(losses, parallel=None, riders=()) -> list[float]:
    """The losses (then the riders, not all-reduced) as floats, in one transfer from the device."""
    tensors = [loss for loss in (*losses, *riders) if isinstance(loss, torch.Tensor)]
    if not tensors and parallel is None:
        return [float(loss) for loss in (*losses, *riders)]
    device = tensors[0].device if tensors else torch.device("cpu")

    def as_float64(value):
        if isinstance(value, torch.Tensor):  # on the device already: a dtype change, no copy from the host
            return value.detach().reshape(()).to(dtype=torch.float64)
        return torch.full((), float(value), dtype=torch.float64, device=device)

    stacked = torch.stack([as_float64(loss) for loss in losses])
    if parallel is not None:
        stacked = parallel.combine_losses(stacked)
    if riders:
        stacked = torch.cat([stacked, torch.stack([as_float64(rider) for rider in riders])])
    return stacked.tolist()
