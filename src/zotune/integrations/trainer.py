"""Any zotune method inside ``transformers.Trainer``, through its public extension points.

:class:`ZOTrainer` is a ``Trainer`` whose ``training_step`` runs one step of a zotune
method (a registered name, ``zotune.methods.names()``, or a built :class:`Method`) on the
batch, with the loss from the Trainer's own ``compute_loss``. ``create_optimizer`` hands the
Trainer a :class:`MethodOptimizer`: its ``step()`` does nothing (the method has stepped), its
``param_groups`` are the method's (the Trainer's LR scheduler sets their ``lr``, which
:class:`zotune.MeZO` reads at every step) and its ``state_dict`` is the method's, which the
Trainer saves in each checkpoint and loads on ``resume_from_checkpoint``. No private
``Trainer`` method is called or overridden.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import send_to_device
from transformers import Trainer

from zotune import methods
from zotune.methods.adapters import is_adapter


class MethodOptimizer(torch.optim.Optimizer):
    """A zotune method as the Trainer's optimizer: ``step`` and ``zero_grad`` do nothing (the
    method stepped inside ``training_step``); ``state_dict`` is the method's state, plus the
    trained weights that the Trainer's checkpoint leaves out (LMAO's base weights under peft,
    where the Trainer saves the adapter alone)."""

    def __init__(self, method):
        self.method = method
        groups = method.scheduled_groups
        super().__init__([p for group in groups for p in group["params"]], {})
        self.param_groups = groups  # the method's own dicts: a scheduler's lr lands where the method reads it

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def _unsaved_weights(self) -> dict:
        if not hasattr(self.method.model, "peft_config"):
            return {}  # the Trainer saves every weight of a plain model
        return {n: t for n, t in self.method.checkpoint_tensors().items() if not is_adapter(n)}

    def state_dict(self) -> dict:
        self.method.flush()
        state = {"method": self.method.state_dict()}
        weights = self._unsaved_weights()
        if weights:
            state["weights"] = weights
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        weights = state_dict.get("weights", {})
        with torch.no_grad():
            for name, param in self.method.model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        # Low-rank factors (merge="resample") are rebuilt here from the recorded steps.
        self.method.load_state_dict(state_dict["method"])
        self.param_groups = self.method.scheduled_groups  # load_state_dict replaced the group dicts


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zotune method.

    Args:
        model: the model (omit it when ``method`` is a built :class:`zotune.methods.Method`).
        args: the ``TrainingArguments``. ``learning_rate``, ``weight_decay``, ``optim`` and
            ``max_grad_norm`` are the method's business (its config), not the Trainer's; the LR
            scheduler (``lr_scheduler_type``, warmup) scales the config's rate;
            ``gradient_accumulation_steps`` must be 1 and ``fp16`` off (use ``bf16`` or an fp16 model).
        method: a registered name (``zotune.methods.names()``) or a built Method.
        method_config: the method's Config, or a dict of its fields (defaults for the rest).
        seed: the method's seed (zeroth-order directions, LoRA init); default ``args.seed``.
        **kwargs: the other ``Trainer`` arguments (``train_dataset``, ``data_collator``, callbacks...).

    The step's per-method metrics (``projected_grad``...) join the Trainer's logs. ``save_model``
    called by you (not the checkpoints) merges pending low-rank factors into the weights first
    and writes ``trajectory.json`` next to them (zeroth-order methods: ``zotune.replay`` input;
    under peft the Trainer saves the adapter alone, so LMAO's base weights are that replay).
    With ``stacked`` zeroth-order evaluation the loss of each copy comes from
    :meth:`compute_copies_loss`, which needs a model with ``loss_function`` (causal or masked LM).
    """

    def __init__(self, model=None, args=None, *, method=methods.DEFAULT, method_config=None, seed: int | None = None,
                 **kwargs):
        if any(part is not None for part in kwargs.pop("optimizers", (None, None))):
            raise ValueError("ZOTrainer: the method is the optimizer; do not pass optimizers=")
        if kwargs.get("model_init") is not None:
            raise ValueError("ZOTrainer: the method is built on one model; pass model=, not model_init=")
        if args is not None:
            if args.gradient_accumulation_steps != 1:
                raise ValueError("ZOTrainer: a zotune method steps on every batch; use gradient_accumulation_steps=1 "
                                 "and a larger per_device_train_batch_size")
            if args.fp16:
                raise ValueError("ZOTrainer: fp16 mixed precision needs a GradScaler, which zeroth-order steps give no "
                                 "gradients to; use bf16=True, or load the model in float16")
            if args.n_gpu > 1:
                raise ValueError("ZOTrainer: one process sees several GPUs (DataParallel); launch one process per GPU "
                                 "(accelerate launch / torchrun)")
        if isinstance(method, str):
            seed = (args.seed if args is not None else 42) if seed is None else seed
            self._steps_from_trainer = True  # the methods' own schedules span the Trainer's max_steps
            method = methods.build(method, model, method_config, seed=seed)
        elif method_config is not None or seed is not None:
            raise ValueError("ZOTrainer: method_config and seed go with a method name, not a built method")
        else:
            self._steps_from_trainer = False
            if model is not None and not any(module is model for module in method.model.modules()):
                raise ValueError("ZOTrainer: model is not the model the method was built on")
        if method.engine is not None:
            raise ValueError("ZOTrainer: --offload streams blocks through the device, but the Trainer places the whole "
                             "model on it; use offload='none'")
        self.method = method
        self.last_record: dict = {}
        super().__init__(model=method.model, args=args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ZOTrainer: DeepSpeed and FSDP shard the weights, which zotune methods update whole")
        if self.accelerator.num_processes > 1:
            for optimizer in method.unaveraged_optimizers:
                optimizer.register_step_pre_hook(self._average_gradients)

    # -- the Trainer's optimizer ---------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = MethodOptimizer(self.method)
        return self.optimizer

    # -- one step ----------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._steps_from_trainer:
            self.method.steps = max(self.state.max_steps, 1)
        inputs = send_to_device(inputs, self.args.device)

        def loss_fn(copies=None):
            with self.compute_loss_context_manager():
                if copies is None:
                    loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                else:
                    loss = self.compute_copies_loss(model, inputs, copies)
            return self._agreed(loss)

        self.last_record = self.method.step(loss_fn)
        return torch.tensor(float(self.last_record["loss"]), device=self.args.device)

    def compute_copies_loss(self, model, inputs: dict, copies: int) -> torch.Tensor:
        """``copies`` losses from one forward over the batch repeated ``copies`` times along dim 0
        (copy-major): what stacked zeroth-order evaluation needs. Override it along with ``compute_loss``."""
        if type(self).compute_loss is not Trainer.compute_loss or self.compute_loss_func is not None \
                or self.label_smoother is not None:
            raise ValueError("stacked evaluation needs a loss per copy of the batch: override compute_copies_loss "
                             "too, or set stacked=False in the method's config")
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("stacked evaluation needs the batch's labels (inputs['labels'])")
        size = labels.shape[0]
        repeated = {k: v.repeat(copies, *[1] * (v.dim() - 1)) if torch.is_tensor(v) and v.dim() and v.shape[0] == size
                    else v for k, v in inputs.items() if k != "labels"}
        logits = model(**repeated)["logits"]
        core = self.accelerator.unwrap_model(model)
        return torch.stack([core.loss_function(logits=chunk, labels=labels, vocab_size=core.config.vocab_size)
                            for chunk in logits.chunk(copies)])

    def _agreed(self, loss: torch.Tensor) -> torch.Tensor:
        """With several processes, every process's loss value is the mean over all of them (so
        that all take the same zeroth-order step); gradients stay local (DDP averages them)."""
        if self.accelerator.num_processes == 1:
            return loss
        mean = self.accelerator.reduce(loss.detach(), reduction="mean")
        return mean + (loss - loss.detach()) if loss.requires_grad else mean

    def _average_gradients(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    # -- logs and saving ------------------------------------------------------------

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **{k: v for k, v in self.last_record.items() if k not in ("loss", "lr")}}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self.method.flush()
        if not _internal_call:
            if self.method.zo is not None:
                self.method.zo.merge_factors()  # the weights themselves, as from_pretrained reads them
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.method.zo is not None and self.args.should_save:
            self.method.zo.trajectory.save(Path(output_dir or self.args.output_dir) / "trajectory.json")


__all__ = ["MethodOptimizer", "ZOTrainer"]
