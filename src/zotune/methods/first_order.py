"""First-order fine-tuning with AdamW: ``ft`` (all weights) and ``lora-ft`` (peft LoRA adapters)."""

from __future__ import annotations

from dataclasses import dataclass

from zotune.core.optim import decay_groups
from zotune.core.mixed_precision import adamw
from zotune.engine.distributed import average_gradients
from zotune.methods.adapters import LoRAConfig
from zotune.methods.footprint import Footprint, Row
from zotune.methods.registry import Method, MethodConfig, option


@dataclass
class FTConfig(MethodConfig):
    lr_fo: float = option(1e-5, "first-order (AdamW) learning rate", aliases=("lr",))


class FT(Method):
    """AdamW on all weights.

    Backpropagation: a gradient and two moments per weight (with float32 masters of
    half-precision weights: :func:`zotune.core.mixed_precision.adamw`). The model is in
    train mode during the step (dropout on), as in ordinary fine-tuning.
    """

    def __init__(self, model, config: FTConfig, seed: int = 0, steps: int = 1):
        super().__init__(model, config, seed, steps)
        self.optimizer = adamw(decay_groups(model.named_parameters(), config.weight_decay), lr=config.lr_fo)

    def step(self, loss_fn) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        value = average_gradients(self.parallel, self.model.parameters(), loss)
        self.optimizer.step()
        return {"loss": float(value), "lr": self.optimizer.param_groups[0]["lr"]}  # read after the update is queued

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        return {"ft": Row(footprint.weights + footprint.shape.params * footprint.adam + footprint.backward)}


@dataclass
class LoRAFTConfig(LoRAConfig):
    lr_fo: float = option(1e-4, "first-order (AdamW) learning rate", aliases=("lr",))


class LoRAFT(FT):
    """peft LoRA adapters, AdamW.

    The run exports the adapter (``adapter/``) alone.
    """

    bench_yardstick = True  # the usual way to fine-tune on little memory: what the others are compared with

    def __init__(self, model, config: LoRAFTConfig, seed: int = 0, steps: int = 1):
        super().__init__(config.wrap(model, seed), config, seed, steps)

    def export(self, folder, model, tokenizer) -> None:
        model.save_pretrained(folder / "adapter")

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        return {"lora-ft": Row(footprint.lora_backprop)}
