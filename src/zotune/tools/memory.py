"""``zotune memory``: will it fit? The peak GPU memory of each method, estimated from the
model's config alone: the model is built on the meta device, so no weight is downloaded
or allocated, and a 175B config answers in a second.

The rows are inference and what each registered method declares
(:meth:`zotune.methods.Method.memory_estimates`) for its defaults; the terms they add up
are explained in :mod:`zotune.methods.footprint`.
"""

from __future__ import annotations

import torch

from zotune import methods as registry
from zotune.engine.blocks import find_blocks
from zotune.errors import UserError, reason
from zotune.methods.footprint import Footprint, Row, Shape
from zotune.assets.models import kind_of


def shape_of(config) -> Shape:
    """The Shape of a Hugging Face config's language model (masked when its architecture says so,
    else causal), built on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    kind = kind_of(getattr(config, "architectures", None))
    with torch.device("meta"):
        try:
            model = (AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM).from_config(config)
        except ValueError as error:
            raise UserError(f"cannot build a {kind} LM from this config ({reason(error)})") from None
    layout = find_blocks(model)
    named = dict(model.named_parameters())  # tied weights once
    block_sizes = [sum(p.numel() for n, p in named.items() if n.startswith(prefix + ".")) for prefix, _ in layout.blocks]
    matrices = tuple(sum(p.numel() for p in module.parameters() if p.ndim >= 2) for _, module in layout.blocks)
    lora, quantizable, seen = 0, 0, set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module) in (torch.nn.Linear, torch.nn.Embedding) and id(weight) not in seen:
            seen.add(id(weight))
            quantizable += weight.numel()
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(module, torch.nn.Linear):
            lora += 8 * (module.in_features + module.out_features)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden
    return Shape(params=sum(p.numel() for p in named.values()), largest=max(p.numel() for p in named.values()),
                 block=max(block_sizes), blocks=len(block_sizes), matrices=matrices,
                 hidden=hidden, ffn=ffn, vocab=text.vocab_size, lora=lora, quantizable=quantizable)


class Estimates(dict):
    """Estimated peak device bytes of each row, and in ``host`` the host memory of the rows that keep weights there."""

    def __init__(self, peaks: dict[str, int], host: dict[str, int]):
        super().__init__(peaks)
        self.host = host


def estimate(shape: Shape, batch: int, length: int, dtype: str = "fp16", deep_blocks: int = 1,
             quantize: str = "none", group_size: int = 32) -> Estimates:
    """Estimated peak bytes of inference and of every registered method's rows, in the registry's order; with
    ``quantize``, then the quantized base's inference and zeroth order on its scales (``--peft scales``)."""
    footprint = Footprint(shape, batch, length, dtype, deep_blocks, quantize, group_size)
    rows = {"inference": Row(footprint.inference)}
    for name in registry.names():
        rows.update(registry.get(name).method.memory_estimates(footprint))
    if quantize != "none":
        rows[f"{quantize} inference"] = Row(footprint.quantized_inference)
        rows[f"{quantize} mezo"] = Row(footprint.scales_step)
    return Estimates({row: value.device for row, value in rows.items()},
                     {row: value.host for row, value in rows.items() if value.host is not None})


def parse_size(text: str) -> float:
    """``24GB`` / ``80 GiB`` / ``24`` → bytes (GB and GiB both read as 2**30, as GPU makers count)."""
    value = text.strip().upper().replace(" ", "")
    for suffix in ("GIB", "GB", "G"):
        if value.endswith(suffix):
            value = value[: -len(suffix)]
            break
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--gpu {text!r}: give the card's memory, e.g. 24GB or 80GB") from None
    if not number > 0:
        raise UserError(f"--gpu {text!r}: the memory must be positive")
    return number * 2**30


def table(name: str, shape: Shape, estimates: Estimates, gpu: float | None) -> str:
    header = f"{name}: {shape.params / 1e9:.2f}B parameters, {shape.blocks} blocks"
    columns = f"{'method':<14}{'peak GiB':>10}{'CPU RAM GiB':>13}"
    lines = [header, columns + (f"  fits {gpu / 2**30:g} GiB" if gpu else "")]
    for method, value in estimates.items():
        host = f"{estimates.host[method] / 2**30:.2f}" if method in estimates.host else ""
        fits = ("  yes" if value <= gpu else "  no") if gpu else ""
        lines.append(f"{method:<14}{value / 2**30:>10.2f}{host:>13}{fits}".rstrip())
    return "\n".join(lines)
