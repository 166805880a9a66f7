"""LMAO (Zhang et al., ICLR 2026): three forwards, one backward.

Each step, on one minibatch: a first-order AdamW step on the LoRA adapters (train
mode, gradient clipping), then a two-point zeroth-order (MeZO) step on every other
parameter along a dense full-rank direction (eval mode, no autograd), with the
updated adapters. Full-rank updates of the base weights at LoRA's memory: the ZO
phase holds no gradients and perturbs through :mod:`zotune.perturb` (one scratch
tensor), so it adds nothing to the FO phase's peak.
"""

from __future__ import annotations

import math

import torch

from zotune.mezo import MeZO, decay_groups
from zotune.trajectory import Trajectory


def is_adapter(name: str) -> bool:
    """peft's adapter parameters (LoRA A/B, embeddings, magnitudes) all carry ``lora_`` in their names."""
    return "lora_" in name


class LMAO:
    """The two optimizers of LMAO behind one ``step(closure)`` / ``state_dict`` surface.

    Args:
        model: a peft model with LoRA adapters (``peft.get_peft_model``).
        lr_lora: AdamW learning rate of the adapters (η_BA); ``fo`` is a plain
            ``torch.optim.AdamW``, so attach any scheduler to it (the paper decays it linearly).
        lr_base: ZO learning rate of the base weights (η_W, constant in the paper).
        eps: ZO perturbation scale.
        weight_decay: ZO weight decay λ on base matrices (biases and norms get none).
        lora_weight_decay: AdamW weight decay of the adapters.
        max_grad_norm: clipping of the adapters' gradient (None: no clipping).
        distribution, n_samples, seed: as in :class:`zotune.MeZO`.

    ``step(closure)``: the closure returns the minibatch loss; it is called once with
    autograd on and the model in train mode (the FO phase), then ``2 * n_samples``
    times under ``no_grad`` in eval mode (the ZO phase). Returns the FO phase's loss.
    """

    def __init__(self, model, lr_lora: float = 1e-5, lr_base: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, lora_weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 distribution: str = "gaussian", n_samples: int = 1, seed: int = 0):
        self.model = model
        named = list(model.named_parameters())
        adapters = [(n, p) for n, p in named if is_adapter(n)]
        base = [(n, p) for n, p in named if not is_adapter(n)]
        if not adapters:
            raise ValueError("LMAO needs a peft model with LoRA adapters (no parameter named lora_*)")
        self.adapters = [p for _, p in adapters]
        self.base = [p for _, p in base]
        self.max_grad_norm = max_grad_norm
        self.fo = torch.optim.AdamW(
            [{"params": self.adapters, "param_names": [n for n, _ in adapters]}],
            lr=lr_lora, weight_decay=lora_weight_decay,
        )
        for p in self.base:  # decay_groups keeps trainable parameters; ZO phases switch them on in turn
            p.requires_grad_(True)
        self.zo = MeZO(decay_groups(base, weight_decay), lr=lr_base, eps=eps, n_samples=n_samples,
                       distribution=distribution, seed=seed)
        self._train_only(self.adapters)

    def _train_only(self, trainable):
        chosen = {id(p) for p in trainable}
        for p in self.adapters + self.base:
            p.requires_grad_(id(p) in chosen)

    def step(self, closure) -> float:
        # FO phase: gradients for the adapters only; the base weights stay frozen.
        self._train_only(self.adapters)
        self.model.train()
        self.fo.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.adapters, self.max_grad_norm)
        self.fo.step()
        self.fo.zero_grad(set_to_none=True)  # no gradient is held through the ZO phase
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the LoRA phase's loss is {value} at step {self.zo.steps_done}; lower lr_lora")
        # ZO phase: the same batch, the new adapters, the base weights perturbed in turn.
        self.model.eval()
        self._train_only(self.base)
        try:
            self.zo.step(closure)
        finally:
            self._train_only(self.adapters)
        return value

    @property
    def steps_done(self) -> int:
        return self.zo.steps_done

    @property
    def trajectory(self) -> Trajectory:
        """The ZO phase's trajectory: it rebuilds the base weights from the initial ones."""
        return self.zo.trajectory

    @property
    def last_step(self):
        return self.zo.last_step

    @property
    def param_groups(self) -> list[dict]:
        return self.fo.param_groups + self.zo.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fo.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"fo": self.fo.state_dict(), "zo": self.zo.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
