"""HZO (methods.md §3): zeroth order with low-rank directions on the shallow blocks,
first order (AdamW) on the deepest blocks, the final norm and the head.

The model's blocks are found per family (:mod:`zotune.engine.blocks`). The shallow
part (embeddings and every block but the last ``deep_blocks``) is trained by
:class:`zotune.MeZO` with :class:`zotune.LowRank` directions (U Vᵀ, V resampled every
``interval`` steps); the deep part by AdamW (:func:`zotune.core.mixed_precision.adamw`:
float32 masters of half-precision weights). The first-order forward runs the shallow part
without autograd and switches it on at the first deep block, so the backward, and the
activations it keeps, cover the deep part alone. A head tied to the input embedding
belongs to the first-order part and gets the head's gradient only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.core.directions import LowRank
from zotune.core.mixed_precision import adamw
from zotune.core.optim import MeZO, decay_groups, replay
from zotune.core.trajectory import Trajectory
from zotune.engine.distributed import average_gradients
from zotune.engine.blocks import find_blocks
from zotune.errors import UserError
from zotune.methods.adapters import PeftOptions, add_adapters, adapter_parameters, by_mode, save_result
from zotune.methods.footprint import Footprint, Row, stacked_copies
from zotune.methods.hybrid import Hybrid
from zotune.methods.mezo import (ESTIMATORS, OffloadOptions, ZOConfig, merge_factors, offload_blocks, projected_grad,
                                 zo_options)
from zotune.methods.registry import Method, check_non_negative, check_positive, option, settings_errors

FO_EVERY = ("step", "resample")
ORDERS = ("zo-first", "fo-first", "joint")
HEADS = ("auto", "fo", "zo")


def split_parameters(model, deep_blocks: int, blocks: str = "auto", head: str = "fo", only=None):
    """(shallow, deep) lists of (name, parameter), the shallow blocks (modules) and the module where autograd starts.

    ``only``: the names of the parameters that train (an adapter's); default all."""
    layout = find_blocks(model, blocks)
    n = len(layout.blocks)
    if not 0 <= deep_blocks <= n:
        raise UserError(f"--deep-blocks {deep_blocks}: the model has {n} blocks; choose 0 to {n}")
    if head == "auto":  # a head tied to the input embedding is shared with the zeroth-order part
        head = "zo" if layout.shared(model) and deep_blocks else "fo"
    if head == "zo" and deep_blocks == 0:
        raise UserError("--head zo with --deep-blocks 0 leaves nothing to first order: set --deep-blocks 1 or more")
    sections = layout.section_of(model)
    deep_sections = {f"block:{i}" for i in range(n - deep_blocks, n)} | ({"head"} if head == "fo" else set())
    shallow, deep = [], []
    for name, param in model.named_parameters():
        if only is None or name in only:
            (deep if sections[name] in deep_sections else shallow).append((name, param))
    boundary = layout.blocks[n - deep_blocks][1] if deep_blocks else layout.head[0][1]
    return shallow, deep, [module for _, module in layout.blocks[: n - deep_blocks]], boundary


@contextmanager
def autograd_from(model: torch.nn.Module, module: torch.nn.Module):
    """Every forward of ``model`` in the context runs without autograd until ``module``
    starts, and with autograd from there on (through the loss computed after the model)."""
    def disable(*_):
        torch.set_grad_enabled(False)

    def enable(*_):
        torch.set_grad_enabled(True)

    handles = [model.register_forward_pre_hook(disable), module.register_forward_pre_hook(enable)]
    try:
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


class HZO(Hybrid):
    """The two optimizers of HZO behind one ``step(closure)`` / ``state_dict`` surface.

    Args:
        model: a Hugging Face model (or any model with ``blocks`` given).
        deep_blocks: k, the number of last blocks trained by first order (with the final
            norm and the head); 0 trains the head alone by first order.
        lr_fo: AdamW learning rate of the deep part (``fo`` is an AdamW, with float32 masters for
            half-precision weights: attach any scheduler).
        lr_zo: zeroth-order learning rate of the shallow part.
        eps, n_samples, estimator, stochastic_rounding: as in :class:`zotune.MeZO`.
        rank, interval, orthonormal: the shallow part's :class:`zotune.LowRank` directions.
        fo_every: ``"step"``, or ``"resample"``: only on the steps where V is resampled (the paper).
        order: ``"zo-first"`` or ``"fo-first"`` within a step that has both; or ``"joint"``:
            both phases at the same weights, the first-order forward (in eval mode) giving the
            unperturbed loss of a one-sided estimator, so that a step costs two forwards.
        head: ``"fo"``: the final norm and head train by first order (a head tied to the
            input embedding gets the head's gradient only); ``"zo"``: by the zeroth-order
            part (no AdamW state for a large vocabulary); ``"auto"``: ``"zo"`` for a head
            tied to the input embedding (with ``deep_blocks`` >= 1), else ``"fo"``.
        weight_decay: decay of the matrices of both parts (not biases or norms).
        max_grad_norm: clipping of the deep part's gradient (None: no clipping).
        blocks: ``"auto"`` or the dotted path of the model's ``nn.ModuleList`` of blocks.
        direction: overrides the low-rank direction (a :class:`zotune.Direction` or a name).
        stacked, merge: as in :class:`zotune.MeZO` (``merge="resample"``: call ``zo.merge_factors()``
            before saving the weights).
        only: the names of the parameters that train (a peft model's adapter); default all.

    ``shallow_blocks`` lists the zeroth-order blocks (modules), e.g. for
    :class:`zotune.engine.offload.Offload`, attached to the zeroth-order optimizer ``zo``.

    ``step(closure)``: the closure returns the minibatch loss; the zeroth-order phase
    calls it under ``no_grad`` in eval mode, the first-order phase once in train mode
    with autograd from the first deep block on. Returns the zeroth-order estimator's loss.
    """

    def __init__(self, model, deep_blocks: int = 1, lr_fo: float = 1e-4, lr_zo: float = 1e-6, eps: float = 1e-3,
                 rank: int = 2, interval: int = 50, orthonormal: bool = False, fo_every: str = "step",
                 order: str = "zo-first", weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 n_samples: int = 1, estimator: str = "spsa", seed: int = 0, stochastic_rounding: bool = True,
                 blocks: str = "auto", direction=None, stacked: bool = False, head: str = "auto",
                 merge: str = "step", only=None):
        if fo_every not in FO_EVERY:
            raise ValueError(f"fo_every must be one of {FO_EVERY}, got {fo_every!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if order == "joint" and estimator not in ("one-sided", "fzoo"):
            raise ValueError("order 'joint' (--order joint) shares the unperturbed forward: use the one-sided or "
                             "fzoo estimator (--estimator one-sided), or another order")
        self.model, self.fo_every, self.order, self.max_grad_norm = model, fo_every, order, max_grad_norm
        self.interval = interval
        shallow, deep, self.shallow_blocks, self.boundary = split_parameters(model, deep_blocks, blocks, head, only)
        if not shallow:
            raise UserError("HZO needs at least one zeroth-order parameter: lower --deep-blocks")
        self.shallow = [p for _, p in shallow]
        self.deep = [p for _, p in deep]
        for param in self.shallow + self.deep:
            param.requires_grad_(True)
        direction = direction or LowRank(rank=rank, interval=interval, orthonormal=orthonormal)
        self.zo = MeZO(decay_groups(shallow, weight_decay), lr=lr_zo, eps=eps, n_samples=n_samples,
                       estimator=estimator, direction=direction, seed=seed,
                       stochastic_rounding=stochastic_rounding, stacked=stacked, merge=merge)
        self.fo = adamw(decay_groups(deep, weight_decay), lr=lr_fo) if deep else None
        self.fo_steps = 0
        self.last_fo_loss: float | None = None

    def fo_due(self) -> bool:
        """Whether the step about to run has a first-order phase."""
        return self.fo is not None and (self.fo_every == "step" or self.zo.steps_done % self.interval == 0)

    def step(self, closure) -> float:
        fo_now = self.fo_due()
        if fo_now and self.order == "joint":
            return self._joint(closure)
        # fo-first: the first-order loss is read with the zeroth-order losses (one wait for the device); zo-first
        # computes it after that read, at the updated weights, so reads it apart.
        riders = (self._first_order(closure),) if fo_now and self.order == "fo-first" else ()
        self.model.eval()  # dropout would make the perturbed losses differ
        loss = self.zo.step(closure, riders=riders)
        if riders:
            self._note_fo_loss(self.zo.rider_values[0])
        if fo_now and self.order == "zo-first":
            self._note_fo_loss(float(self._first_order(closure)))
        return loss

    def _joint(self, closure) -> float:
        """Both phases at the same weights: the unperturbed forward gives the first-order
        gradients and the one-sided estimator's reference loss."""
        if not self.zo.stacked:
            unperturbed = self._gradients(closure, train=False)
            loss = self.zo.step(closure, unperturbed_loss=unperturbed)
            self._apply_gradients(unperturbed)
            self._note_fo_loss(loss)  # the one-sided estimator's loss is the unperturbed one
            return loss
        # Stacked: one forward over [unperturbed, perturbed...] copies, autograd from the first
        # deep block on; the backward starts from the unperturbed copy's loss alone.
        returned = []

        def keep(copies=None):
            returned.append(closure(copies))
            return returned[-1]

        self.model.eval()
        with autograd_from(self.model, self.boundary):
            loss = self.zo.estimate(keep)
        unperturbed = returned[-1][0]
        self._backward(unperturbed)
        self.zo.step()
        self._apply_gradients(unperturbed.detach())
        self._note_fo_loss(loss)
        return loss

    def _first_order(self, closure) -> torch.Tensor:
        """One first-order phase; its loss, on the device."""
        return self._apply_gradients(self._gradients(closure))

    def _gradients(self, closure, train: bool = True) -> torch.Tensor:
        """The loss, with the deep part's gradients; the shallow part runs without autograd."""
        self.model.train(train)
        try:
            with autograd_from(self.model, self.boundary):
                loss = closure()
            self._backward(loss)
        finally:
            self.model.eval()
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        # Gradients of the deep part alone: a zeroth-order head on the way passes them on, keeps none.
        if not loss.requires_grad:
            raise RuntimeError("the first-order loss does not depend on the deep blocks: check --blocks")
        for param, grad in zip(self.deep, torch.autograd.grad(loss, self.deep, allow_unused=True)):
            param.grad = grad

    def _apply_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        loss = average_gradients(self.parallel, self.deep, loss)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.deep, self.max_grad_norm)
        self.fo.step()
        self.fo.zero_grad(set_to_none=True)  # nothing held through the next zeroth-order phase
        self.fo_steps += 1
        return loss

    def _note_fo_loss(self, value: float) -> None:
        self.last_fo_loss = value
        if not math.isfinite(value):
            raise FloatingPointError(f"the first-order loss is {value} at step {self.zo.steps_done}; lower lr")

    def state_dict(self) -> dict:
        return {"fo": self.fo.state_dict() if self.fo else None, "zo": self.zo.state_dict(),
                "fo_steps": self.fo_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.fo is not None:
            self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
        self.fo_steps = state_dict["fo_steps"]


@dataclass
class HZOConfig(ZOConfig, OffloadOptions, PeftOptions):
    lr_fo: float = option(1e-4, "first-order (AdamW) learning rate of the deep blocks and head (decayed linearly to "
                          "0)", aliases=("lr",))
    # None: the --peft mode's default (MeZO §1), set by __post_init__, so config.yaml holds the number used.
    lr_zo: float | None = option(None, f"zeroth-order learning rate of the shallow blocks (constant; "
                                 f"{by_mode('lr_zo', ('none', 'lora'))})")
    eps: float | None = option(None, f"perturbation scale ({by_mode('eps', ('none', 'lora'))})")
    direction: str = option("lowrank", "direction of the shallow part's perturbations: lowrank (U Vᵀ per matrix), "
                            "or dense gaussian or rademacher", choices=("lowrank", "gaussian", "rademacher"))
    deep_blocks: int = option(1, "k: the last k transformer blocks (with the final norm and head) train by first "
                              "order")
    fo_every: str = option("step", "when the first-order phase runs: every step, or on the steps V is resampled "
                           "(resample, as in the paper)", choices=FO_EVERY)
    order: str = option("joint", "within a step: zeroth-order phase first, first-order first, or joint (both at "
                        "the same weights, sharing the unperturbed forward; needs --estimator one-sided or fzoo)",
                        choices=ORDERS)
    estimator: str = option("one-sided", "gradient estimator: spsa (two-sided), one-sided or fzoo",
                            choices=ESTIMATORS)
    stacked: bool = option(True, "evaluate a step's points in one forward over the batch repeated (joint order: "
                           "the unperturbed and the perturbed copy)")
    merge: str = option("resample", "lowrank: write every update into the weights (step), or keep a matrix's "
                        "updates as an m×r factor applied on its layer's output until V is redrawn (resample: no "
                        "weight writes, so no offload write-back, in between)", choices=("step", "resample"))
    head: str = option("auto", "the final norm and head train by first order (fo) or zeroth order (zo: no AdamW "
                       "state for a large vocabulary); auto: zo when the head is tied to the input embedding",
                       choices=HEADS)
    max_grad_norm: float = option(1.0, "clipping of the first-order part's gradient norm")

    def __post_init__(self):
        self.resolve("lr_zo", "eps")
        super().__post_init__()
        check_non_negative(self, "lr_zo", "deep_blocks")
        check_positive(self, "max_grad_norm")
        if self.peft == "prefix":
            raise UserError("--peft prefix: hzo splits the model into shallow and deep blocks, but the prefix is one "
                            "tensor over all layers; use --method mezo --peft prefix, or hzo --peft lora")


class HZOMethod(Method):
    """Low-rank zeroth order on the shallow blocks, AdamW on the deepest.

    With --peft lora, both parts train their blocks' LoRA adapters alone (the base and the
    head stay frozen). The run exports ``model/`` (with --peft lora: the peft ``adapter/``),
    the zeroth-order part's ``trajectory.json`` and the first-order part's final weights
    (``first_order.safetensors``): ``zotune replay`` rebuilds the shallow part from the
    trajectory (an adapter from its seeded initial value) and restores the deep part from that file.
    """

    bench_variants = {"hzo-offload": {"offload": "cpu"}, "hzo-k3": {"deep_blocks": 3}}
    replays = "model (shallow part from the trajectory, deep part from first_order.safetensors; with --peft: " \
              "the adapter)"

    @property
    def scheduled_groups(self) -> list[dict]:
        return self.zo.param_groups  # the first-order rate decays by the method's own schedule

    @property
    def unaveraged_optimizers(self) -> list:
        return [self.optimizer.fo] if self.optimizer.fo is not None else []  # deep gradients: torch.autograd.grad

    def __init__(self, model, config: HZOConfig, seed: int = 0, steps: int = 1):
        super().__init__(add_adapters(model, config, seed), config, seed, steps)
        options = zo_options(config)
        with settings_errors():
            self.optimizer = HZO(self.model, deep_blocks=config.deep_blocks, lr_fo=config.lr_fo, lr_zo=config.lr_zo,
                                 interval=config.resample_every, fo_every=config.fo_every, order=config.order,
                                 weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=seed,
                                 blocks=config.blocks, head=config.head, only=_adapter_names(self.model, config),
                                 **options)
        self.zo = self.optimizer.zo
        self.engine = offload_blocks(self.model, self.zo, config, self.optimizer.shallow_blocks)

    def step(self, loss_fn) -> dict:
        hzo = self.optimizer
        if hzo.fo is not None:  # a function of the step count: resume-safe
            for group in hzo.fo.param_groups:
                group["lr"] = self.config.lr_fo * (1 - hzo.steps_done / self.steps)
        lr = hzo.fo.param_groups[0]["lr"] if hzo.fo is not None else 0.0
        loss = hzo.step(loss_fn)
        record = {"projected_grad": projected_grad(hzo.zo), "loss": loss, "lr": lr}
        if hzo.last_fo_loss is not None:
            record["fo_loss"] = hzo.last_fo_loss
        return record

    def checkpoint_tensors(self) -> dict:
        trained = {id(p) for p in self.optimizer.shallow + self.optimizer.deep}  # the frozen base: not with --peft
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters()
                if self.config.peft == "none" or id(p) in trained}

    def export(self, folder, model, tokenizer) -> None:
        merge_factors(self.engine, self.zo)
        self.optimizer.trajectory.save(folder / "trajectory.json")
        deep = {id(p) for p in self.optimizer.deep}
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if id(p) in deep},
                  folder / "first_order.safetensors")
        save_result(folder, model, tokenizer, self.config)

    @classmethod
    def replay(cls, model, config: HZOConfig, trajectory):
        model = add_adapters(model, config, Trajectory.load(trajectory).seed)  # the run's initial adapter
        shallow = split_parameters(model, config.deep_blocks, config.blocks, config.head,
                                   _adapter_names(model, config))[0]
        for _, param in shallow:
            param.requires_grad_(True)
        replay(decay_groups(shallow, config.weight_decay), trajectory)
        deep = Path(trajectory).parent / "first_order.safetensors"
        if not deep.is_file():
            raise UserError(f"{deep} is missing: the first-order part cannot be rebuilt from seeds")
        saved = load_file(deep)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        return model

    @classmethod
    def float_modules(cls, model, config: HZOConfig) -> tuple[str, ...]:
        # QLoRA's pattern with --peft scales: the first-order part trains full-precision weights.
        return _deep_modules(model, config) if config.peft == "scales" else ()

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        # The defaults (joint order, one-sided, stacked) run the copies in one forward, autograd from the first deep
        # block on: the deep blocks' AdamW state and every copy's deep activations, logits and logit gradients
        # (low-rank directions: no weight-sized copy).
        f = footprint
        kept = f.deep * f.shape.block * f.adam + stacked_copies(HZOConfig) * (f.deep * f.stored + 2 * f.logits)
        return {"hzo": Row(f.weights + kept), "hzo-offload": Row(f.resident(f.deep) + kept, f.host(f.deep))}


def _deep_modules(model, config: HZOConfig) -> tuple[str, ...]:
    """The modules of the first-order part: the deep blocks, with the final norm and head unless --head zo."""
    layout = find_blocks(model, config.blocks)
    deep = min(config.deep_blocks, len(layout.blocks))
    head = config.head
    if head == "auto":
        head = "zo" if layout.shared(model) and deep else "fo"
    names = [name for name, _ in layout.blocks[len(layout.blocks) - deep:]]
    return tuple(names + ([name for name, _ in layout.head] if head == "fo" else []))


def _adapter_names(model, config: HZOConfig) -> set[str] | None:
    """With --peft, the names of the adapter's parameters (what HZO trains); None: every parameter. With --peft
    scales: the quantized shallow part's scales and the float deep part's weights."""
    if config.peft == "none":
        return None
    names = {name for name, _ in adapter_parameters(model)}
    if config.peft == "scales":
        deep = tuple(prefix + "." for prefix in _deep_modules(model, config))
        names |= {name for name, _ in model.named_parameters() if name.startswith(deep)}
    return names
