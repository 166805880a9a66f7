"""LMAO (Zhang et al., ICLR 2026): three forwards, one backward.

Each step, on one minibatch: a first-order AdamW step on the LoRA adapters (train
mode, gradient clipping), then a two-point zeroth-order (MeZO) step on every other
parameter (eval mode, no autograd), with the updated adapters. Full-rank updates of
the base weights at LoRA's memory: the ZO phase holds no gradients and perturbs
without copies of the weights, so it adds nothing to the FO phase's peak.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from zotune.core.optim import MeZO, decay_groups, replay
from zotune.core.quant import quantized_weights
from zotune.core.mixed_precision import adamw
from zotune.engine.distributed import average_gradients
from zotune.methods.adapters import LoRAConfig, is_adapter, save_scales
from zotune.methods.footprint import Footprint, Row
from zotune.methods.hybrid import Hybrid
from zotune.methods.mezo import ZOConfig, projected_grad, zo_options
from zotune.methods.registry import Method, check_positive, option, save_model, settings_errors


RENAMED = {"lr_lora": "lr_fo", "lr_base": "lr_zo"}


class LMAO(Hybrid):
    """The two optimizers of LMAO behind one ``step(closure)`` / ``state_dict`` surface.

    Args:
        model: a peft model with LoRA adapters (``peft.get_peft_model``).
        lr_fo: AdamW learning rate of the adapters (η_BA); ``fo`` is an AdamW (float32
            masters if the adapters are half precision; peft makes them float32 by default),
            so attach any scheduler to it (the paper decays it linearly).
        lr_zo: ZO learning rate of the base weights (η_W, constant in the paper).
        eps: ZO perturbation scale.
        weight_decay: ZO weight decay λ on base matrices (biases and norms get none).
        lora_weight_decay: AdamW weight decay of the adapters.
        max_grad_norm: clipping of the adapters' gradient (None: no clipping).
        n_samples, seed, direction, estimator, stochastic_rounding, stacked, merge: as in :class:`zotune.MeZO`.

    ``step(closure)``: the closure returns the minibatch loss; it is called once with
    autograd on and the model in train mode (the FO phase), then by the ZO phase under
    ``no_grad`` in eval mode (``2 * n_samples`` times with the two-sided estimator).
    Returns the FO phase's loss.
    """

    def __init__(self, model, lr_fo: float = 1e-5, lr_zo: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, lora_weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 n_samples: int = 1, seed: int = 0, direction="gaussian", estimator: str = "spsa",
                 stochastic_rounding: bool = True, stacked: bool = False, merge: str = "step", **renamed: float):
        for old, value in renamed.items():  # the previous release's keywords keep working, with a pointer
            if old not in RENAMED:
                raise TypeError(f"LMAO() got an unexpected keyword argument {old!r}")
            warnings.warn(f"LMAO's {old} is now {RENAMED[old]}", FutureWarning, stacklevel=2)
        lr_fo, lr_zo = renamed.get("lr_lora", lr_fo), renamed.get("lr_base", lr_zo)
        self.model = model
        named = list(model.named_parameters())
        adapters = [(n, p) for n, p in named if is_adapter(n)]
        base = zeroth_order_part(named)
        if not adapters:
            raise ValueError("LMAO needs a peft model with LoRA adapters (no parameter named lora_*)")
        self.adapters = [p for _, p in adapters]
        self.base = [p for _, p in base]
        self.max_grad_norm = max_grad_norm
        self.fo = adamw(
            [{"params": self.adapters, "param_names": [n for n, _ in adapters]}],
            lr=lr_fo, weight_decay=lora_weight_decay,
        )
        for p in self.base:  # decay_groups keeps trainable parameters; ZO phases switch them on in turn
            p.requires_grad_(True)
        self.zo = MeZO(decay_groups(base, weight_decay), lr=lr_zo, eps=eps, n_samples=n_samples,
                       seed=seed, direction=direction, estimator=estimator,
                       stochastic_rounding=stochastic_rounding, stacked=stacked, merge=merge)
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
        fo_loss = average_gradients(self.parallel, self.adapters, loss)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.adapters, self.max_grad_norm)
        self.fo.step()
        self.fo.zero_grad(set_to_none=True)  # no gradient is held through the ZO phase
        # ZO phase: the same batch, the new adapters, the base weights perturbed in turn. The LoRA loss is read
        # with the ZO losses: one wait for the device per step.
        self.model.eval()
        self._train_only(self.base)
        try:
            self.zo.step(closure, riders=(fo_loss,))
        finally:
            self._train_only(self.adapters)
        value = self.zo.rider_values[0]
        if not math.isfinite(value):
            raise FloatingPointError(f"the LoRA phase's loss is {value} at step {self.zo.steps_done}; lower lr_fo")
        return value

    def state_dict(self) -> dict:
        return {"fo": self.fo.state_dict(), "zo": self.zo.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])


def zeroth_order_part(named_parameters) -> list:
    """The base weights, which LMAO's zeroth-order phase trains; on a quantized base, their scales."""
    base = [(n, p) for n, p in named_parameters if not is_adapter(n)]
    if any(n.endswith(".scales") for n, _ in base):
        base = [(n, p) for n, p in base if n.endswith(".scales")]
    return base


@dataclass
class LMAOConfig(ZOConfig, LoRAConfig):
    lr_fo: float = option(1e-4, "first-order (AdamW) learning rate of the adapters (decayed linearly to 0)",
                          aliases=("lr",))
    lr_zo: float = option(1e-6, "zeroth-order learning rate of the base weights (constant; on a --quantize base, "
                          "of its scales: try 1e-6 with --eps 1e-5)", aliases=("lr_base",))
    max_grad_norm: float = option(1.0, "clipping of the adapters' gradient norm")

    def __post_init__(self):
        super().__post_init__()  # ZOConfig's and LoRAConfig's checks, in MRO order
        check_positive(self, "max_grad_norm")


class LMAOMethod(Method):
    """LoRA AdamW + zeroth order on the base weights.

    Three forwards and one backward per step (:class:`LMAO`). The run exports the
    merged model (model/), the adapter (adapter/) and the base weights' trajectory
    (trajectory.json), which ``zotune replay`` turns back into the base weights alone.
    """

    replays = "base weights (no adapters)"

    @property
    def scheduled_groups(self) -> list[dict]:
        return self.zo.param_groups  # the adapters' rate decays by the method's own schedule

    def __init__(self, model, config: LMAOConfig, seed: int = 0, steps: int = 1):
        super().__init__(config.wrap(model, seed), config, seed, steps)
        with settings_errors():
            self.optimizer = LMAO(self.model, lr_fo=config.lr_fo, lr_zo=config.lr_zo,
                                  weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=seed,
                                  **zo_options(config))
        self.zo = self.optimizer.zo

    def step(self, loss_fn) -> dict:
        # The paper decays the adapters' rate linearly; a function of the optimizer's own step count, so resume-safe.
        for group in self.optimizer.fo.param_groups:
            group["lr"] = self.config.lr_fo * (1 - self.optimizer.steps_done / self.steps)
        loss = self.optimizer.step(loss_fn)
        return {"projected_grad": projected_grad(self.optimizer), "loss": loss,
                "lr": self.optimizer.fo.param_groups[0]["lr"]}

    def checkpoint_tensors(self) -> dict:
        # Both phases change weights, and between steps only the adapters require grad.
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters()}

    def export(self, folder, model, tokenizer) -> None:
        self.zo.merge_factors()
        model.save_pretrained(folder / "adapter")
        self.optimizer.trajectory.save(folder / "trajectory.json")
        if quantized_weights(model):
            save_scales(folder / "scales", model.get_base_model())  # no merge into 4- or 8-bit codes
        else:
            save_model(folder / "model", model.merge_and_unload(), tokenizer)

    @classmethod
    def replay(cls, model, config: LMAOConfig, trajectory):
        wrapped = config.wrap(model, seed=0)  # the adapters are thrown away below
        # The trajectory's keys are the parameter names inside the peft model, as LMAO recorded them.
        base = [(name, p.requires_grad_(True)) for name, p in zeroth_order_part(wrapped.named_parameters())]
        replay(decay_groups(base, config.weight_decay), trajectory)
        return wrapped.unload()

    @classmethod
    def as_exported(cls, replayed, folder):
        from peft import PeftModel

        merged = PeftModel.from_pretrained(replayed, folder / "adapter").merge_and_unload()
        return merged, " with the adapter merged"

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        # The phases run one after the other: the peak is the larger of LoRA's backward and the perturbed forward.
        f = footprint
        return {"lmao": Row(max(f.lora_backprop, f.perturbed_inference + f.adapters))}
