"""Weight-only quantized storage: a model's matrices kept as 8- or 4-bit codes with per-group scales.

One layout serves our own quantizer and llama.cpp's blocks, so a GGUF's Q8_0, Q4_0, Q4_1 and
Q4_K tensors are kept without loss: along each row, a group of ``group_size`` weights shares
a scale (and, for int4, an offset), and a weight is ``scale * code + offset``.

- int8: signed codes in [-127, 127], symmetric (no offset), like Q8_0.
- int4: unsigned codes in [0, 15], two to a byte, with an offset per group (min-max), like
  Q4_1. Q4_0 is the offset -8·scale; Q4_K's sub-blocks of 32 carry their own scale and min.

The scales and offsets are parameters, frozen unless a method trains them (QZO perturbs the
scales); the codes are buffers and never change. A forward dequantizes one matrix at a time
(an output-row chunk at a time for large ones, such as a tied output layer), so memory holds
the codes plus one chunk of float weights, never the float model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("int8", "int4")
CHUNK_ELEMENTS = 1 << 20  # float weights dequantized at once by one layer (4 MiB in float32)
SCALE_DTYPE = torch.float16  # as llama.cpp stores them: half the memory of float32 scales at no measurable loss


@dataclass(frozen=True)
class Layout:
    bits: int
    group_size: int

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def check(self, shape: tuple[int, int]) -> str | None:
        """Why a matrix of this shape cannot take the layout, or None."""
        if shape[1] % self.group_size:
            return f"its rows ({shape[1]}) are not a multiple of the group size {self.group_size}"
        if self.bits == 4 and shape[1] % 2:
            return "its rows have an odd length"
        return None


def layout_of(name: str, group_size: int) -> Layout:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization {name!r}: one of {', '.join(FORMATS)}")
    return Layout(int(name[3:]), group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (uint8, even last dimension) to bytes, the even index in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize(weight: torch.Tensor, layout: Layout, scale_dtype: torch.dtype):
    """``weight`` (out × in) to (codes, scales, offsets or None). Codes are computed from the
    stored (rounded) scales and offsets, so that dequantizing gives the nearest representable value."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // layout.group_size, layout.group_size)
    if layout.bits == 8:
        scales = (groups.abs().amax(-1) / 127).to(scale_dtype)
        step = scales.float().masked_fill(scales == 0, 1).unsqueeze(-1)
        codes = torch.round(groups / step).clamp_(-127, 127).to(torch.int8)
        return codes.reshape(out_features, in_features), scales, None
    low, high = groups.amin(-1), groups.amax(-1)
    offsets = low.to(scale_dtype)
    scales = ((high - offsets.float()) / 15).to(scale_dtype)
    step = scales.float().masked_fill(scales == 0, 1).unsqueeze(-1)
    codes = torch.round((groups - offsets.float().unsqueeze(-1)) / step).clamp_(0, 15).to(torch.uint8)
    return pack_int4(codes.reshape(out_features, in_features)), scales, offsets


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, layout: Layout,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weights of ``codes`` (any leading rows: a chunk, or an embedding's gathered rows). In place after
    the one float copy: a chunk costs its float32 weights and its unpacked codes, nothing more."""
    values = unpack_int4(codes) if layout.bits == 4 else codes
    rows = values.shape[:-1]
    weight = values.reshape(*rows, scales.shape[-1], layout.group_size).to(torch.float32)
    weight.mul_(scales.unsqueeze(-1))
    if offsets is not None:
        weight.add_(offsets.unsqueeze(-1))
    return weight.reshape(*rows, -1).to(dtype)


class QuantizedWeight(nn.Module):
    """One quantized matrix, shared by the layers that use it (a tied embedding and output layer)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, layout: Layout,
                 shape: tuple[int, int], compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layout, self.shape, self.compute_dtype = layout, tuple(shape), compute_dtype
        self.register_buffer("codes", codes)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.offsets = None if offsets is None else nn.Parameter(offsets, requires_grad=False)

    @classmethod
    def of(cls, weight: torch.Tensor, layout: Layout, scale_dtype: torch.dtype = SCALE_DTYPE) -> QuantizedWeight:
        return cls(*quantize(weight, layout, scale_dtype), layout, weight.shape, weight.dtype)

    def _apply(self, fn, recurse=True):
        # The dtype the model computes in (an embedding's output) follows model.to(dtype), as a float weight's would.
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        """``x Wᵀ`` (in chunks of output rows for a large matrix), or with ``lookup`` the rows of W that the
        integers ``x`` name. The layers call this module rather than read its scales: a perturbation of the scales
        is then substituted while it runs, as for any module's own parameters, and a stacked evaluation can give
        each copy of the batch its own."""
        if lookup:
            return self.gather(x, self.compute_dtype)
        rows = max(1, CHUNK_ELEMENTS // self.shape[1])
        if rows >= self.shape[0]:
            return F.linear(x, self.rows(0, self.shape[0], x.dtype))
        parts = [F.linear(x, self.rows(start, min(start + rows, self.shape[0]), x.dtype))
                 for start in range(0, self.shape[0], rows)]
        return torch.cat(parts, dim=-1)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        offsets = None if self.offsets is None else self.offsets[start:stop]
        return dequantize(self.codes[start:stop], self.scales[start:stop], offsets, self.layout, dtype)

    def gather(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        offsets = None if self.offsets is None else self.offsets[index]
        return dequantize(self.codes[index], self.scales[index], offsets, self.layout, dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(0, self.shape[0], dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.layout.name}, shape={self.shape}, group_size={self.layout.group_size}"


class QuantizedLinear(nn.Module):
    """``nn.Linear`` over a :class:`QuantizedWeight`; large matrices are dequantized in chunks of output rows."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.quantized = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @property
    def weight(self) -> torch.Tensor:
        """A float copy of the weights, for code that reads ``.weight`` (its dtype, device or values)."""
        return self.quantized.dequantized(self.quantized.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` over a :class:`QuantizedWeight`: only the looked-up rows are dequantized."""

    def __init__(self, weight: QuantizedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.quantized, self.padding_idx = weight, padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized.dequantized(self.quantized.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized(ids, lookup=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quantize_model(model: nn.Module, name: str, group_size: int = 32, keep: tuple[str, ...] = ()) -> dict:
    """Replaces the model's linear and embedding layers (but those inside the modules named by ``keep``) by
    quantized ones, in place, keeping tied weights tied. Returns a summary: the layers quantized, those kept and
    why, and the bytes of the quantized weights."""
    layout = layout_of(name, group_size)
    made: dict[int, QuantizedWeight] = {}
    quantized, kept = [], {}
    # A weight tied to a module kept in float stays float everywhere: one tensor cannot be both.
    floats = {id(module.weight) for module_name, module in model.named_modules()
              if inside(module_name, keep) and isinstance(getattr(module, "weight", None), torch.Tensor)}
    for module_name, module in list(model.named_modules()):
        transposed = _is_conv1d(module)
        if not (isinstance(module, (nn.Linear, nn.Embedding)) or transposed) or inside(module_name, keep):
            continue
        if id(module.weight) in floats:
            kept[module_name] = "its weight is tied to a layer kept in float"
            continue
        if type(module) not in (nn.Linear, nn.Embedding) and not transposed:
            kept[module_name] = f"{type(module).__name__} has a forward of its own"  # e.g. OPT's positions
            continue
        weight = module.weight.t() if transposed else module.weight
        why = layout.check(tuple(weight.shape))
        if why is not None:
            kept[module_name] = why
            continue
        shared = made.get(id(module.weight))
        if shared is None:
            shared = made[id(module.weight)] = QuantizedWeight.of(weight, layout).to(weight.device)
        if type(module) is nn.Linear or transposed:
            replacement = QuantizedLinear(shared, module.bias)
        else:
            replacement = QuantizedEmbedding(shared, module.padding_idx)
        replace_module(model, module_name, replacement)
        quantized.append(module_name)
    return dict(format=name, group_size=group_size, quantized=quantized, kept=kept,
                bytes=sum(w.nbytes() for w in made.values()))


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer that stores its weight as in × out."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantized_weights(model: nn.Module) -> list[QuantizedWeight]:
    seen, found = set(), []
    for module in model.modules():
        if isinstance(module, QuantizedWeight) and id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found


def dequantize_modules(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Turns the quantized layers inside the modules named by ``prefixes`` back into float ``nn.Linear`` and
    ``nn.Embedding`` (a method's full-precision part); layers elsewhere that share their weights follow."""
    chosen = {id(m.quantized) for name, m in model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and inside(name, prefixes)}
    floats: dict[int, nn.Parameter] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)) or id(module.quantized) not in chosen:
            continue
        weight = floats.get(id(module.quantized))
        if weight is None:
            weight = floats[id(module.quantized)] = nn.Parameter(module.quantized.dequantized(
                module.quantized.compute_dtype))
        if isinstance(module, QuantizedLinear):
            replacement = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device="meta")
            replacement.bias = module.bias
        else:
            replacement = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                       device="meta")
        replacement.weight = weight
        replace_module(model, name, replacement)


def inside(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of the modules named by ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted path ``name`` (``nn.Module.set_submodule`` is missing from some torch 2.4)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
