"""AdamW for half-precision weights: float32 master copies take the updates.

``torch.optim.AdamW`` keeps its moments in the parameter's dtype. In float16 its eps
(1e-8) rounds to zero, so an element whose gradient is zero gets 0/0 = NaN even at
``lr=0``; in bfloat16 an update lr·m/√v ≈ 1e-4 of a weight ≈ 0.02 is below the weight's
spacing and rounds away, so training stalls. :func:`adamw` gives the first-order parts of
the methods a plain ``torch.optim.AdamW`` when no parameter is half precision, else a
:class:`MasterAdamW` (mixed precision as in Micikevicius et al. 2018, without loss
scaling: the gradients stay in the weights' dtype, whose range bf16 and the small
losses of fine-tuning make ample).
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def adamw(params, **options) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(params, **options)``, or :class:`MasterAdamW` when a parameter is float16 or bfloat16."""
    # A group's parameters are read here and again by the optimizer: a list, not a one-shot iterator.
    params = [{**item, "params": _listed(item["params"])} if isinstance(item, dict) else item for item in params]
    optimizer = MasterAdamW if any(p.dtype in HALF for p in _tensors(params)) else torch.optim.AdamW
    return optimizer(params, **options)


def _listed(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensors(params):
    for item in params:
        for p in item["params"] if isinstance(item, dict) else [item]:
            yield p[1] if isinstance(p, tuple) else p  # torch also takes (name, parameter) pairs


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


class MasterAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` on float32 masters of the float16/bfloat16 parameters.

    ``param_groups`` hold the model's own parameters, so that gradient clipping,
    ``zero_grad`` and learning-rate schedules act on them as on any optimizer. ``step``
    copies each half gradient into its master's, runs the inner AdamW (``adamw``, moments in
    float32) with the groups' current hyperparameters and rounds the masters to nearest into
    the weights. A float32 parameter is its own master. The masters are the true weights:
    ``state_dict`` holds them, and ``load_state_dict`` writes them back into the weights
    too; a weight written from outside between steps is overwritten by its master at the
    next step. A master follows its parameter to another device (an offload engine moves
    the resident parameters after the optimizer is built).

    Args: those of ``torch.optim.AdamW``.
    """

    def __init__(self, params, **options):
        self.adamw: torch.optim.AdamW | None = None
        self._options = options
        super().__init__(params, {})  # add_param_group fills in AdamW's defaults

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        masters = {**group, "params": [p.detach().float() if p.dtype in HALF else p for p in group["params"]]}
        if self.adamw is None:
            self.adamw = torch.optim.AdamW([masters], **self._options)
        else:
            self.adamw.add_param_group(masters)
        group.update(_hyperparameters(self.adamw.param_groups[-1]))
        self.defaults = self.adamw.defaults

    def _pairs(self):
        """(parameter, master) of each half-precision parameter, in group order."""
        for group, inner in zip(self.param_groups, self.adamw.param_groups):
            for param, master in zip(group["params"], inner["params"]):
                if master is not param:
                    yield param, master

    def _sync_hyperparameters(self) -> None:
        for group, inner in zip(self.param_groups, self.adamw.param_groups):
            inner.update(_hyperparameters(group))

    def _follow_parameters(self) -> None:
        """Moves each master, and its moments, to its parameter's device."""
        for param, master in self._pairs():
            if master.device != param.device:
                master.data = master.data.to(param.device)
                state = self.adamw.state.get(master, {})
                for key, value in state.items():  # AdamW keeps its step count on the CPU
                    if key != "step" and isinstance(value, torch.Tensor):
                        state[key] = value.to(param.device)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        self._follow_parameters()
        stepped = []
        for param, master in self._pairs():
            if param.grad is not None:
                master.grad = param.grad.float()
                stepped.append((param, master))
        self.adamw.step()
        with torch.no_grad():
            for param, master in stepped:
                param.copy_(master)
                master.grad = None  # a float32 gradient per weight: held for the update alone
        return loss

    def state_dict(self) -> dict:
        self._sync_hyperparameters()
        return {"adamw": self.adamw.state_dict(), "masters": [master for _, master in self._pairs()]}

    def load_state_dict(self, state_dict: dict) -> None:
        pairs = list(self._pairs())
        if len(state_dict["masters"]) != len(pairs):
            raise ValueError(f"the state holds {len(state_dict['masters'])} float32 masters, the optimizer has "
                             f"{len(pairs)} half-precision parameters")
        self._follow_parameters()  # AdamW puts the loaded moments where the masters are
        self.adamw.load_state_dict(state_dict["adamw"])
        for group, inner in zip(self.param_groups, self.adamw.param_groups):
            group.update(_hyperparameters(inner))
        with torch.no_grad():
            for (param, master), saved in zip(pairs, state_dict["masters"]):
                master.copy_(saved)
                param.copy_(master)
