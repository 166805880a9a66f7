"""Exact perturbation: forwards see W + eps*z, the parameters are never written.

Writing the perturbation into the weights (W += eps*z ... W -= eps*z) cannot
restore them exactly in bfloat16/float16, which is why the reference MeZO code
drifts. Instead, while a :class:`Perturbation` is active, a global forward
pre-hook swaps each perturbed parameter's storage for a scratch tensor holding
W + eps*z just before the module that owns it runs, and swaps it back right
after. Only the scratch of the modules running at the moment is alive (for the
usual leaf-owned weights: one tensor), so the extra memory is at most the
largest parameter tensor plus one chunk of direction.

The hooks are global (they see every module's forward) so the optimizer needs
only the parameters, not the model; modules that own none of them cost one
dictionary lookup. A parameter is substituted only inside the forward of a
module that owns it; one read elsewhere sees the unperturbed value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from zotune import directions


@dataclass(frozen=True)
class PerturbedParam:
    """A parameter to perturb, with its direction's key and distribution."""

    param: nn.Parameter
    key_hash: int
    distribution: str


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic on weights runs in float32, or wider if the weights are wider."""
    return torch.promote_types(dtype, torch.float32)


def perturbed_value(item: PerturbedParam, seed: int, eps: float) -> torch.Tensor:
    """A new tensor W + eps*z with W's dtype, computed chunk by chunk in float32 (or wider)."""
    weight = item.param.detach()
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    flat_out, flat_w = out.view(-1), weight.reshape(-1)
    dtype = compute_dtype(weight.dtype)
    for begin, end in directions.chunks(flat_w.numel()):
        z = directions.direction(
            seed, item.key_hash, end - begin, begin, item.distribution, weight.device
        )
        flat_out[begin:end].copy_(z.to(dtype).mul_(eps).add_(flat_w[begin:end]))
    return out


@dataclass
class Perturbation:
    """Context manager under which forwards use W + eps*z for the given parameters."""

    params: list[PerturbedParam]
    seed: int
    eps: float
    _by_id: dict[int, PerturbedParam] = field(init=False, repr=False)
    _swapped: dict[int, tuple[torch.Tensor, int]] = field(init=False, repr=False)
    _used: set[int] = field(init=False, repr=False)
    _handles: list = field(init=False, repr=False)
    _dropout_warned: bool = field(init=False, repr=False, default=False)

    def __post_init__(self):
        self._by_id = {id(item.param): item for item in self.params}
        self._swapped = {}
        self._used = set()
        self._handles = []

    @property
    def unused(self) -> list[PerturbedParam]:
        """Parameters no module forward substituted while the context was active."""
        return [item for item in self.params if id(item.param) not in self._used]

    def __enter__(self) -> Perturbation:
        self._handles = [
            register_module_forward_pre_hook(self._before_forward),
            register_module_forward_hook(self._after_forward, always_call=True),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        # A forward that raised skips nothing here: always hand the weights back.
        for pid in list(self._swapped):
            self._restore(pid, force=True)

    def _owned(self, module: nn.Module):
        for param in module._parameters.values():
            if param is not None and id(param) in self._by_id:
                yield param

    def _before_forward(self, module: nn.Module, args):
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0 and not self._dropout_warned:
                self._dropout_warned = True
                warnings.warn(
                    "dropout is active during a zeroth-order forward, so the two "
                    "perturbed losses use different masks; call model.eval() first",
                    stacklevel=2,
                )
        for param in self._owned(module):
            pid = id(param)
            if pid in self._swapped:  # re-entered (a module calling itself): already perturbed
                original, depth = self._swapped[pid]
                self._swapped[pid] = (original, depth + 1)
                continue
            original = param.data
            param.data = perturbed_value(self._by_id[pid], self.seed, self.eps)
            self._swapped[pid] = (original, 1)
            self._used.add(pid)

    def _after_forward(self, module: nn.Module, args, output):
        for param in self._owned(module):
            self._restore(id(param))

    def _restore(self, pid: int, force: bool = False):
        if pid not in self._swapped:
            return
        original, depth = self._swapped[pid]
        if depth > 1 and not force:
            self._swapped[pid] = (original, depth - 1)
            return
        self._by_id[pid].param.data = original
        del self._swapped[pid]
