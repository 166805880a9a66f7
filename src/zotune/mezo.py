"""MeZO / ZO-SGD: zeroth-order SGD with two-point SPSA, as a torch optimizer."""

from __future__ import annotations

import math
import warnings

import torch

from zotune import directions
from zotune.perturb import Perturbation, PerturbedParam, compute_dtype
from zotune.trajectory import Trajectory, TrajectoryStep


def _as_float(loss) -> float:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return value


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


class MeZO(torch.optim.Optimizer):
    r"""Zeroth-order SGD (MeZO, Malladi et al. 2023) with exact, seeded perturbations.

    Each step draws ``n_samples`` seeds s_j; for each, the closure is evaluated at
    W + eps*z_j and W - eps*z_j (z_j regenerated from s_j, never stored) giving the
    projected gradient g_j = (L+ - L-) / (2 eps), or (L+ - L0) / eps when
    ``one_sided``. Then, per parameter group,

    .. math:: W \leftarrow W - \mathrm{lr}\,\Big(\frac1n\sum_j g_j z_j + \lambda W\Big).

    Only parameters with ``requires_grad=True`` at the time of a step are
    perturbed and updated. The perturbed weights are never written into the
    parameters (see :mod:`zotune.perturb`), so with ``lr=0`` a step leaves them
    bit-identical in every dtype. Updates are computed in float32 (float64 for
    float64 weights) and rounded once into the parameter's dtype.

    The closure takes no arguments and returns the minibatch loss (tensor or
    float). It is called under ``torch.no_grad()``, ``2 * n_samples`` times
    (``n_samples + 1`` when one-sided); put the model in ``eval()`` mode so that
    dropout does not differ between the calls. ``step(closure)`` returns the
    mean of the perturbed losses (two-sided), or the loss at the unperturbed
    point (one-sided), as a float.

    Args:
        params: parameters, ``named_parameters()`` (names become the keys of the
            directions, which makes trajectories readable and order-proof) or
            parameter groups (dicts may override lr, eps, weight_decay,
            distribution).
        lr: learning rate; lives in ``param_groups`` so LR schedulers work.
        eps: perturbation scale (the same for all groups).
        weight_decay: lambda in the update above (per group: give norms and biases 0).
        n_samples: perturbations per step (n-SPSA); each contributes g_j z_j / n.
        one_sided: use (L(W + eps z) - L(W)) / eps.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        seed: base seed; step t, sample j uses a seed derived from (seed, t, j).
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        n_samples: int = 1,
        one_sided: bool = False,
        distribution: str = "gaussian",
        seed: int = 0,
    ):
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
        directions.check_distribution(distribution)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, distribution=distribution)
        super().__init__(params, defaults)
        self.n_samples = n_samples
        self.one_sided = one_sided
        self.seed = seed
        self.steps_done = 0
        self._pending: tuple[list[int], list[float], list[str]] | None = None
        self._history: list[TrajectoryStep] = []
        self._warned_unused = False
        self._keys = self._direction_keys()
        self._key_hashes = [[directions.hash64("param", k) for k in keys] for keys in self._keys]

    def _direction_keys(self) -> list[list[str]]:
        keys, position = [], 0
        for group in self.param_groups:
            directions.check_distribution(group["distribution"])
            names = group.get("param_names")
            if names is None:
                names = [f"#{position + i}" for i in range(len(group["params"]))]
            keys.append(list(names))
            position += len(group["params"])
        flat = [k for group_keys in keys for k in group_keys]
        if len(set(flat)) != len(flat):
            raise ValueError("parameter names must be unique across groups")
        return keys

    # -- estimation -------------------------------------------------------

    def _active(self) -> tuple[list[PerturbedParam], list[str]]:
        active, skipped = [], []
        for group, keys, hashes in zip(self.param_groups, self._keys, self._key_hashes):
            for param, key, key_hash in zip(group["params"], keys, hashes):
                if param.requires_grad:
                    active.append(PerturbedParam(param, key_hash, group["distribution"]))
                else:
                    skipped.append(key)
        return active, skipped

    def _eps(self) -> float:
        values = {group["eps"] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"all parameter groups must share one eps, got {sorted(values)}")
        return values.pop()

    def _evaluate(self, closure, active, seed: int | None, eps: float) -> float:
        with torch.no_grad():
            if seed is None:
                loss = _as_float(closure())
            else:
                with Perturbation(active, seed, eps) as perturbation:
                    loss = _as_float(closure())
                self._warn_unused(perturbation, active)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the closure returned a non-finite loss ({loss}) at step {self.steps_done}; "
                "lower lr or eps, or use float32/bfloat16"
            )
        return loss

    def _warn_unused(self, perturbation: Perturbation, active) -> None:
        unused = perturbation.unused
        if unused and not self._warned_unused:
            self._warned_unused = True
            names = {id(p): k for g, ks in zip(self.param_groups, self._keys) for p, k in zip(g["params"], ks)}
            listed = ", ".join(names[id(item.param)] for item in unused[:5])
            warnings.warn(
                f"{len(unused)} of {len(active)} parameters were not used inside the forward of a "
                f"module that owns them ({listed}{', ...' if len(unused) > 5 else ''}); "
                "their perturbation had no effect on the loss",
                stacklevel=3,
            )

    def estimate(self, closure) -> float:
        """Evaluate the closure at the perturbed points and keep the projected gradients.

        The first half of a step, for trainers that compute the loss themselves;
        :meth:`step` without a closure then applies the update.
        """
        active, skipped = self._active()
        eps = self._eps()
        seeds = [directions.derive_seed(self.seed, self.steps_done, j) for j in range(self.n_samples)]
        grads, losses = [], []
        base = self._evaluate(closure, active, None, eps) if self.one_sided else None
        for seed in seeds:
            plus = self._evaluate(closure, active, seed, eps)
            if self.one_sided:
                grads.append((plus - base) / eps)
            else:
                minus = self._evaluate(closure, active, seed, -eps)
                grads.append((plus - minus) / (2 * eps))
                losses += [plus, minus]
        self._pending = (seeds, grads, skipped)
        return base if self.one_sided else sum(losses) / len(losses)

    # -- update -----------------------------------------------------------

    def step(self, closure=None) -> float | None:
        """One MeZO step: ``estimate(closure)`` (if given) then the update."""
        loss = self.estimate(closure) if closure is not None else None
        if self._pending is None:
            raise RuntimeError("MeZO.step() needs a closure, or a call to estimate(closure) first")
        seeds, grads, skipped = self._pending
        record = TrajectoryStep(
            step=self.steps_done,
            seeds=seeds,
            grads=grads,
            lrs=[float(group["lr"]) for group in self.param_groups],
            weight_decays=[float(group["weight_decay"]) for group in self.param_groups],
            skipped=skipped,
        )
        self.apply_step(record)
        self._history.append(record)
        self._pending = None
        self.steps_done += 1
        return loss

    @torch.no_grad()
    def apply_step(self, record: TrajectoryStep) -> None:
        """Apply one recorded update (used by :meth:`step` and :func:`zotune.replay`)."""
        coeffs = [g / len(record.grads) for g in record.grads]
        skipped = set(record.skipped)
        for group, keys, hashes, lr, wd in zip(
            self.param_groups, self._keys, self._key_hashes, record.lrs, record.weight_decays
        ):
            if lr == 0:
                continue
            for param, key, key_hash in zip(group["params"], keys, hashes):
                if key not in skipped:
                    self._update(param, key_hash, group["distribution"], record.seeds, coeffs, lr, wd)

    @staticmethod
    def _update(param, key_hash, distribution, seeds, coeffs, lr, weight_decay) -> None:
        weight = param.data
        work = weight if weight.is_contiguous() else weight.contiguous()
        flat = work.view(-1)
        dtype = compute_dtype(weight.dtype)
        z = None
        for begin, end in directions.chunks(flat.numel()):
            w = flat[begin:end].to(dtype, copy=True)
            update = torch.zeros_like(w)
            if z is None or z.numel() != end - begin:
                z = torch.empty(end - begin, dtype=torch.float32, device=w.device)
            for seed, coeff in zip(seeds, coeffs):
                directions.fill(z, seed, key_hash, begin, distribution)
                update.add_(z, alpha=coeff)
            if weight_decay:
                update.add_(w, alpha=weight_decay)
            flat[begin:end].copy_(w.add_(update, alpha=-lr))
        if work is not weight:
            weight.copy_(work)

    # -- records and resume -----------------------------------------------

    @property
    def last_step(self) -> TrajectoryStep | None:
        """The record of the latest step (seeds, projected gradients, lrs), or None before the first."""
        return self._history[-1] if self._history else None

    @property
    def trajectory(self) -> Trajectory:
        """Everything :func:`zotune.replay` needs to rebuild the weights."""
        return Trajectory(
            keys=[list(k) for k in self._keys],
            sizes=[[p.numel() for p in group["params"]] for group in self.param_groups],
            distributions=[group["distribution"] for group in self.param_groups],
            steps=list(self._history),
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        pending = None if self._pending is None else [list(x) for x in self._pending]
        state["zotune"] = {
            "steps_done": self.steps_done,
            "seed": self.seed,
            "n_samples": self.n_samples,
            "one_sided": self.one_sided,
            "pending": pending,
            "trajectory": self.trajectory.to_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zotune", None)
        if extra is None:
            raise ValueError("not a zotune MeZO state dict (no 'zotune' entry)")
        super().load_state_dict(state_dict)
        recorded = Trajectory.from_dict(extra["trajectory"])
        if recorded.keys != self._keys or recorded.sizes != self.trajectory.sizes:
            raise ValueError("the state dict was saved for different parameters")
        self.steps_done = extra["steps_done"]
        self.seed = extra["seed"]
        self.n_samples = extra["n_samples"]
        self.one_sided = extra["one_sided"]
        self._pending = None if extra["pending"] is None else tuple(extra["pending"])
        self._history = recorded.steps
