"""A GGUF model loaded with its quantized blocks kept (``--model file.gguf --keep-quantized``).

llama.cpp's blocks map onto :mod:`zotune.core.quant`'s layout (groups of 32 along a row, a
float16 scale and, for 4 bits, an offset per group), so the file's matrices are never
dequantized to a float model:

- Q8_0 (scale d, signed 8-bit q: d·q) is int8 as it is;
- Q4_1 (d, min m, q in [0, 15]: d·q + m) is int4 as it is; Q4_0 (d·(q − 8)) is int4 with
  the offset −8d, exact in float16;
- Q4_K (super-blocks of 256 with 6-bit sub-block scales and mins: d·s·q − dmin·m) becomes
  int4 with the products d·s and dmin·m rounded to float16: a re-quantization of the scales
  alone, said when loading.

Float tensors (F32, F16, BF16) load as they are. Any other type (Q5, Q6_K, ...) is one line
naming the tensor and the types read. transformers builds the empty model and names the
tensors (:func:`get_gguf_hf_weights_map`); the Llama family's query and key rows, which
llama.cpp permutes, are put back in Hugging Face's order on the codes and scales alike.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import nn

from zotune.assets.convert import check_file, config_of
from zotune.core.quant import (Layout, QuantizedEmbedding, QuantizedLinear, QuantizedWeight, pack_int4,
                               replace_module)
from zotune.errors import UserError, reason

GROUP = 32
KEPT = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")
FLOATS = ("F32", "F16", "BF16")


def _halves(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16)[..., 0]


def _int4_order(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A block's codes in weight order: the low nibbles hold its first half, the high nibbles its second."""
    return np.concatenate((low, high), axis=-1)


def blocks(data: np.ndarray, kind: str, rows: int, columns: int):
    """(codes, scales, offsets, layout) of one GGUF tensor's raw blocks (``data``: rows × bytes per row)."""
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)
    if kind == "Q8_0":
        b = raw.reshape(rows, columns // 32, 34)
        codes = b[..., 2:].copy().view(np.int8).reshape(rows, columns)
        return torch.from_numpy(codes), torch.from_numpy(_halves(b[..., :2])), None, Layout(8, GROUP)
    if kind in ("Q4_0", "Q4_1"):
        head = 2 if kind == "Q4_0" else 4
        b = raw.reshape(rows, columns // 32, head + 16)
        qs = b[..., head:]
        q = _int4_order(qs & 15, qs >> 4)
        scales = _halves(b[..., :2])
        offsets = (-8 * scales).astype(np.float16) if kind == "Q4_0" else _halves(b[..., 2:4])
        return _int4(q, rows, columns, scales, offsets)
    if kind == "Q4_K":
        b = raw.reshape(rows, columns // 256, 144)
        d, dmin = _halves(b[..., 0:2]).astype(np.float32), _halves(b[..., 2:4]).astype(np.float32)
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(rows, columns // 256, 4, 32)
        q = np.stack((qs & 15, qs >> 4), axis=3)  # chunk j: sub-block 2j in the low nibbles, 2j + 1 in the high
        scales = (d[..., None] * sc).astype(np.float16)
        offsets = (-(dmin[..., None] * mn)).astype(np.float16)
        return _int4(q.reshape(rows, columns // 32, 32), rows, columns, scales.reshape(rows, -1),
                     offsets.reshape(rows, -1))
    raise ValueError(kind)


def _int4(q: np.ndarray, rows: int, columns: int, scales: np.ndarray, offsets: np.ndarray):
    codes = pack_int4(torch.from_numpy(np.ascontiguousarray(q).reshape(rows, columns)))
    return (codes, torch.from_numpy(np.ascontiguousarray(scales).reshape(rows, -1)),
            torch.from_numpy(np.ascontiguousarray(offsets).reshape(rows, -1)), Layout(4, GROUP))


def _k_scales(packed: np.ndarray):
    """Q4_K's eight 6-bit scales and mins per super-block, from their 12 packed bytes (llama.cpp's get_scale_min_k4)."""
    p = packed.astype(np.uint8)
    sc = np.empty(p.shape[:-1] + (8,), dtype=np.float32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = p[..., 0:4] & 63, p[..., 4:8] & 63
    sc[..., 4:] = (p[..., 8:12] & 15) | ((p[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return sc, mn


def _row_order(processor, name: str, rows: int) -> np.ndarray | None:
    """The permutation transformers applies to the rows of tensor ``name`` (None: none)."""
    probe = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    order = processor.process(probe, name).weights.reshape(-1)
    return None if np.array_equal(order, probe.reshape(-1)) else torch.from_numpy(np.ascontiguousarray(order))


def load(path: pathlib.Path, dtype: torch.dtype):
    """The causal LM of GGUF ``path``, its quantized matrices kept, and its tokenizer. Returns ``(model, tokenizer,
    notes)``."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    check_file(path)
    config = config_of(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise UserError(f"cannot read {path}: {reason(error)}") from None
    architecture = (read_field(reader, "general.architecture") or ["?"])[0]
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class.__name__ not in ("TensorProcessor", "LlamaTensorProcessor"):
        raise UserError(f"--keep-quantized reads GGUFs whose tensors transformers loads as they are (Llama, Mistral, "
                        f"Qwen2 and alike); {path.name} is {architecture}: leave out --keep-quantized")
    processor = processor_class(config=config.to_dict())
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = get_gguf_hf_weights_map(model, processor)
    modules = dict(model.named_modules())
    notes = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue  # e.g. rope_freqs: transformers recomputes it
        owner_name, _, attribute = hf_name.rpartition(".")
        owner = modules[owner_name]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if kind in FLOATS:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            values = processor.process(values, tensor.name).weights
            setattr(owner, attribute, nn.Parameter(torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype),
                                                   requires_grad=True))
            continue
        if kind not in KEPT or attribute != "weight" or len(shape) != 2:
            raise UserError(f"{path.name}: tensor {tensor.name} is {kind}; --keep-quantized reads "
                            f"{', '.join(KEPT)} matrices and {', '.join(FLOATS)} tensors: leave out --keep-quantized")
        if shape[1] % (256 if kind == "Q4_K" else GROUP):
            raise UserError(f"{path.name}: tensor {tensor.name} ({kind}) has rows of {shape[1]}, not whole blocks: "
                            "the file is damaged")
        try:
            codes, scales, offsets, layout = blocks(tensor.data, kind, *shape)
        except ValueError as error:
            raise UserError(f"{path.name}: tensor {tensor.name} ({kind}) does not hold {shape[0]} rows of "
                            f"{shape[1]} ({reason(error)}): the file is damaged") from None
        if kind == "Q4_K":
            notes.add("Q4_K's sub-block scales and mins are multiplied out and rounded to float16")
        order = _row_order(processor, tensor.name, shape[0])
        if order is not None:
            codes, scales = codes[order], scales[order]
            offsets = None if offsets is None else offsets[order]
        weight = QuantizedWeight(codes, scales, offsets, layout, shape, dtype)
        replacement = (QuantizedEmbedding(weight, owner.padding_idx) if isinstance(owner, nn.Embedding)
                       else QuantizedLinear(weight, None))
        replace_module(model, owner_name, replacement)
        modules[owner_name] = replacement
    _tie_head(model)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"{path.name} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                             else "") + ": the file is damaged or not this model")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer, sorted(notes)


def _tie_head(model) -> None:
    """A head tied to the input embedding (no output tensor in the file) reads the embedding's blocks."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or not isinstance(head, nn.Linear):
        return
    if head.weight.is_meta and isinstance(embedding, QuantizedEmbedding):
        model.set_output_embeddings(QuantizedLinear(embedding.quantized, None))
