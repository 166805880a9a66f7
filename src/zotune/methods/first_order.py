"""First-order fine-tuning with AdamW: ``ft`` (all weights) and ``lora-ft`` (peft LoRA adapters).

:class:`LoRAConfig` holds the adapter options that every LoRA method shares (LMAO reads
the same fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from zotune.core.optim import decay_groups
from zotune.core.mixed_precision import adamw
from zotune.engine.distributed import average_gradients
from zotune.methods.registry import Method, MethodConfig, check_positive, option
from zotune.assets.models import add_lora


@dataclass
class FTConfig(MethodConfig):
    lr: float = option(1e-5, "learning rate")


class FT(Method):
    """AdamW on all weights.

    Backpropagation: a gradient and two moments per weight (with float32 masters of
    half-precision weights: :func:`zotune.core.mixed_precision.adamw`). The model is in
    train mode during the step (dropout on), as in ordinary fine-tuning.
    """

    def __init__(self, model, config: FTConfig, seed: int = 0, steps: int = 1):
        super().__init__(model, config, seed, steps)
        self.optimizer = adamw(decay_groups(model.named_parameters(), config.weight_decay), lr=config.lr)

    def step(self, loss_fn) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        value = average_gradients(self.parallel, self.model.parameters(), loss)
        self.optimizer.step()
        return {"loss": float(value), "lr": self.optimizer.param_groups[0]["lr"]}  # read after the update is queued


@dataclass
class LoRAConfig(MethodConfig):
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha (scale alpha/r)")
    lora_targets: str = option("q_proj,v_proj", "comma-separated names of the modules that get adapters")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "lora_r")

    @property
    def lora_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def wrap(self, model):
        """``model`` with this config's LoRA adapters (peft); draws their init from the global RNG."""
        return add_lora(model, self.lora_r, self.lora_alpha, self.lora_modules)


@dataclass
class LoRAFTConfig(LoRAConfig):
    lr: float = option(1e-4, "learning rate")


class LoRAFT(FT):
    """peft LoRA adapters, AdamW.

    The run exports the adapter (``adapter/``) alone.
    """

    def __init__(self, model, config: LoRAFTConfig, seed: int = 0, steps: int = 1):
        super().__init__(config.wrap(model), config, seed, steps)

    def export(self, folder, model, tokenizer) -> None:
        model.save_pretrained(folder / "adapter")
