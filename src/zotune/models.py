"""Loading Hugging Face causal / masked LMs by hub id, local folder, or the embedded default."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from zotune.errors import UserError

DEFAULT_MODEL = "smollm2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("auto", "causal", "masked")


def resolve(name: str) -> str:
    """The folder or hub id behind a model name (``smollm2`` is the embedded default)."""
    if name in (DEFAULT_MODEL, "default"):
        from zotune.assets import default_model_dir

        return str(default_model_dir())
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

        architectures = AutoConfig.from_pretrained(source).architectures or []
    return "masked" if any(a.endswith("ForMaskedLM") for a in architectures) else "causal"


def load(name: str, dtype: str = "fp32", kind: str = "auto", device: str | None = None):
    """Returns ``(model, tokenizer, kind)``; the model is in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}: choose one of {', '.join(KINDS)}")
    source = resolve(name)
    try:
        kind = detect_kind(source) if kind == "auto" else kind
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:  # a damaged file: one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load model {name!r}: {first_line}") from None
    check_tokenizer(name, model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, kind


def check_tokenizer(name: str, model, tokenizer) -> None:
    """Refuses a tokenizer that would make every score wrong without an error."""
    size = len(tokenizer)
    if size < 16:  # what transformers builds from a folder without tokenizer files
        raise UserError(f"model {name!r} has no usable tokenizer ({size} tokens): add its tokenizer files to the folder")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and size > rows:
        raise UserError(f"the tokenizer of {name!r} has {size} tokens but the model's embedding only {rows} rows: "
                        "they do not belong together")


def add_lora(model, r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj")):
    """``model`` wrapped by peft with LoRA adapters (dropout off) on the ``targets`` modules."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"LoRA targets {','.join(targets)}: {str(error).splitlines()[0]}") from None
