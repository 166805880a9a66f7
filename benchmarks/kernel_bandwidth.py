"""Bytes per second of the direction kernels against a plain device copy of the same tensor.

    .venv/bin/python benchmarks/kernel_bandwidth.py [--size 268435456] [--dtype fp16] [--repeats 20] [--json FILE]

Each kernel's rate is the bytes it reads plus those it writes over its time; its copy is
``target.copy_(source)`` with the kernel's output as target and a tensor shaped and typed like
its input as source (for the fills, a float32 copy; for stochastic rounding, the float32 to
``--dtype`` cast that rounds to nearest). On CUDA the time is CUDA events' (median of
--repeats calls after two warm-ups, which compile the Triton kernels); on the CPU, the clock's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

DTYPES = ("fp32", "bf16", "fp16")  # zotune.assets.models.DTYPES's names, here so that --help imports nothing


def _seconds(call, repeats: int, cuda: bool) -> float:
    import torch

    call()
    call()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _cases(backend, size: int, dtype, device):
    """(kernel, its output, a distinct copy source like its input, bytes it reads and writes, the call)."""
    import torch

    generator = torch.Generator(device).manual_seed(0)
    values = torch.randn(size, device=device, generator=generator).mul_(0.02)  # float32, like an update's result
    weight = values.to(dtype)
    scratch = weight.clone()
    direction = torch.empty(size, device=device)  # fills write float32
    rounding = 7 if dtype in (torch.bfloat16, torch.float16) else None
    width, full = weight.element_size(), values.element_size()
    for distribution in ("gaussian", "rademacher"):
        yield (f"fill {distribution}", direction, values, size * full,
               lambda d=distribution: backend.fill(direction, 0, 1, 2, d))
    yield ("perturb gaussian", scratch, weight, 2 * size * width,
           lambda: backend.perturb(scratch, weight, 0, 1, 2, "gaussian", 1e-3))
    for distribution in ("gaussian", "rademacher"):
        label = f"update {distribution}, 1 seed" + (", stochastic rounding" if rounding else "")
        yield (label, weight, scratch, 2 * size * width,
               lambda d=distribution: backend.update(weight, 0, [1], [0.5], 2, d, 1e-6, 0.0, rounding))
    if rounding:
        yield ("stochastic rounding (round_into)", weight, values, size * (full + width),
               lambda: backend.round_into(weight, values, 0, 2, rounding))


def measure(backend, size: int = 1 << 28, dtype: str = "fp16", repeats: int = 20, device: str = "cuda") -> list[dict]:
    """One row per kernel of ``backend`` (a module of zotune.core.kernels) on ``device``."""
    from zotune.assets.models import DTYPES as TORCH_DTYPES

    cuda = device.startswith("cuda")
    rows = []
    for name, target, source, moved, call in _cases(backend, size, TORCH_DTYPES[dtype], device):
        seconds = _seconds(call, repeats, cuda)
        copy_seconds = _seconds(lambda t=target, s=source: t.copy_(s), repeats, cuda)
        copied = size * (target.element_size() + source.element_size())
        rows.append({"kernel": name, "dtype": str(target.dtype).removeprefix("torch."), "elements": size,
                     "bytes": moved, "seconds": seconds, "gb_per_s": moved / seconds / 1e9,
                     "copy_bytes": copied, "copy_seconds": copy_seconds, "copy_gb_per_s": copied / copy_seconds / 1e9})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | output dtype | elements | kernel (µs) | kernel GB/s | copy (µs) | copy GB/s "
             "| kernel ÷ copy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['elements']:,} | {r['seconds'] * 1e6:,.0f} | "
                     f"{r['gb_per_s']:,.1f} | {r['copy_seconds'] * 1e6:,.0f} | {r['copy_gb_per_s']:,.1f} | "
                     f"{r['gb_per_s'] / r['copy_gb_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1 << 28, help="elements per tensor (default: 2**28)")
    parser.add_argument("--dtype", default="fp16", choices=DTYPES, help="weights dtype (default: fp16)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel, median reported")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--backend", default="cuda", choices=("cuda", "cpu", "reference"),
                        help="kernel backend: cuda (Triton, default), cpu (numba) or reference (torch)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if min(args.size, args.repeats) <= 0:
        parser.exit(2, "kernel_bandwidth: error: --size and --repeats must be positive\n")
    import torch

    from zotune.core import kernels

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, f"kernel_bandwidth: error: no CUDA device (torch {torch.__version__}); use --device cpu\n")
    try:
        backend = kernels.load(args.backend)
    except ImportError as error:
        parser.exit(2, f"kernel_bandwidth: error: the {args.backend} backend is not installed ({error})\n")
    rows = measure(backend, args.size, args.dtype, args.repeats, args.device)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
