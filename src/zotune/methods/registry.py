"""The method registry: name -> (Config, Method).

The recipe (``zotune.recipe.train``), evaluation and replay, the CLI and the bench read this
table and never branch on a method's name, so a new method is one module (a Config
dataclass and a :class:`Method` subclass) plus one :func:`register` line in
``zotune/methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from zotune.errors import UserError, reason, unknown
from zotune.methods.footprint import Footprint, Row


def option(default, help: str, **extra):
    """A config field with its help text; ``choices`` and ``aliases`` (older names) are read by the CLI."""
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_choices(config) -> None:
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise UserError(f"{f.name} {value!r} is not one of {', '.join(choices)}")


def check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:  # written so that NaN fails too
            raise UserError(f"{flag(name)} must be positive, got {value}")


def check_non_negative(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value >= 0:
            raise UserError(f"{flag(name)} must be 0 or more, got {value}")


@contextmanager
def settings_errors():
    """An optimizer that rejects a value built from a config rejects the user's settings: one line, no traceback."""
    try:
        yield
    except ValueError as error:
        raise UserError(reason(error)) from None


# Every method spells its learning rates the same way: ``lr_zo`` for what trains by zeroth order,
# ``lr_fo`` for what trains by gradients (AdamW). A config declares the ones its method uses.
RATES = ("lr_zo", "lr_fo")


@dataclass
class MethodConfig:
    """Base of the method configs: every field carries help text and a default, and
    ``__post_init__`` validates (subclasses extend it and call ``super().__post_init__()``).
    A field's ``aliases`` are its older names: config files that use them still load, and the
    CLI points from them to the new name."""

    weight_decay: float = option(0.0, "weight decay (not applied to biases and norms)")

    def __post_init__(self):
        check_choices(self)
        check_non_negative(self, *self.rates(), "weight_decay")

    @classmethod
    def rates(cls) -> list[str]:
        """The learning rates this config declares, of :data:`RATES`."""
        declared = {f.name for f in dataclasses.fields(cls)}
        return [rate for rate in RATES if rate in declared]

    @property
    def streams_blocks(self) -> bool:
        """Whether the model stays in host memory and its blocks stream through the device
        (the recipe then loads it on the CPU; the method places what stays resident)."""
        return False

    @property
    def shards_weights(self) -> bool:
        """Whether each process keeps a shard of the weights (checkpoints then hold none; every
        rank scores every example)."""
        return False


class Method:
    """What the recipe drives: one object per run, built from the initial model and the method's config.

    A subclass wraps the model if it needs to (``self.model`` is what the recipe scores),
    builds its optimizer(s) and implements :meth:`step`. The defaults below fit a method
    with one ``self.optimizer`` that updates the trainable parameters of a full model.
    Inside a method (and its two-part optimizers, :class:`~zotune.methods.hybrid.Hybrid`),
    ``zo`` is the zeroth-order optimizer and ``fo`` the first-order one; their rates are
    the config's ``lr_zo`` and ``lr_fo``.
    The first line of the class docstring is the method's one-line help.

    Args:
        model: the loaded model, in eval mode. What a method adds to it (adapters, a
            prefix) draws from private generators seeded by ``seed``, never from the global RNG.
        config: an instance of the method's registered Config.
        seed: the run's seed (e.g. for the zeroth-order directions).
        steps: the run's total steps (e.g. for a learning-rate schedule).
    """

    #: what :meth:`replay` rebuilds, for messages; None when the method records no trajectory
    replays: str | None = None
    #: the :class:`zotune.engine.offload.Offload` engine streaming the model's blocks, if any
    engine = None
    #: the :class:`zotune.MeZO` whose recorded steps rebuild the weights it trains (what a
    #: trajectory checkpoint replays); None for methods that train by gradients alone
    zo = None
    #: True when :meth:`step` never differentiates the loss (non-differentiable objectives allowed)
    gradient_free = False
    #: what ``--objective auto`` means for this method
    default_objective = "loss"
    #: rows ``zotune bench`` offers besides the method's own: row name -> config overrides
    bench_variants: dict[str, dict] = {}
    #: True when ``zotune bench`` gives every row's time relative to this method's too
    bench_yardstick = False
    #: the :class:`zotune.engine.distributed.Parallel` of a multi-process run (see :meth:`distribute`)
    parallel = None
    #: what :meth:`step` steps, behind the ``torch.optim.Optimizer`` surface (``self.zo`` itself for MeZO)
    optimizer = None

    def __init__(self, model, config, seed: int = 0, steps: int = 1):
        self.model, self.config, self.seed, self.steps = model, config, seed, steps

    def distribute(self, parallel) -> None:
        """Joins a multi-process run (:mod:`zotune.engine.distributed`): the zeroth-order
        optimizer shares its losses, first-order parts average their gradients."""
        self.parallel = parallel
        for optimizer in (self.optimizer, self.zo):
            if optimizer is not None and hasattr(optimizer, "parallel"):
                optimizer.parallel = parallel

    def prepare_export(self) -> None:
        """Called on every rank before rank 0 calls :meth:`export` (a sharded model gathers its weights)."""

    def step(self, loss_fn) -> dict:
        """One training step. ``loss_fn()`` returns the minibatch loss tensor; the method
        chooses train/eval mode, autograd and backward. Returns at least ``{"loss": float}``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Makes the weights final in host memory (pending offloaded updates applied); the
        recipe calls it before a checkpoint and before export."""
        if self.engine is not None:
            self.engine.flush()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @property
    def scheduled_groups(self) -> list[dict]:
        """The param groups whose ``lr`` an outside scheduler (the HF Trainer's) may drive."""
        return self.optimizer.param_groups

    @property
    def unaveraged_optimizers(self) -> list:
        """First-order optimizers whose gradients DDP does not average (taken with
        ``torch.autograd.grad``, not ``backward``): a data-parallel caller averages them itself."""
        return []

    def checkpoint_tensors(self) -> dict:
        """The tensors a resumable checkpoint must hold: those the method changes."""
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def export(self, folder: Path, model, tokenizer) -> None:
        """Writes the final weights of ``model`` (this method's model) into the run folder."""
        save_model(folder / "model", model, tokenizer)

    @classmethod
    def replay(cls, model, config, trajectory: Path):
        """Applies a finished run's ``trajectory.json`` to the initial ``model``; returns the model to save."""
        raise NotImplementedError(f"{cls.__name__} records no trajectory")

    @classmethod
    def float_modules(cls, model, config) -> tuple[str, ...]:
        """Names of the modules that a --quantize base keeps in float for this method (its first-order part)."""
        return ()

    @classmethod
    def as_exported(cls, replayed, folder: Path):
        """The replayed weights as the run exported them in ``model/``, and a note for the message."""
        return replayed, ""

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        """The method's rows in ``zotune memory`` (its own and its variants'): row name -> peak device bytes (and
        host bytes of an offloaded row), as sums of the :class:`~zotune.methods.footprint.Footprint` terms, for the
        method's defaults."""
        return {}


def save_model(folder: Path, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class Entry(NamedTuple):
    config: type
    method: type

    @property
    def summary(self) -> str:
        lines = (self.method.__doc__ or "").strip().splitlines()
        return lines[0].rstrip(".") if lines else ""


METHODS: dict[str, Entry] = {}


def register(name: str, config: type, method: type) -> Entry:
    """Adds a method: ``config`` is a dataclass whose fields all have defaults and help text."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if not (dataclasses.is_dataclass(config) and issubclass(method, Method)):
        raise TypeError("register(name, Config, Method): a dataclass and a zotune.methods.Method subclass")
    for f in dataclasses.fields(config):
        if "help" not in f.metadata or f.default is dataclasses.MISSING:
            raise TypeError(f"{config.__name__}.{f.name} needs a default and metadata={{'help': ...}} (see option())")
    METHODS[name] = entry = Entry(config, method)
    return entry


def renames(config: type) -> dict[str, str]:
    """The older names of a Config's options (their ``aliases``): old name -> current name."""
    return {alias: f.name for f in dataclasses.fields(config) for alias in f.metadata.get("aliases", ())}


def make_config(name: str, values: dict | None = None):
    """Method ``name``'s Config from a dict of its fields (defaults for the rest); an older name of a
    field still works, with a FutureWarning that names the new one."""
    config, values = get(name).config, dict(values or {})
    for alias, current in renames(config).items():
        if alias in values:
            warnings.warn(f"{name}'s option {alias!r} is now {current!r}", FutureWarning, stacklevel=2)
    return config(**upgrade(values, name))


def upgrade(values: dict, method: str) -> dict:
    """``values`` with the method's older option names replaced by the current ones (the current name wins
    when both are given); older names of other methods' options are left, to be ignored."""
    values = dict(values)
    for alias, name in renames(get(method).config).items():
        if alias in values:
            values.setdefault(name, values.pop(alias))
    return values


def build(name: str, model, config=None, seed: int = 0, steps: int = 1) -> Method:
    """Method ``name`` on ``model``; ``config`` is its Config, a dict of its fields (see :func:`make_config`)
    or None for the defaults."""
    entry = get(name)
    if config is None or isinstance(config, dict):
        config = make_config(name, config)
    elif not isinstance(config, entry.config):
        raise TypeError(f"method {name!r} takes a {entry.config.__name__}, got {type(config).__name__}")
    return entry.method(model, config, seed=seed, steps=steps)


def get(name: str) -> Entry:
    if name not in METHODS:
        raise UserError(unknown("method", name, METHODS))
    return METHODS[name]


def names() -> list[str]:
    return list(METHODS)


def describe() -> str:
    """The --method help: each registered method and its one-line summary."""
    return "; ".join(f"{name}: {entry.summary}" if entry.summary else name for name, entry in METHODS.items())
