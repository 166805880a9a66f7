"""Factored low-rank updates: between two draws of V, a matrix's updates stay an m×r factor.

With low-rank directions every update of a matrix W during one interval of V is
``lr * C_t V^T`` with ``C_t`` (m×r) = sum_j c_j U_j / rank. Summing them into
``A = sum_t lr_t C_t`` and applying ``W - A V^T`` on the layer's output (one rank-r GEMM,
like the perturbation itself) leaves W untouched until V is redrawn, when A is merged
into W once. For an offloaded block this means no write-back between two draws of V.

Only matrices perturbed through their layer's output (Linear, Conv1D, Embedding weights,
see :meth:`LowRank.output_delta_applies`) in groups without weight decay are factored;
the optimizer decides which at its first step's probe and records them in the
trajectory, so replay factors the same ones. The result differs from merging every step
only by rounding, and is itself bit-reproducible.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.nn.modules.module import register_module_forward_hook

from zotune.core import kernels
from zotune.core.directions import Draw, LowRank


@dataclass
class Factor:
    param: torch.Tensor
    key: str
    direction: LowRank
    epoch: int  # which draw of V the factor multiplies
    value: torch.Tensor  # A, float32, m×r, on the device the layer computes on
    last_step: int


class FactoredUpdates:
    """The factors of one optimizer, and the forward hook that applies them."""

    def __init__(self, base_seed: int):
        self.base_seed = base_seed
        self.keys: set[str] | None = None  # None until decided
        self.factors: dict[int, Factor] = {}
        self._handle = None

    def covers(self, key: str) -> bool:
        return self.keys is not None and key in self.keys

    def update(self, param, key: str, direction: LowRank, step: int, draws: list[Draw], coeffs: list[float],
               lr: float, rounding_seed: int | None, device=None) -> bool:
        """Adds a step's update to the parameter's factor; True when this wrote W (V was redrawn)."""
        entry = self.factors.get(id(param))
        wrote = entry is not None and entry.epoch != direction.epoch(step)
        if wrote:
            direction.merge_(param, key, entry.value, self.base_seed, entry.epoch, rounding_seed)
            del self.factors[id(param)]
        self.accumulate(param, key, direction, step, draws, coeffs, lr, device)
        return wrote

    def accumulate(self, param, key, direction, step, draws, coeffs, lr, device=None) -> None:
        """The factor's part of :meth:`update`, also used to rebuild factors on resume (W already merged)."""
        epoch = direction.epoch(step)
        entry = self.factors.get(id(param))
        if entry is not None and entry.epoch != epoch:
            del self.factors[id(param)]
            entry = None
        term = direction.combine(param.shape, key, draws, coeffs, device or param.device).mul_(lr)
        if entry is None:
            self.factors[id(param)] = Factor(param, key, direction, epoch, term, step)
        else:
            entry.value.add_(term)
            entry.last_step = step
        self._hook_on()

    def merge(self, only: set[int] | None = None, rounding=None) -> set[int]:
        """Writes the factors (of the parameters whose ids are in ``only``) into the weights;
        ``rounding(last_step)`` gives the stochastic-rounding seed. Returns the ids written."""
        written = set()
        for pid, entry in list(self.factors.items()):
            if only is None or pid in only:
                seed = rounding(entry.last_step + 1) if rounding and entry.param.dtype in kernels.HALF else None
                entry.direction.merge_(entry.param, entry.key, entry.value, self.base_seed, entry.epoch, seed)
                del self.factors[pid]
                written.add(pid)
        if not self.factors:
            self._hook_off()
        return written

    def clear(self) -> None:
        self.factors.clear()
        self._hook_off()

    def _hook_on(self) -> None:
        if self._handle is None:
            # A weak reference: an optimizer that is dropped takes its hook with it.
            self._handle = register_module_forward_hook(_factor_hook(weakref.ref(self)))
            weakref.finalize(self, self._handle.remove)

    def _hook_off(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def apply(self, module, args, output):
        changed = None
        for param in module._parameters.values():
            entry = self.factors.get(id(param)) if param is not None else None
            if entry is not None:
                changed = entry.direction.subtract_factor(module, param, args, changed if changed is not None
                                                          else output, entry.key, entry.value, self.base_seed,
                                                          entry.epoch)
        return changed



def _factor_hook(ref):
    def hook(module, args, output):
        owner = ref()
        return None if owner is None or not owner.factors else owner.apply(module, args, output)
    return hook
