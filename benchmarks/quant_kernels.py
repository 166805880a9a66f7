"""CPU matmul of weight-only int8/int4 layers: zotune's own against torch's fused ops and maintained libraries.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_kernels.py [--repeats 10] [--contended] [--json FILE]

For the linear shapes of SmolLM2-135M (576→576, 576→192, 576→1536 and 1536→576 on 512 rows of input,
a batch of 8 × 64 tokens; the tied output layer 576→49152 on 8 rows), each setting computes
y = x @ Wᵀ with float32 activations on one thread, and the table gives its median time over
--repeats calls (after two warm-ups) over that of float32 ``F.linear`` called in turn with it.
torch's fused int8/int4 CPU ops also run with bfloat16 activations (cast in and out inside the
timed call), their only vectorized path on a CPU without AVX-512. Per setting it also records:

- error: max |y − y_fp32| / max |y_fp32|, the worst over the shapes;
- bytes: what the quantized weights of the five matrices take as stored;
- (a) scales: whether the scales the kernel reads are a plain float tensor, per group, that an
  in-place change reaches the output through (QZO perturbs zotune's scales in place);
- (b) backward: whether a gradient reaches the input (LoRA adapters on top train by first order);
- (c) CUDA: whether the same path runs on CUDA, from the library's documentation (not measured here);
- determinism: whether two calls on the same input give the same bits.

Libraries are optional: ``runs/quantlibs`` is put on ``sys.path`` when it exists (installed there with
``pip install --no-deps --target runs/quantlibs torchao optimum-quanto hqq bitsandbytes termcolor einops``
so that the project's torch is never replaced), and a setting that fails to import or to run is
recorded with its reason. Weights are Gaussian (std 0.02, like the model's initialisation), not the
model's, so the errors compare the settings rather than predict the model's loss.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ROOT / "runs" / "quantlibs"
GROUP = 32  # zotune's default group size, also llama.cpp's Q8_0/Q4_0 block
SHAPES = (  # (name, in, out, rows of input)
    ("576→576", 576, 576, 512),
    ("576→192", 576, 192, 512),
    ("576→1536", 576, 1536, 512),
    ("1536→576", 1536, 576, 512),
    ("576→49152", 576, 49152, 8),
)
DISTRIBUTIONS = ("torchao", "optimum-quanto", "hqq", "bitsandbytes")


@dataclass
class Layer:
    """One quantized matrix as a setting stores it: its forward, the tensors that hold it, and the
    scale tensor its kernel reads (None where there is none to reach)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    stored: tuple
    scales: torch.Tensor | None
    per_group: bool


@dataclass(frozen=True)
class Setting:
    name: str
    build: Callable[[torch.Tensor], Layer]
    cuda: str
    same_codes_as: str | None = None  # a zotune setting whose codes and scales this one runs unchanged


@dataclass
class Row:
    name: str
    seconds: dict = field(default_factory=dict)
    relative: dict = field(default_factory=dict)
    error: float | None = None
    error_vs_zotune: float | None = None
    bytes: int = 0
    scales_trainable: str = ""
    backward: str = ""
    deterministic: bool | None = None
    cuda: str = ""
    failure: str | None = None


def stored_bytes(*tensors) -> int:
    """Bytes of the tensors, looking inside tensor subclasses (torchao's, quanto's) at what they hold."""
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            total += stored_bytes(*(getattr(tensor, name) for name in names))
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def linear_of(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def fp32(weight):
    return Layer(lambda x: torch.nn.functional.linear(x, weight), (weight,), None, False)


def zotune(bits: int):
    def build(weight):
        from zotune.core.quant import QuantizedLinear, QuantizedWeight, layout_of

        qweight = QuantizedWeight.of(weight, layout_of(f"int{bits}", GROUP))
        return Layer(QuantizedLinear(qweight), (qweight.codes, qweight.scales, qweight.offsets), qweight.scales.data,
                     True)
    return build


def torch_int8pack(activations: torch.dtype):
    """The fused op takes one scale per output row only: zotune's per-group int8 cannot run through it as is.
    Its scales must be in the activations' dtype; on an AVX2 CPU only bfloat16 takes a vectorized path."""
    def build(weight):
        scales = weight.abs().amax(1) / 127
        codes = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        scales = scales.to(activations)
        return Layer(lambda x: torch.ops.aten._weight_int8pack_mm(x.to(activations), codes, scales).float(),
                     (codes, scales), scales, False)
    return build


def torch_int4pack(activations: torch.dtype):
    """zotune's int4 codes, scales and offsets in the CPU tinygemm layout. The kernel computes
    (code − 8)·scale + zero, so zero = offset + 8·scale gives zotune's scale·code + offset, exactly in
    float32 and rounded to bfloat16 otherwise (scales and zeros must be in the activations' dtype)."""
    def build(weight):
        from zotune.core.quant import QuantizedWeight, layout_of, unpack_int4

        qweight = QuantizedWeight.of(weight, layout_of("int4", GROUP))
        codes = unpack_int4(qweight.codes).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # innerKTiles is unused on the CPU
        scales, offsets = qweight.scales.float(), qweight.offsets.float()
        scale_and_zero = torch.stack((scales, offsets + 8 * scales), -1).transpose(0, 1).contiguous().to(activations)
        return Layer(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(activations), packed, GROUP,
                                                                          scale_and_zero).float(),
                     (packed, scale_and_zero), scale_and_zero[..., 0], True)
    return build


def torchao_int8(per_group: bool):
    def build(weight):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup, PerRow

        layer = linear_of(weight)
        quantize_(layer, Int8WeightOnlyConfig(granularity=PerGroup(GROUP) if per_group else PerRow()))
        return Layer(layer, (layer.weight,), layer.weight.scale, per_group)
    return build


def torchao_int4(weight):
    # torchao's Int4WeightOnlyConfig formats are CUDA/XPU kernels; its CPU tinygemm layout is the prototype one.
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    layer = linear_of(weight)
    quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=GROUP))
    return Layer(layer, (layer.weight,), layer.weight.scale_and_zero[..., 0], True)


def quanto(bits: int):
    def build(weight):
        from optimum.quanto import freeze, qint4, qint8, quantize

        model = nn.Sequential(linear_of(weight))  # quantize() replaces children, not the module it is given
        quantize(model, weights=qint8 if bits == 8 else qint4)
        if bits == 4:
            model[0].weight_group_size = GROUP  # quanto picks 96 or 128 for these rows; compare like with like
        freeze(model)
        qweight = model[0].weight
        return Layer(model[0], (qweight,), qweight._scale, bits == 4)
    return build


def hqq(bits: int):
    def build(weight):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        layer = HQQLinear(linear_of(weight), BaseQuantizeConfig(nbits=bits, group_size=GROUP),
                          compute_dtype=torch.float32, device="cpu")
        return Layer(layer, (layer.W_q, layer.meta["scale"], layer.meta["zero"]), layer.meta["scale"], True)
    return build


def bnb_int8(weight):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")  # the move is what quantizes Int8Params
    return Layer(layer, (layer.weight.data, layer.weight.SCB), layer.weight.SCB, False)


def bnb_nf4(weight):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
    # Uncompressed statistics keep the block scales (absmax) a float32 tensor, as zotune's are.
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=GROUP,
                                     compress_statistics=False)
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    return Layer(layer, (layer.weight.data, state.absmax, state.code), state.absmax, True)


ZOTUNE_INT4 = "zotune int4 g32 (dequant+F.linear)"
SETTINGS = (
    Setting("fp32 F.linear", fp32, "yes"),
    Setting("zotune int8 g32 (dequant+F.linear)", zotune(8), "yes (plain torch)"),
    Setting(ZOTUNE_INT4, zotune(4), "yes (plain torch)"),
    Setting("torch _weight_int8pack_mm per-row, fp32 act", torch_int8pack(torch.float32),
            "no (CPU, MPS, XPU kernels)"),
    Setting("torch _weight_int8pack_mm per-row, bf16 act", torch_int8pack(torch.bfloat16),
            "no (CPU, MPS, XPU kernels)"),
    Setting("torch _weight_int4pack_mm_for_cpu g32, fp32 act", torch_int4pack(torch.float32),
            "other op: _weight_int4pack_mm, bf16, other packing", ZOTUNE_INT4),
    Setting("torch _weight_int4pack_mm_for_cpu g32, bf16 act", torch_int4pack(torch.bfloat16),
            "other op: _weight_int4pack_mm, bf16, other packing", ZOTUNE_INT4),
    Setting("torchao int8 weight-only per-row", torchao_int8(False), "yes"),
    Setting("torchao int8 weight-only g32", torchao_int8(True), "yes"),
    Setting("torchao int4 weight-only g32 (CPU prototype)", torchao_int4,
            "other config: Int4WeightOnlyConfig, bf16"),
    Setting("quanto qint8 (per-row)", quanto(8), "yes"),
    Setting("quanto qint4 g32", quanto(4), "yes"),
    Setting("hqq 8-bit g32", hqq(8), "yes (its main target)"),
    Setting("hqq 4-bit g32", hqq(4), "yes (its main target)"),
    Setting("bitsandbytes Linear8bitLt (per-row)", bnb_int8, "yes (its main target)"),
    Setting("bitsandbytes Linear4bit nf4 b32", bnb_nf4, "yes (its main target)"),
)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def seconds(call, baseline, repeats: int) -> tuple[float, float]:
    """Median times of ``call`` and of ``baseline``, called in turn: other jobs on the cores then slow
    both alike, where timing one setting after another would credit the load to whichever ran during it."""
    for _ in range(2):
        call()
        baseline()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for run, into in ((call, times[0]), (baseline, times[1])):
            begin = time.perf_counter()
            run()
            into.append(time.perf_counter() - begin)
    return statistics.median(times[0]), statistics.median(times[1])


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).abs().max() / reference.abs().max()).item()


def scales_fact(layer: Layer, x: torch.Tensor) -> str:
    """Perturbs the scales in place and checks that the output moves, then that restoring them restores it."""
    if layer.scales is None:
        return "no: no scale tensor"
    if type(layer.scales) is not torch.Tensor or not layer.scales.is_floating_point():
        return f"no: {type(layer.scales).__name__} of {layer.scales.dtype}"
    with torch.no_grad():
        before = layer.forward(x)
        saved = layer.scales.clone()
        layer.scales.mul_(1.25)
        moved = not torch.equal(layer.forward(x), before)
        layer.scales.copy_(saved)
        restored = torch.equal(layer.forward(x), before)
    if not (moved and restored):
        return "no: an in-place change does not reach the output"
    return "yes" if layer.per_group else "no: per-row scales only"


def backward_fact(layer: Layer, x: torch.Tensor, weight: torch.Tensor) -> str:
    inputs = x.clone().requires_grad_(True)
    try:
        layer.forward(inputs).sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return f"no: {one_line(error)}"
    if inputs.grad is None:
        return "no: no gradient reaches the input"
    expected = weight.sum(0).expand_as(inputs)
    return f"yes (grad err {relative_error(inputs.grad, expected):.1e})"


def measure(setting: Setting, cases: list, outputs: dict, repeats: int) -> Row:
    row = Row(setting.name, cuda=setting.cuda)
    errors, versus = [], []
    for index, (shape, weight, x, reference) in enumerate(cases):
        try:
            layer = setting.build(weight)
            with torch.no_grad():
                y = layer.forward(x)
                mine, fp32_time = seconds(lambda: layer.forward(x), lambda: torch.nn.functional.linear(x, weight),
                                          repeats)
                row.seconds[shape], row.relative[shape] = mine, mine / fp32_time
                if index == 0:
                    row.deterministic = torch.equal(layer.forward(x), y)
        except Exception as error:  # noqa: BLE001 - a library that fails is a result, not a crash
            row.failure = f"{shape}: {one_line(error)}"
            break
        outputs[setting.name, shape] = y
        errors.append(relative_error(y, reference))
        if setting.same_codes_as:
            versus.append(relative_error(y, outputs[setting.same_codes_as, shape]))
        row.bytes += stored_bytes(*layer.stored)
        if index == 0:
            row.scales_trainable = scales_fact(layer, x)
            row.backward = backward_fact(layer, x, weight)
    row.error = max(errors) if errors else None
    row.error_vs_zotune = max(versus) if versus else None
    return row


def cases() -> list:
    generator = torch.Generator().manual_seed(0)
    made = []
    for shape, inputs, outputs, rows in SHAPES:
        weight = torch.randn(outputs, inputs, generator=generator).mul_(0.02)
        x = torch.randn(rows, inputs, generator=generator)
        made.append((shape, weight, x, torch.nn.functional.linear(x, weight)))
    return made


def versions() -> dict:
    found = {"torch": torch.__version__}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    simd = sorted(flag for flag in flags if flag.startswith(("avx", "amx")) or "vnni" in flag)
    return dict(cpu=model, cores=os.cpu_count(), simd=simd, python=platform.python_version())


def table(rows: list[Row]) -> str:
    shapes = [shape for shape, *_ in SHAPES]
    header = ["setting", *(f"{shape} ×fp32" for shape in shapes), "error", "Δ zotune", "MiB",
              "(a) scales", "(b) backward", "(c) CUDA", "det.", "failure"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.name]
        for shape in shapes:
            if shape not in row.seconds:
                cells.append("—")
            elif row is rows[0]:
                cells.append(f"{row.relative[shape]:.2f} ({row.seconds[shape] * 1e3:.1f} ms)")
            else:
                cells.append(f"{row.relative[shape]:.2f}")
        cells += [f"{row.error:.1e}" if row.error is not None else "—",
                  f"{row.error_vs_zotune:.0e}" if row.error_vs_zotune is not None else "—",
                  f"{row.bytes / 2**20:.1f}" if row.bytes else "—",
                  row.scales_trainable or "—", row.backward or "—", row.cuda,
                  {True: "yes", False: "no", None: "—"}[row.deterministic], row.failure or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contended", action="store_true", help="other jobs shared the cores during the run")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quant_kernels.json")
    args = parser.parse_args()
    if LIBRARIES.is_dir():
        sys.path.insert(0, str(LIBRARIES))
    torch.set_num_threads(args.threads)
    made = cases()
    outputs: dict = {}
    rows = []
    for setting in SETTINGS:
        rows.append(measure(setting, made, outputs, args.repeats))
        print(f"measured {setting.name}", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(
        machine=machine(), versions=versions(), threads=torch.get_num_threads(), repeats=args.repeats,
        contended=args.contended, group_size=GROUP,
        shapes=[dict(name=name, in_features=i, out_features=o, rows=r) for name, i, o, r in SHAPES],
        rows=[vars(row) for row in rows]), indent=1, ensure_ascii=False) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
