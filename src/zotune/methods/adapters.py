"""Adapters: peft LoRA for every method that adds it (:class:`LoRAConfig`: lora-ft, lmao, and
the zeroth-order methods' ``--peft lora|prefix``, zeroth order on the adapter's parameters
alone, the base weights frozen: MeZO §1's LoRA and prefix variants).

* ``lora``: peft LoRA (r = 8, α = 16 on q_proj and v_proj by default). peft draws A from the
  global RNG; :meth:`LoRAConfig.wrap` redraws it (peft's Kaiming-uniform init) from private
  generators seeded by the run's seed and the parameter's name, so that ``zotune replay``
  and trajectory checkpoints rebuild the same initial adapter in any process.
* ``prefix``: peft prefix tuning (``prefix_projection=False``: the per-layer keys and values
  of ``prefix_tokens`` virtual tokens are the parameters, no reparameterisation). They are
  initialised from real activations: the base model reads ``prefix_tokens`` random
  vocabulary tokens (drawn from a private generator seeded by the run's seed) and their
  cached keys and values become the prefix, so that the initial adapted model is exactly
  the base model reading those tokens before every prompt. MeZO's authors found this
  initialisation crucial for stability with zeroth order.

Both are saved by peft's ``save_pretrained`` (``adapter/``), which ``zotune eval --run``
loads onto the base model.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from zotune.core.head import find_head
from zotune.core.rng import hash64
from zotune.errors import UserError, reason
from zotune.methods.registry import MethodConfig, check_positive, option, save_model
from zotune.assets.models import add_lora, quiet_peft

PEFT_MODES = ("none", "lora", "lowrank", "prefix", "scales", "head")
# MeZO §1 (OPT-13B): full lr {1e-6, 1e-7} eps 1e-3; LoRA lr {1e-4, 5e-5} eps 1e-2; prefix lr {1e-2, 1e-3} eps 1e-1.
# Scales (of a quantized base) are about 1e-3 (int8) to 1e-2 (int4): eps 1e-5 moves them by a fraction of a per
# cent. lr: the best of 1e-5 (diverged), 1e-6 and 1e-7 on rt-sst2 at 4,000 example-forwards (BENCHMARKS.md).
ZO_DEFAULTS = {"none": {"lr_zo": 1e-6, "eps": 1e-3}, "lora": {"lr_zo": 1e-4, "eps": 1e-2},
               "prefix": {"lr_zo": 1e-2, "eps": 1e-1}, "scales": {"lr_zo": 1e-6, "eps": 1e-5},
               "lowrank": {"lr_zo": 1e-4, "eps": 1e-3},  # perturbs each weight by about eps, as --peft none does
               "head": {"lr_zo": 3e-3, "eps": 1e-2}}


def by_mode(name: str, modes=PEFT_MODES) -> str:
    """Help text of an option whose default depends on ``--peft``."""
    return "default by --peft: " + ", ".join(f"{mode} {ZO_DEFAULTS[mode][name]:.0e}".replace("e-0", "e-")
                                             for mode in modes)


@dataclass
class LoRAConfig(MethodConfig):
    """The options of peft LoRA adapters, shared by name by every method that adds them."""

    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha (scale alpha/r)")
    lora_targets: str = option("q_proj,v_proj", "comma-separated names of the modules that get adapters")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "lora_r")

    @property
    def lora_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def wrap(self, model, seed: int):
        """``model`` with this config's LoRA adapters (peft), their random factors drawn from ``seed``."""
        wrapped = add_lora(model, self.lora_r, self.lora_alpha, self.lora_modules)
        _seed_lora(wrapped, seed)
        return wrapped


@dataclass
class PeftOptions(LoRAConfig):
    """The adapter options of the zeroth-order methods (LoRA's are lora-ft's, shared by name)."""

    peft: str = option("none", "what zeroth order trains: none (every weight), lora (peft LoRA adapters: --lora-r, "
                       "--lora-alpha, --lora-targets), lowrank (LoRA whose A is a frozen Gaussian V: perturbing B "
                       "perturbs each target matrix along U Vᵀ, LOZO's direction with V never redrawn, and the "
                       "updates stay a factored adapter, also on a quantized base), prefix (--prefix-tokens "
                       "key/value prefixes per layer, initialised from the activations of random vocabulary "
                       "tokens), scales (the per-group scales of a --quantize base, QZO), or head (a correction of "
                       "the output layer on the task's candidate words, a linear probe of the frozen model: every "
                       "point of a step reuses one forward of the batch, so --n-samples costs almost nothing); "
                       "with lora, lowrank or prefix the base weights stay frozen and the run exports adapter/, "
                       "with scales scales/, with head head/", choices=PEFT_MODES)
    prefix_tokens: int = option(5, "--peft prefix: virtual tokens per layer")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "prefix_tokens")
        if self.peft != "none" and self.streams_blocks:
            raise UserError(f"--peft {self.peft} trains a small adapter on a frozen model; --offload streams trained "
                            "blocks: drop --offload (or --peft)")

    def resolve(self, *names: str) -> None:
        """Sets each field named (``"lr_zo"``, ``"eps"``) left at None to the ``--peft`` mode's default
        (MeZO §1), so that the config, and config.yaml, hold the number used."""
        defaults = ZO_DEFAULTS.get(self.peft, ZO_DEFAULTS["none"])  # a bad mode: check_choices names it next
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])


def add_adapters(model, config: PeftOptions, seed: int):
    """``model`` wrapped by peft with the adapter ``config.peft`` asks for, initialised from ``seed`` alone;
    ``model`` itself when ``config.peft`` is none. Only the adapter's parameters require grad."""
    if config.peft == "none":
        return model
    if config.peft == "lora":
        return config.wrap(model, seed)
    if config.peft == "lowrank":
        return _fixed_directions(config.wrap(model, seed), seed)
    if config.peft == "scales":
        return train_scales(model)
    if config.peft == "head":
        return train_head(model)
    return _add_prefix(model, config.prefix_tokens, seed)


def train_scales(model):
    """``model`` (quantized) with its scales, and nothing else, trainable: QZO's setting."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".scales"))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("--peft scales found no quantized layer in the model: add --quantize int8 or int4")
    return model


def train_head(model):
    """``model`` with its candidate head (made by ``zotune.recipe.evaluation.load_base``), and nothing else,
    trainable."""
    head = find_head(model)
    if head is None:
        raise UserError("--peft head found no candidate head on the model: build the run's model with "
                        "zotune.recipe.evaluation.load_base, which adds it for the task's candidate words")
    mine = {id(p) for p in head.own_parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in mine)
    return model


def is_adapter(name: str) -> bool:
    """peft's adapter parameters (LoRA A/B, embeddings, magnitudes) all carry ``lora_`` in their names."""
    return "lora_" in name


def adapter_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# What peft draws at random for its default LoRA init; the other factors start at zero.
_LORA_DRAWS = {
    "lora_A.": lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
    "lora_embedding_B.": lambda t, g: torch.nn.init.normal_(t, generator=g),
}


@torch.no_grad()
def _seed_lora(model, seed: int) -> None:
    """Redraws peft's random factors from private generators, one per parameter name (on the CPU:
    the same values on any device)."""
    for name, param in model.named_parameters():
        draw = next((draw for part, draw in _LORA_DRAWS.items() if part in name), None)
        if draw is not None:
            generator = torch.Generator().manual_seed(hash64("zotune-lora-init", seed, name) >> 1)
            param.copy_(draw(torch.empty(param.shape, dtype=torch.float32), generator))


@torch.no_grad()
def _fixed_directions(model, seed: int):
    """LoRA adapters whose A (r × n) is a frozen Gaussian of variance 1/r drawn from ``seed``: a perturbation z of B
    moves W by z A, a rank-r direction whose entries have variance 1, like a dense one's."""
    for name, param in model.named_parameters():
        if "lora_A." in name:
            generator = torch.Generator().manual_seed(hash64("zotune-lowrank-v", seed, name) >> 1)
            values = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[0])
            param.copy_(values)
            param.requires_grad_(False)
    return model


class _CacheRename(logging.Filter):
    def filter(self, record):
        return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


@contextmanager
def quiet_cache_rename():
    """peft hands the prefix to the model as ``past_key_values``, which transformers 5 renamed
    ``cache`` and warns about (a log line and a FutureWarning): peft's business, not the user's."""
    logger, rename = logging.getLogger("transformers.utils.generic"), _CacheRename()
    logger.addFilter(rename)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(rename)


def quiet_prefix_forward(model):
    """``model`` (a peft model), whose forwards no longer warn about peft's prefix cache, if it has one."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return model
    forward = model.forward

    @functools.wraps(forward)
    def quiet(*args, **kwargs):
        with quiet_cache_rename():
            return forward(*args, **kwargs)

    model.forward = quiet
    return model


def _add_prefix(model, tokens: int, seed: int):
    from peft import PrefixTuningConfig, get_peft_model

    if type(model).__name__.endswith("ForMaskedLM") or not hasattr(model, "generate"):
        raise UserError(f"--peft prefix needs a causal LM (the prefix is a key/value cache); {type(model).__name__} "
                        "is not one: use --peft lora")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=False)
    try:
        with quiet_peft():
            wrapped = get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"--peft prefix: {reason(error)}") from None
    init_prefix(wrapped, seed)
    return quiet_prefix_forward(wrapped)


def prefix_weight(model) -> torch.nn.Parameter:
    """The prefix's parameter: [tokens, layers * 2 * kv_heads * head_dim], keys then values per layer."""
    return model.prompt_encoder[model.active_adapter].embedding.weight


@torch.no_grad()
def init_prefix(model, seed: int) -> torch.Tensor:
    """Fills the prefix of peft ``model`` with the keys and values the base model caches when it reads
    random vocabulary tokens drawn from ``seed``; returns those tokens."""
    config = model.active_peft_config
    base = model.get_base_model()
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    vocab = base.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(hash64("zotune-prefix-init", seed) >> 1)
    tokens = torch.randint(0, vocab, (1, n), generator=generator)
    weight = prefix_weight(model)
    was_training = base.training
    base.eval()
    try:
        output = base(input_ids=tokens.to(weight.device), use_cache=True)
    finally:
        base.train(was_training)
    cache = getattr(output, "cache", None)
    if cache is None:  # transformers before the rename
        cache = output.past_key_values
    pairs = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
    expected = (1, heads, n, config.token_dim // heads)
    if len(pairs) != layers or any(tuple(t.shape) != expected for pair in pairs for t in pair):
        shapes = sorted({tuple(t.shape) for pair in pairs for t in pair})
        raise UserError(f"--peft prefix: {type(base).__name__} caches {len(pairs)} layers of keys/values shaped "
                        f"{shapes}, not the {layers} x {expected} that peft's prefix holds; use --peft lora")
    view = weight.view(n, layers, 2, heads, config.token_dim // heads)
    for layer, (keys, values) in enumerate(pairs):
        view[:, layer, 0] = keys[0].transpose(0, 1)
        view[:, layer, 1] = values[0].transpose(0, 1)
    return tokens


def save_result(folder, model, tokenizer, config) -> None:
    """A zeroth-order run's result: the whole model, or with ``--peft`` the adapter alone."""
    if config.peft == "none":
        save_model(folder / "model", model, tokenizer)
    elif config.peft == "scales":
        save_scales(folder / "scales", model)
    elif config.peft == "head":
        save_head(folder / "head", model)
    else:
        model.save_pretrained(folder / "adapter")


SCALES_FILE = "scales.safetensors"


def save_scales(folder, model) -> None:
    """What a run on a quantized base changed, by parameter name: the scales, and the weights kept in float (HZO's
    first-order blocks; norms). The codes and offsets never change: the base rebuilds them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # Under peft LoRA (LMAO), by the names of the model without its adapters, which eval and replay load into.
    save_file({name.replace(".base_layer.", "."): p.detach().contiguous() for name, p in model.named_parameters()
               if not name.endswith(".offsets") and not is_adapter(name)}, str(folder / SCALES_FILE))


def load_scales(folder, model) -> None:
    """Copies saved scales into quantized ``model`` (quantized as the run's base was)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / SCALES_FILE
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"could not read {path} ({reason(error)}): restore it from a copy of the run folder") from None
    params = dict(model.named_parameters())
    for name, value in saved.items():
        if name not in params or params[name].shape != value.shape:
            raise UserError(f"{path}: {name} does not fit this model (another --quantize or --group-size?)")
        with torch.no_grad():
            params[name].copy_(value)


HEAD_FILE = "head.safetensors"


def save_head(folder, model) -> None:
    """The candidate head: Δ, b, the tokens they correct and the feature scale they read with (measured on the
    training prompts, which evaluation does not read; and another device may measure it a rounding apart)."""
    from safetensors.torch import save_file

    head = find_head(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"delta": head.delta.detach().contiguous(), "bias": head.bias.detach().contiguous(),
               "token_ids": head.token_ids.cpu(), "scale": head.scale.detach().contiguous()}, str(folder / HEAD_FILE))


def load_head(folder, model, scale_only: bool = False) -> None:
    """Copies a saved candidate head into ``model``'s (made for the same task and model); with ``scale_only``, the
    feature scale it read with alone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, head = folder / HEAD_FILE, find_head(model)
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"could not read {path} ({reason(error)}): restore it from a copy of the run folder") from None
    if head is None or set(saved) != {"delta", "bias", "token_ids", "scale"} \
            or not torch.equal(saved["token_ids"], head.token_ids.cpu()) or saved["delta"].shape != head.delta.shape:
        raise UserError(f"{path} does not fit this model and task (another --model, --task or --candidates?)")
    with torch.no_grad():
        head.scale.copy_(saved["scale"])
        if not scale_only:
            head.delta.copy_(saved["delta"])
            head.bias.copy_(saved["bias"])
