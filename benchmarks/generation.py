"""Throughput of the direction kernels of each installed backend, as a Markdown table.

    .venv/bin/python benchmarks/generation.py [--size 16777216] [--repeats 5] [--threads N]

fill: values per second into a float32 buffer. perturb and update: GB/s-equivalent, the bytes
of the weight read plus those written (out for perturb, the weight for update) over the time.
Each figure is the median of --repeats timed calls after one untimed warm-up (numba compiles).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zotune.core import kernels


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _cases(size: int):
    out = torch.empty(size)
    for distribution in ("gaussian", "rademacher"):
        yield (f"fill {distribution}", "M values/s", size / 1e6,
               lambda b, d=distribution: b.fill(out, 0, 1, 2, d))
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(dtype)
        target = torch.empty_like(weight)
        moved = 2 * size * weight.element_size() / 1e9
        name = str(dtype).removeprefix("torch.")
        yield (f"perturb {name} gaussian", "GB/s", moved,
               lambda b, w=weight, o=target: b.perturb(o, w, 0, 1, 2, "gaussian", 1e-3))
        for seeds in (1, 2):
            rounding = 7 if dtype == torch.bfloat16 else None
            label = f"update {name} gaussian, {seeds} seed{'s' * (seeds > 1)}" + (", stochastic" if rounding else "")
            yield (label, "GB/s", moved,
                   lambda b, w=weight, s=seeds, r=rounding: b.update(w, 0, list(range(1, s + 1)), [0.5] * s, 2,
                                                                    "gaussian", 1e-6, 0.0, r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1 << 24, help="elements (default 16M)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="numba and torch threads (default: all)")
    parser.add_argument("--backends", nargs="*", default=["reference", "cpu"])
    args = parser.parse_args()
    backends = []
    for name in args.backends:
        try:
            kernels.load(name)
        except ImportError as error:
            print(f"{name}: not installed ({error})")
            continue
        backends.append(name)
    if args.threads:
        torch.set_num_threads(args.threads)
        if "cpu" in backends:
            import numba

            numba.set_num_threads(args.threads)
    # (column, module, its Gaussian path): the cpu backend twice when it has both paths
    columns = [(name, kernels.load(name)) for name in backends]
    print(f"size {args.size:,}, threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| kernel | unit | " + " | ".join(column for column, _ in columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for label, unit, amount, call in _cases(args.size):
        rates = []
        for _, module in columns:
            rates.append(amount / _median_seconds(lambda m=module: call(m), args.repeats))
        print(f"| {label} | {unit} | " + " | ".join(f"{rate:,.1f}" for rate in rates) + " |")


if __name__ == "__main__":
    main()
