"""Loading Hugging Face causal / masked LMs by hub id, local folder, GGUF file, or the embedded default."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zotune.errors import UserError, reason

DEFAULT_MODEL = "smollm2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("auto", "causal", "masked")
# What transformers and peft raise for a missing or damaged file.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def resolve(name: str) -> str:
    """The folder or hub id behind a model name (``smollm2`` is the embedded default; a ``.gguf``
    file is converted once into a cached folder)."""
    if name in (DEFAULT_MODEL, "default"):
        from zotune.assets.packages import default_model_dir

        return str(default_model_dir())
    from zotune.assets import convert
    if convert.is_gguf(name):
        return str(convert.gguf_model_dir(name))
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.exists():
            raise UserError(f"model path {name} does not exist")
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a model folder (no config.json); give a Hugging Face model folder or hub id")
    return str(path) if looks_local else name


def detect_kind(source: str) -> str:
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(source).architectures
    return kind_of(architectures)


def kind_of(architectures) -> str:
    """``masked`` when a config's architectures name a masked LM, else ``causal``."""
    return "masked" if any(a.endswith("ForMaskedLM") for a in architectures or []) else "causal"


def load(name: str, dtype: str = "fp32", kind: str = "auto", device: str | None = None, quantize: str = "none",
         group_size: int = 32, keep_float=lambda model: (), keep_quantized: bool = False):
    """Returns ``(model, tokenizer, kind)``; the model is in eval mode on ``device``, its matrices in
    ``quantize`` (int8 or int4, :mod:`zotune.core.quant`) unless that is none, but for the modules named (and
    those inside them) by ``keep_float(model)``. ``keep_quantized``: a GGUF file's quantized blocks are kept
    (:mod:`zotune.assets.gguf_blocks`) rather than converted to float."""
    if keep_quantized:
        return _load_gguf_blocks(name, dtype, device, quantize, group_size, keep_float)
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}: choose one of {', '.join(KINDS)}")
    source = resolve(name)
    local = Path(source).is_dir()
    if local:
        check_files(Path(source), f"could not load model {name!r}")
    try:
        kind = detect_kind(source) if kind == "auto" else kind
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=DTYPES[dtype])
    except LOAD_ERRORS as error:  # what check_files cannot see (a missing file, a wrong value): one line
        remedy = "; restore the folder from a copy, or save the model there again" if local else ""
        raise UserError(f"could not load model {name!r}: {reason(error)}{remedy}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except LOAD_ERRORS as error:  # a file missing from the folder, which transformers does not name
        raise UserError(f"could not load the tokenizer of model {name!r} ({reason(error)}): restore its tokenizer "
                        "files (tokenizer.json, tokenizer_config.json) from a copy") from None
    return _ready(name, model, tokenizer, kind, device, quantize, group_size, tuple(keep_float(model)))


def _load_gguf_blocks(name: str, dtype: str, device, quantize: str, group_size: int, keep_float):
    from zotune.assets import gguf_blocks
    from zotune.assets.cache import say
    from zotune.core.quant import dequantize_modules

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model, tokenizer, notes = gguf_blocks.load(Path(name).expanduser(), DTYPES[dtype])
    for note in notes:
        say(True, f"{Path(name).name}: {note}")
    keep = tuple(keep_float(model))
    dequantize_modules(model, keep)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    return _ready(name, model, tokenizer, "causal", device, quantize, group_size, keep)


def _ready(name: str, model, tokenizer, kind: str, device: str | None, quantize: str, group_size: int,
           keep: tuple[str, ...]):
    """The loaded model and tokenizer checked against each other and padded; the model's float matrices (but those
    inside ``keep``) quantized as ``quantize`` asks; the model in eval mode on ``device``."""
    check_tokenizer(name, model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize != "none":  # on the host, before the move: the device never holds the float model
        from zotune.core.quant import quantize_model

        quantize_model(model, quantize, group_size, keep=keep)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, kind


def check_files(folder: Path, what: str) -> None:
    """Reads each JSON file and safetensors header of ``folder`` before transformers or peft
    does, so that a damaged one is named (their own errors do not say which file).

    A safetensors file holds no checksum of its tensor data: garbled weights still load.
    """
    for file in sorted(folder.glob("*.json")):
        try:
            if not isinstance(json.loads(file.read_text()), dict):  # all of theirs are objects
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            raise UserError(f"{what}: {file} is damaged ({reason(error)}); restore it from a copy") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):  # checks the header and that the file holds all the data it lists
                pass
        except (OSError, SafetensorError) as error:
            raise UserError(f"{what}: {file} is damaged ({reason(error)}); restore it from a copy") from None


@contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question, and calls zotune's quantized layers (which it wraps through
    the custom-module door, :func:`on_quantized_layers`) unsupported; not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Unsupported layer type '<class 'zotune.core.quant")
        yield


def check_tokenizer(name: str, model, tokenizer) -> None:
    """Refuses a tokenizer that would make every score wrong without an error."""
    size = len(tokenizer)
    if size < 16:  # what transformers builds from a folder without tokenizer files
        raise UserError(f"model {name!r} has no usable tokenizer ({size} tokens): add its tokenizer files to the folder")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:  # batches could not be padded
        raise UserError(f"the tokenizer of model {name!r} has neither a pad nor an end-of-text token: restore its "
                        "tokenizer_config.json from a copy, or set pad_token there")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and size > rows:
        raise UserError(f"the tokenizer of {name!r} has {size} tokens but the model's embedding only {rows} rows: "
                        "they do not belong together")


def on_quantized_layers(config):
    """A peft LoRA config that also wraps zotune's quantized linear layers (--quantize): peft's own LoRA layer
    adds the adapter on the layer's output and never touches its weights."""
    from peft.tuners.lora import Linear

    from zotune.core.quant import QuantizedLinear

    if hasattr(config, "_register_custom_module"):  # LoRA configs; prompt learning has no layers to wrap
        config._register_custom_module({QuantizedLinear: Linear})
    return config


def add_lora(model, r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj")):
    """``model`` wrapped by peft with LoRA adapters (dropout off) on the ``targets`` modules."""
    from peft import LoraConfig, get_peft_model

    config = on_quantized_layers(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)))
    try:
        # peft draws its init from the global RNG: the caller's streams stay as they were (zotune redraws it).
        with quiet_peft(), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"LoRA targets {','.join(targets)}: {reason(error)}") from None
