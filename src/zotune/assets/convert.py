"""GGUF files (llama.cpp's format) to Hugging Face folders, dequantised once and cached.

transformers reads a GGUF but the model it returns keeps the GGUF quantizer attached, so it
refuses ``save_pretrained`` and dtype casts; users rebuilt the model by hand. Here the file
is loaded once, its weights dequantised to float32, and saved with its tokenizer under
``cache_dir()/models/gguf/<stem>-<sha256 prefix>``: later runs load that folder like any
other, and a changed file (another hash) gets a folder of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from zotune.assets.cache import cache_dir, check_free, disk_errors, file_sha256, say
from zotune.errors import UserError, reason

MARKER = "source.json"  # written last: a folder without it is an interrupted conversion
_MAGIC = b"GGUF"


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def check_file(path: pathlib.Path) -> None:
    """One line for a path that is missing or not a GGUF file (before transformers' tracebacks)."""
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a llama.cpp .gguf "
                            "file, or a Hugging Face model folder")


def config_of(path: pathlib.Path):
    """The Hugging Face config described by a GGUF file's metadata (no tensor is read)."""
    from transformers import AutoConfig

    check_file(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise UserError(f"cannot read {path}: {reason(error)}") from None


def save_folder(gguf: pathlib.Path, out: pathlib.Path, record: dict, progress: bool) -> None:
    """Dequantises ``gguf`` to float32 and saves it with its tokenizer as a Hugging Face folder
    ``out``; ``record`` (where the file came from) is written last, as the folder's marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as error:  # e.g. an architecture transformers cannot read
        raise UserError(f"cannot convert {gguf.name}: {reason(error)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_free(out.parent, sum(p.numel() for p in model.parameters()) * 4 + (64 << 20))  # the float32 folder
    # The weights are already dequantised; the GGUF quantizer left attached makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mode = (out / "config.json").stat().st_mode
    for f in out.iterdir():  # the safetensors file is written 0600 via a temporary file
        f.chmod(mode)
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def install(out: pathlib.Path, final: pathlib.Path) -> pathlib.Path:
    """Moves a finished folder into place, unless another process finished first."""
    if (final / MARKER).is_file():
        return final
    shutil.rmtree(final, ignore_errors=True)  # leftovers of an interrupted run
    os.replace(out, final)
    return final


def gguf_model_dir(path: str | os.PathLike, progress: bool = True) -> pathlib.Path:
    """The cached Hugging Face folder of the GGUF file ``path``, converted on first use."""
    gguf = pathlib.Path(path).expanduser().resolve()
    check_file(gguf)
    sha256 = file_sha256(gguf)
    final = cache_dir() / "models" / "gguf" / f"{gguf.stem}-{sha256[:16]}"
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(final.parent), tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-") as tmp:
        say(progress, f"converting {gguf.name} to a Hugging Face folder (float32, once)...")
        out = pathlib.Path(tmp) / final.name
        save_folder(gguf, out, {"file": str(gguf), "sha256": sha256, "dtype": "float32"}, progress)
        install(out, final)
    say(progress, f"{gguf.name} cached at {final}")
    return final
