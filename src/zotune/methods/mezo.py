"""MeZO (Malladi et al. 2023): zeroth-order SGD on every weight, from forward passes only.

:class:`ZOConfig` holds the zeroth-order options that every ZO method shares (LMAO's ZO
phase reads the same fields), and :func:`zo_options` turns them into the keyword
arguments of :class:`zotune.MeZO`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zotune.core.directions import LowRank, Sparse
from zotune.core.estimate import get as estimator_of
from zotune.core.optim import MeZO, decay_groups, replay
from zotune.core.trajectory import Trajectory
from zotune.engine import sharding
from zotune.engine.blocks import find_blocks
from zotune.errors import UserError
from zotune.engine.offload import Offload
from zotune.methods.adapters import PeftOptions, add_adapters, by_mode, save_result
from zotune.methods.footprint import Footprint, Row, stacked_copies
from zotune.methods.registry import (Method, MethodConfig, check_non_negative, check_positive, option,
                                     settings_errors)

DIRECTIONS = ("gaussian", "rademacher", "lowrank", "sparse")
ESTIMATORS = ("spsa", "one-sided", "fzoo")


@dataclass
class ZOConfig(MethodConfig):
    eps: float = option(1e-3, "perturbation scale")
    n_samples: int = option(1, "perturbations per step (n-SPSA)")
    # ``distribution``: the name in run folders written before low-rank directions existed.
    direction: str = option("gaussian", "direction of the perturbations: dense gaussian or rademacher, lowrank "
                            "(U Vᵀ per matrix), or sparse (gaussian on each tensor's smallest-magnitude weights, "
                            "--sparse-fraction of them; Sparse-MeZO)", choices=DIRECTIONS, aliases=("distribution",))
    rank: int = option(2, "rank of lowrank directions")
    sparse_fraction: float = option(0.25, "sparse: the fraction of each tensor's weights perturbed (those of the "
                                    "smallest magnitude, chosen from the weights at each step: no mask stored)")
    resample_every: int = option(50, "lowrank: steps between two draws of V")
    estimator: str = option("spsa", "gradient estimator: spsa (two-sided), one-sided or fzoo", choices=ESTIMATORS)
    stochastic_rounding: bool = option(True, "round bf16/fp16 weight updates stochastically (unbiased) rather than "
                                       "to nearest")
    stacked: bool = option(False, "evaluate a step's perturbed points in one forward over the batch repeated "
                           "(activation memory grows with the copies; always on with --offload)")
    merge: str = option("step", "lowrank: write every update into the weights (step), or keep a matrix's updates "
                        "as an m×r factor applied on its layer's output until V is redrawn (resample: no weight "
                        "writes, so no offload write-back, in between)", choices=("step", "resample"))

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "eps", "n_samples", "rank", "resample_every", "sparse_fraction")
        if self.sparse_fraction > 1:
            raise UserError(f"--sparse-fraction is a fraction of each tensor's weights: at most 1, got "
                            f"{self.sparse_fraction}")


def zo_options(config: ZOConfig) -> dict:
    """The keyword arguments of :class:`zotune.MeZO` that come from a ZO config."""
    direction = config.direction
    if direction == "lowrank":
        direction = LowRank(rank=config.rank, interval=config.resample_every)
    elif direction == "sparse":
        direction = Sparse(fraction=config.sparse_fraction)
    stacked = config.stacked or config.streams_blocks
    return dict(eps=config.eps, n_samples=config.n_samples, direction=direction, estimator=config.estimator,
                stochastic_rounding=config.stochastic_rounding, stacked=stacked, merge=config.merge)


def merge_factors(engine, optimizer) -> None:
    """Writes factored low-rank updates into the weights (before export): the offloaded ones on the device."""
    if engine is not None:
        engine.flush(merge=True)
    optimizer.merge_factors()


@dataclass
class OffloadOptions:
    """The options of the methods that can stream their zeroth-order blocks through the device."""

    offload: str = option("none", "cpu: keep the zeroth-order blocks in (pinned) CPU memory and stream them "
                          "through the device one by one", choices=("none", "cpu"))
    blocks: str = option("auto", "dotted path of the model's nn.ModuleList of transformer blocks (auto: known "
                         "families)")
    offload_embeddings: bool = option(False, "with --offload: stream the input embeddings too (default: they stay "
                                      "on the device)")
    offload_head: bool = option(False, "with --offload: stream the output head too, when it trains by zeroth order "
                                "(default: it stays on the device)")

    @property
    def streams_blocks(self) -> bool:
        return self.offload != "none"


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_blocks(model, optimizer, config, blocks=None) -> Offload | None:
    """The offload engine of ``blocks`` (default: all the model's blocks), and of the
    embeddings and head if the config says so, when the config asks for one; attached to
    ``optimizer``, whose updates it defers."""
    if config.offload == "none":
        return None
    layout = find_blocks(model, config.blocks)
    modules = [module for _, module in layout.blocks] if blocks is None else list(blocks)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for wanted, flag, part in ((config.offload_embeddings, "--offload-embeddings", layout.embeddings),
                               (config.offload_head, "--offload-head", layout.head)):
        if not wanted:
            continue
        if layout.shared(model):
            raise UserError(f"{flag}: the head is tied to the input embedding, which must stay on the device")
        if any(id(p) not in trained for _, module in part for p in module.parameters() if p.ndim >= 2):
            raise UserError(f"{flag}: these weights train by first order here, so they stay on the device")
        streamed = [module for _, module in part if any(p.ndim >= 2 for p in module.parameters())]
        modules = streamed + modules if part is layout.embeddings else modules + streamed
    engine = Offload(model, modules, compute_device())
    engine.attach(optimizer)
    return engine


def projected_grad(optimizer) -> float:
    """The mean projected gradient of the latest step (the metric MeZO runs log)."""
    grads = optimizer.last_step.grads
    return sum(grads) / len(grads)


@dataclass
class MeZOConfig(ZOConfig, OffloadOptions, PeftOptions):
    # None: the --peft mode's default (MeZO §1), set by __post_init__, so config.yaml holds the number used.
    lr_zo: float | None = option(None, f"zeroth-order learning rate ({by_mode('lr_zo')})", aliases=("lr",))
    eps: float | None = option(None, f"perturbation scale ({by_mode('eps')})")

    momentum: float = option(0.0, "heavy-ball momentum β: each update also adds β^k times the estimate of k steps "
                             "ago (k < --momentum-window), regenerated from its seed: no buffer, but the update "
                             "makes --momentum-window passes over the weights (dense and sparse directions)")
    momentum_window: int = option(8, "--momentum: how many steps' estimates one update combines")
    normalize_window: int = option(0, "divide each update by the RMS of the projected gradients of the last N steps "
                                   "(0: off): the step no longer follows the gradient's scale, so a jump in |g| does "
                                   "not run away and a plateau's small gradients still move; --lr-zo is then the "
                                   "step in units of the direction")
    n_samples_final: int = option(0, "grow the directions per step linearly from --n-samples at the first step to "
                                  "this at the last (0: --n-samples throughout): fewer forwards while the steps are "
                                  "large, a lower-variance estimate when they get small")
    head_cache: bool = option(True, "--peft head: read every training prompt once, before the first step, and keep "
                              "what the head reads (a hidden state and a few logits per prompt, in host memory): "
                              "the steps then run no forward at all; --no-head-cache: one forward a step")
    head_layer: float = option(0, "--peft head: the block whose output the head reads: 1 to the number of "
                               "blocks, -K for the K-th from the last (-1: the last block), or a fraction of the "
                               "depth between 0 and 1 (0.67: block 20 of 30); 0: the last layer's normalised output, "
                               "what the output layer reads")
    head_scale: str = option("prompts", "--peft head: where the head measures each feature's RMS, which its input is "
                             "divided by so that a random direction moves every feature alike: 'prompts', the first "
                             "512 training prompts, read before the first step; 'random', random tokens from a fixed "
                             "seed (no data; what runs before zotune config format 10 used)",
                             choices=("prompts", "random"))
    shard: bool = option(False, "with several processes (torchrun): each keeps 1/N of every weight (FSDP2); needs "
                         "--checkpoint trajectory and dense directions")

    @property
    def shards_weights(self) -> bool:
        return self.shard

    def __post_init__(self):
        self.resolve("lr_zo", "eps")
        super().__post_init__()
        if self.shard and (self.offload != "none" or self.peft != "none" or self.direction in ("lowrank", "sparse")):
            raise UserError("--shard works with full-parameter zeroth order and dense directions: leave out --offload, "
                            "--peft and --direction lowrank or sparse")
        if self.head_layer and self.peft != "head":
            raise UserError("--head-layer chooses what the candidate head reads: add --peft head")
        layer = self.head_layer
        if not math.isfinite(layer) or abs(layer) >= 1 and layer != int(layer) or -1 < layer < 0:
            raise UserError(f"--head-layer {self.head_layer:g}: give a block's number (1, 2, ... or -1, -2, ... from "
                            "the last) or a fraction of the depth between 0 and 1")
        if self.head_scale != "prompts" and self.peft != "head":
            raise UserError("--head-scale sets how the candidate head reads: add --peft head")
        if self.peft == "head" and self.stacked:
            raise UserError("--peft head: a step's points already share one forward of the batch; drop --stacked")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        check_positive(self, "momentum_window")
        if self.momentum and self.direction == "lowrank":
            raise UserError("--momentum adds earlier directions again, and a low-rank one depends on the V of its "
                            "interval: use --direction gaussian, rademacher or sparse")
        check_non_negative(self, "n_samples_final", "normalize_window")
        least = estimator_of(self.estimator).min_samples
        if 0 < self.n_samples_final < least:
            raise UserError(f"--n-samples-final: --estimator {self.estimator} needs at least {least} directions a step")

    def n_samples_at(self, step: int, steps: int) -> int:
        """The directions of 0-based ``step`` of a run of ``steps``."""
        if not self.n_samples_final:
            return self.n_samples
        return round(self.n_samples + (self.n_samples_final - self.n_samples) * step / max(steps - 1, 1))


class MeZOMethod(Method):
    """Zeroth order on all weights (--peft: on LoRA or prefix adapters): forward passes only, no gradients.

    Weight decay applies to matrices only (``zotune.decay_groups``); the run exports
    ``model/`` (with --peft: the peft ``adapter/``) and ``trajectory.json``, from which
    ``zotune replay`` rebuilds it (an adapter from its seeded initial value).
    """

    replays = "model (with --peft: the adapter)"
    gradient_free = True
    bench_variants = {"mezo-rademacher": {"direction": "rademacher"}, "mezo-lowrank": {"direction": "lowrank"},
                      "mezo-offload": {"offload": "cpu"}}

    def __init__(self, model, config: MeZOConfig, seed: int = 0, steps: int = 1):
        super().__init__(add_adapters(model, config, seed), config, seed, steps)
        self._build_optimizer()
        self.engine = offload_blocks(self.model, self.zo, config)
        self._sharded_export = None

    def _build_optimizer(self) -> None:
        with settings_errors():
            self.zo = MeZO(decay_groups(self.model.named_parameters(), self.config.weight_decay),
                           lr=self.config.lr_zo, seed=self.seed, momentum=self.config.momentum,
                           momentum_window=self.config.momentum_window,
                           normalize_window=self.config.normalize_window, **zo_options(self.config))
        self.optimizer = self.zo

    def distribute(self, parallel) -> None:
        if self.config.shard:
            if parallel is None:
                raise UserError("--shard needs several processes: start zotune with torchrun --nproc-per-node N")
            if parallel.mode == "perturbations" and (self.config.n_samples % parallel.world
                                                     or self.config.n_samples_final):
                raise UserError(f"--shard --parallel perturbations: every process must evaluate as many directions, "
                                f"so --n-samples must be a multiple of {parallel.world}, without --n-samples-final")
            blocks = [module for _, module in find_blocks(self.model, self.config.blocks).blocks]
            aliases = sharding.shard_model(self.model, blocks, parallel)
            self._build_optimizer()  # over the sharded parameters, before any step (distribute() sets parallel)
            self.zo.forward_aliases = aliases
        super().distribute(parallel)

    def checkpoint_tensors(self) -> dict:
        # Sharded, every trained weight is zeroth order: the trajectory checkpoint rebuilds them all.
        return {} if self.config.shard else super().checkpoint_tensors()

    def prepare_export(self) -> None:
        if self.config.shard:  # every rank takes part in gathering the whole weights
            self._sharded_export = sharding.full_tensors(self.model.named_parameters())

    def step(self, loss_fn) -> dict:
        self.model.eval()  # dropout would make the perturbed losses differ
        self.zo.n_samples = self.config.n_samples_at(self.zo.steps_done, self.steps)
        loss = self.zo.step(loss_fn)
        return {"projected_grad": projected_grad(self.zo), "loss": loss, "lr": self.zo.param_groups[0]["lr"]}

    def export(self, folder, model, tokenizer) -> None:
        merge_factors(self.engine, self.zo)
        self.zo.trajectory.save(folder / "trajectory.json")
        if self._sharded_export is not None:
            sharding.save_gathered(folder / "model", model, self._sharded_export, tokenizer)
        else:
            save_result(folder, model, tokenizer, self.config)

    @classmethod
    def replay(cls, model, config: MeZOConfig, trajectory):
        model = add_adapters(model, config, Trajectory.load(trajectory).seed)  # the run's initial adapter
        replay(decay_groups(model.named_parameters(), config.weight_decay), trajectory)
        return model

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        # Inference and the perturbed copy a forward reads. Offloaded, the evaluations always stack: the forward's
        # transient grows with each copy of the batch.
        f = footprint
        offloaded = f.resident() + f.transient(stacked_copies(MeZOConfig) * f.tokens) + f.perturbed_copy
        return {"mezo": Row(f.perturbed_inference), "mezo-offload": Row(offloaded, f.host())}
