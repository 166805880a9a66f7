"""``zotune memory``: will it fit? The peak GPU memory of each method, estimated from the
model's config alone: the model is built on the meta device, so no weight is downloaded
or allocated, and a 175B config answers in a second.

The estimate of a method is what it keeps (weights, gradients, optimizer moments, stored
activations) plus the largest transient of a step. With ``W`` the weights, ``d`` the
bytes of the dtype, ``T = batch * length`` tokens, ``h`` the hidden size, ``f`` the MLP
width and ``V`` the vocabulary:

* a forward's transient: one block's working set ``T (4h + 2f) d`` or the logits with
  their float32 log-softmax ``T V (d + 4)``, whichever is larger (attention through SDPA:
  no L×L score matrix);
* activations stored for a backward, per block: ``T h 17 d`` (Korthikanti et al. 2022's
  ``34 s b h`` bytes in 16 bits, with flash attention);
* AdamW: a gradient and two moments per trained weight: ``3 d`` in float32; in 16 bits
  ``d + 16`` (the half gradient, a float32 master, its float32 gradient and two float32
  moments: :mod:`zotune.core.mixed_precision`). LoRA adapters are float32 in any dtype
  (peft upcasts them): 16 bytes per adapter element with its AdamW state.

Per method:

* inference: ``W`` + a forward's transient;
* MeZO: inference + the largest tensor (the perturbed copy a forward reads);
* FT: ``W`` + AdamW on every weight + every block's stored activations + the logits;
* LoRA-FT: ``W`` + the adapters with AdamW + every block's stored activations + the logits;
* LMAO: the larger of LoRA-FT and MeZO (with the adapters);
* HZO (its defaults: joint order, one-sided, stacked): ``W`` + the deep blocks' AdamW
  state + the stacked copies' deep activations, logits and logit gradients (low-rank
  directions: no weight-sized copy);
* offloaded (``--offload cpu``): the embeddings, head, first-order blocks and the streamed
  blocks' vectors (norms, biases) stay; :data:`~zotune.engine.offload.SLOTS` device slots,
  each the size of the largest streamed block's matrices, replace the streamed blocks
  (:func:`slot_bytes`). MeZO always stacks its evaluations when offloading: its forward
  reads the batch once per stacked copy. The streamed matrices live in host memory,
  once (:func:`host_bytes`, the table's "CPU RAM" column).

A stacked forward repeats the batch once per point the method's default estimator
evaluates (:func:`stacked_copies`: two for MeZO's SPSA and for HZO's one-sided estimator).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from zotune.core.estimate import get as estimator
from zotune.engine.blocks import find_blocks
from zotune.engine.offload import SLOTS
from zotune.errors import UserError, reason
from zotune.methods.hzo import HZOConfig
from zotune.methods.mezo import MeZOConfig
from zotune.assets.models import kind_of

METHODS = ("inference", "mezo", "mezo-offload", "lora-ft", "ft", "lmao", "hzo", "hzo-offload")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimates read from a model: element counts and sizes."""

    params: int
    largest: int  # elements of the largest tensor
    block: int  # elements of one transformer block
    blocks: int
    matrices: tuple[int, ...]  # elements of each block's matrices (what offload streams), in forward order
    hidden: int
    ffn: int
    vocab: int
    lora: int  # elements of LoRA r 8 adapters on the attention's query and value projections


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
    lora = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(module, torch.nn.Linear):
            lora += 8 * (module.in_features + module.out_features)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden
    return Shape(params=sum(p.numel() for p in named.values()), largest=max(p.numel() for p in named.values()),
                 block=max(block_sizes), blocks=len(block_sizes), matrices=matrices,
                 hidden=hidden, ffn=ffn, vocab=text.vocab_size, lora=lora)


def stacked_copies(config: type) -> int:
    """Copies of the batch in one stacked forward of a zeroth-order method (its config class): one per point its
    default estimator evaluates."""
    default = {f.name: f.default for f in fields(config)}
    return len(estimator(default["estimator"]).plan(default["n_samples"]))


def streamed(shape: Shape, deep_blocks: int = 0) -> tuple[int, ...]:
    """Elements of the matrices of each block ``--offload cpu`` streams: every block but HZO's ``deep_blocks``
    first-order ones (the last), which stay on the device."""
    return shape.matrices[: shape.blocks - min(deep_blocks, shape.blocks)]


def slot_bytes(shape: Shape, dtype: str, deep_blocks: int = 0) -> int:
    """Device bytes of the offload engine's slots: SLOTS buffers, each the size of the largest streamed block's
    matrices."""
    return SLOTS * max(streamed(shape, deep_blocks), default=0) * BYTES[dtype]


def host_bytes(shape: Shape, dtype: str, deep_blocks: int = 0) -> int:
    """Host bytes of the streamed blocks: their matrices, once."""
    return sum(streamed(shape, deep_blocks)) * BYTES[dtype]


class Estimates(dict):
    """Estimated peak device bytes of each method, and in ``host`` the host memory of the offloaded ones."""

    def __init__(self, peaks: dict[str, int], host: dict[str, int]):
        super().__init__(peaks)
        self.host = host


def estimate(shape: Shape, batch: int, length: int, dtype: str = "fp16", deep_blocks: int = 1) -> Estimates:
    """Estimated peak bytes of each of :data:`METHODS` (see the module docstring)."""
    d, tokens = BYTES[dtype], batch * length
    weights = shape.params * d

    def transient(tokens: int) -> int:  # of a forward
        return max(tokens * (4 * shape.hidden + 2 * shape.ffn) * d, tokens * shape.vocab * (d + 4))

    logits = tokens * shape.vocab * (d + 4)
    stored = tokens * shape.hidden * 17 * d  # per block, kept for the backward
    adam = 3 * d if dtype == "fp32" else d + 4 + 4 + 8  # per trained element (16 bits: fp32 master, its grad, moments)
    adapter = 4 + 3 * 4  # a LoRA element and its AdamW state, float32 in any dtype
    deep = min(deep_blocks, shape.blocks)
    inference = weights + transient(tokens)
    mezo = inference + shape.largest * d
    lora_ft = weights + shape.lora * adapter + shape.blocks * stored + logits
    # HZO's defaults (joint order, one-sided, stacked) run the copies in one forward, autograd from the first deep
    # block on: every copy's deep activations, logits and their gradients are kept.
    hzo_kept = deep * shape.block * adam + stacked_copies(HZOConfig) * (deep * stored + 2 * logits)
    host = {"mezo-offload": host_bytes(shape, dtype), "hzo-offload": host_bytes(shape, dtype, deep)}
    return Estimates({
        "inference": inference,
        "mezo": mezo,
        "mezo-offload": weights - host["mezo-offload"] + slot_bytes(shape, dtype)
        + transient(stacked_copies(MeZOConfig) * tokens) + shape.largest * d,
        "lora-ft": lora_ft,
        "ft": weights + shape.params * adam + shape.blocks * stored + logits,
        "lmao": max(lora_ft, mezo + shape.lora * adapter),
        "hzo": weights + hzo_kept,
        "hzo-offload": weights - host["hzo-offload"] + slot_bytes(shape, dtype, deep) + hzo_kept,
    }, host)


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
