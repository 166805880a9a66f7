"""How much of the true diagonal curvature HiZOO's estimate recovers, as the dimension grows.

HiZOO (arXiv 2402.15173, methods.md §4) keeps a weight-sized diagonal H and, from the
three losses of a step (unperturbed and W ± eps z / sqrt(H)), updates it by

    H <- (1 - a) H + a |L+ + L- - 2 L0| / (2 eps^2) * H * z^2        (element-wise)

The scalar in front is one number for all n elements; only z_i^2 tells elements apart, so
the element-specific part of the expected update is a fraction of about 2/n of the
common part, while its noise is of the common part's size. This script measures that on
a quadratic whose diagonal Hessian h is known (log-uniform over two decades): the rank
correlation between the estimated H and h after a number of steps, for growing n, with a
in the reference code's regime (a * n held fixed; its default 1e-8 is about 1/n for a
125M-weight model). A correlation near 1 means the preconditioner knows the curvature; near
0, that H is a random rescaling and the method is MeZO with one more forward a step.

    python benchmarks/curvature_signal.py            # a few seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.argsort().argsort().double() for t in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def hizoo_estimate(n: int, steps: int, a_times_n: float, seed: int = 0, eps: float = 1e-3):
    generator = torch.Generator().manual_seed(seed)
    h = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.1), math.log(10.0), generator=generator))
    big_h = torch.ones(n, dtype=torch.float64)
    alpha = a_times_n / n
    for _ in range(steps):
        z = torch.randn(n, dtype=torch.float64, generator=generator)
        scaled = z / big_h.sqrt()
        second_difference = eps**2 * float((h * scaled * scaled).sum())  # L+ + L- - 2 L0 of 0.5 sum h w^2, exactly
        big_h = (1 - alpha) * big_h + alpha * abs(second_difference) / (2 * eps**2) * big_h * z * z
        big_h /= big_h.mean()  # the common scale is a learning-rate factor; keep the numbers in range
    return spearman(big_h, h), float(big_h.std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sizes", default="10,100,1000,10000,100000")
    parser.add_argument("--a-times-n", default="0.1,1")
    args = parser.parse_args(argv)
    print("| n | a × n | steps | rank correlation of H with the true h | spread of H (std / mean) |")
    print("|---:|---:|---:|---:|---:|")
    for n in map(int, args.sizes.split(",")):
        for a_n in map(float, args.a_times_n.split(",")):
            correlation, spread = hizoo_estimate(n, args.steps, a_n)
            shown = f"{spread:.3f}" if math.isfinite(spread) else "overflowed (one element took all)"
            print(f"| {n:,} | {a_n:g} | {args.steps} | {correlation:.3f} | {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
