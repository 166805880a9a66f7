"""What a method's peak GPU memory is made of, for ``zotune memory``: each method declares its
rows (:meth:`zotune.methods.Method.memory_estimates`) as a sum of the :class:`Footprint` terms.

An estimate is what a method keeps (weights, gradients, optimizer moments, stored
activations) plus the largest transient of a step. With ``W`` the weights, ``d`` the
bytes of the dtype, ``T = batch * length`` tokens, ``h`` the hidden size, ``f`` the MLP
width and ``V`` the vocabulary:

* a forward's transient: one block's working set ``T (4h + 2f) d`` or the logits with
  their float32 log-softmax ``T V (d + 4)``, whichever is larger (attention through SDPA:
  no L×L score matrix); inference is ``W`` and that transient;
* activations stored for a backward, per block: ``T h 17 d`` (Korthikanti et al. 2022's
  ``34 s b h`` bytes in 16 bits, with flash attention);
* AdamW: a gradient and two moments per trained weight: ``3 d`` in float32; in 16 bits
  ``d + 16`` (the half gradient, a float32 master, its float32 gradient and two float32
  moments: :mod:`zotune.core.mixed_precision`). LoRA adapters are float32 in any dtype
  (peft upcasts them): 16 bytes per adapter element with its AdamW state;
* offloaded (``--offload cpu``): the embeddings, head, first-order blocks and the streamed
  blocks' vectors (norms, biases) stay; :data:`~zotune.engine.offload.SLOTS` device slots,
  each the size of the largest streamed block's matrices, replace the streamed blocks
  (:func:`slot_bytes`). The streamed matrices live in host memory, once (:func:`host_bytes`,
  the table's "CPU RAM" column).

A stacked forward repeats the batch once per point the method's default estimator
evaluates (:func:`stacked_copies`).

On a quantized base (``zotune memory --quantize``, :mod:`zotune.core.quant`), the matrices of the
linear and embedding layers take ``bits / 8`` bytes an element plus float16 scales (and int4's
offsets) per group; a forward also holds one dequantized chunk (float32, with its unpacked codes),
and a step on the scales holds the largest scale tensor in float32 twice (its update and its
direction).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

from zotune.core.estimate import get as estimator
from zotune.core.quant import CHUNK_ELEMENTS
from zotune.engine.offload import SLOTS

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAPTER = 4 + 3 * 4  # a LoRA element and its AdamW state, float32 in any dtype


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
    quantizable: int = 0  # elements of the linear and embedding weights (tied ones once): what --quantize stores


class Row(NamedTuple):
    """One row of the table: peak device bytes, and the host bytes of a row that keeps weights there."""

    device: int
    host: int | None = None


def stacked_copies(config: type) -> int:
    """Copies of the batch in one stacked forward of a zeroth-order method (its config class): one per point its
    default estimator evaluates."""
    default = {f.name: f.default for f in fields(config)}
    return len(estimator(default["estimator"]).plan(default["n_samples"]))


def streamed(shape: Shape, deep_blocks: int = 0) -> tuple[int, ...]:
    """Elements of the matrices of each block ``--offload cpu`` streams: every block but the ``deep_blocks``
    first-order ones (the last), which stay on the device."""
    return shape.matrices[: shape.blocks - min(deep_blocks, shape.blocks)]


def slot_bytes(shape: Shape, dtype: str, deep_blocks: int = 0) -> int:
    """Device bytes of the offload engine's slots: SLOTS buffers, each the size of the largest streamed block's
    matrices."""
    return SLOTS * max(streamed(shape, deep_blocks), default=0) * BYTES[dtype]


def host_bytes(shape: Shape, dtype: str, deep_blocks: int = 0) -> int:
    """Host bytes of the streamed blocks: their matrices, once."""
    return sum(streamed(shape, deep_blocks)) * BYTES[dtype]


@dataclass(frozen=True)
class Footprint:
    """The terms of the estimates (in bytes) for one model shape, batch and dtype; ``deep_blocks``: how many last
    blocks a hybrid method trains by first order."""

    shape: Shape
    batch: int
    length: int
    dtype: str = "fp16"
    deep_blocks: int = 1
    quantize: str = "none"
    group_size: int = 32

    @property
    def d(self) -> int:
        return BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def deep(self) -> int:
        return min(self.deep_blocks, self.shape.blocks)

    @property
    def weights(self) -> int:
        return self.shape.params * self.d

    def transient(self, tokens: int) -> int:
        """Of a forward over ``tokens``: one block's working set or the logits, whichever is larger."""
        return max(tokens * (4 * self.shape.hidden + 2 * self.shape.ffn) * self.d, self.logits_of(tokens))

    def logits_of(self, tokens: int) -> int:
        return tokens * self.shape.vocab * (self.d + 4)  # with their float32 log-softmax

    @property
    def logits(self) -> int:
        return self.logits_of(self.tokens)

    @property
    def stored(self) -> int:
        """Activations one block keeps for the backward."""
        return self.tokens * self.shape.hidden * 17 * self.d

    @property
    def adam(self) -> int:
        """Per trained element; in 16 bits a float32 master, its gradient and the moments besides the half gradient."""
        return 3 * self.d if self.dtype == "fp32" else self.d + 4 + 4 + 8

    @property
    def adapters(self) -> int:
        return self.shape.lora * ADAPTER

    @property
    def inference(self) -> int:
        return self.weights + self.transient(self.tokens)

    @property
    def perturbed_copy(self) -> int:
        """The largest tensor once more: the perturbed copy a zeroth-order forward reads."""
        return self.shape.largest * self.d

    @property
    def perturbed_inference(self) -> int:
        return self.inference + self.perturbed_copy

    @property
    def backward(self) -> int:
        """What a backward through the whole model keeps: every block's stored activations and the logits."""
        return self.shape.blocks * self.stored + self.logits

    @property
    def lora_backprop(self) -> int:
        """The weights, the adapters with their AdamW state, a backward's activations."""
        return self.weights + self.adapters + self.backward

    @property
    def quantized_weights(self) -> int:
        """The weights of a --quantize base: codes and float16 scales (int4: and offsets) of the matrices, the rest
        in the dtype."""
        bits = int(self.quantize[3:])
        matrices = self.shape.quantizable
        per_group = 2 if bits == 8 else 4
        return matrices * bits // 8 + matrices // self.group_size * per_group + (self.shape.params - matrices) * self.d

    @property
    def quantized_inference(self) -> int:
        chunk = 5 * min(CHUNK_ELEMENTS, self.shape.largest)  # a layer's dequantized chunk: float32 and unpacked codes
        return self.quantized_weights + self.transient(self.tokens) + chunk

    @property
    def scales_step(self) -> int:
        """Zeroth order on the scales: quantized inference and the float32 update and direction of the largest
        scales."""
        return self.quantized_inference + 2 * 4 * self.shape.largest // self.group_size

    def resident(self, deep_blocks: int = 0) -> int:
        """The weights that stay on the device when the blocks but the ``deep_blocks`` last stream, with the slots."""
        return self.weights - self.host(deep_blocks) + slot_bytes(self.shape, self.dtype, deep_blocks)

    def host(self, deep_blocks: int = 0) -> int:
        return host_bytes(self.shape, self.dtype, deep_blocks)
