"""The numba backend beyond the contract: bit conversions, both Gaussian paths, edges of the index space."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

cpu = pytest.importorskip("zotune.core.kernels.cpu")

from numba import njit  # noqa: E402

from zotune.core import kernels  # noqa: E402
from zotune.core.kernels import cpu_jit, reference  # noqa: E402


@njit
def _halves_to_float(h, out):
    for i in range(h.shape[0]):
        out[i] = cpu_jit._f16_to_f32(h[i])


@njit
def _floats_to_half(x, bf16, nan, out):
    for i in range(x.shape[0]):
        out[i] = cpu_jit._to_bf16(x[i], nan) if bf16 else cpu_jit._to_f16(x[i])


@njit
def _box_muller(words, out):
    cpu_jit._box_muller(words.reshape(-1, 4).T.copy().ravel(), out)  # the kernel reads word columns


def _edge_floats() -> torch.Tensor:
    """float32 bit patterns around every rounding boundary of every exponent, both signs, and random ones."""
    mantissas = [0, 1, 2, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000,
                 0x17FFF, 0x18000, 0x18001, 0x7FE000, 0x7FEFFF, 0x7FF000, 0x7FF001, 0x7FFFFF, 0x400000, 0x400001]
    exponents = torch.arange(256, dtype=torch.int64) << 23
    edges = (exponents[:, None] | torch.tensor(mantissas)).flatten()
    generator = torch.Generator().manual_seed(5)
    bits = torch.cat([edges, edges | (1 << 31), torch.randint(0, 1 << 32, (1 << 20,), generator=generator)])
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(width), b.view(width))


def test_float16_widens_exactly_like_torch():
    halves = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    out = np.empty(1 << 16, np.float32)
    _halves_to_float(halves.numpy(), out)
    assert _same_bits(torch.from_numpy(out), halves.view(torch.float16).float())  # NaNs quieted, as F16C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_to_nearest_even_like_torch(dtype):
    x = _edge_floats()
    out = np.empty(x.numel(), np.uint16)
    _floats_to_half(x.numpy(), dtype == torch.bfloat16, cpu._BF16_NAN, out)
    assert _same_bits(torch.from_numpy(out.view(np.int16)).view(dtype), x.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_edges_are_bit_identical(dtype):
    x = _edge_floats()
    expected, out = torch.empty(x.numel(), dtype=dtype), torch.empty(x.numel(), dtype=dtype)
    reference.round_into(expected, x, 12345, 6, 2**64 - 1)
    cpu.round_into(out, x, 12345, 6, 2**64 - 1)
    assert _same_bits(out, expected)


def _reference_box_muller(words: np.ndarray) -> torch.Tensor:
    """The reference's Gaussian arithmetic on given words (pairs (0, 1), (2, 3), ...)."""
    w = torch.from_numpy(words.astype(np.int64)).view(-1, 2)
    radius = torch.sqrt(-2.0 * torch.log(reference._uniform(w[:, 0])))
    theta = (2.0 * math.pi) * reference._uniform(w[:, 1])
    return torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=-1).flatten()


def test_polynomial_gaussian_within_tolerance_in_the_tails():
    generator = np.random.default_rng(0)
    words = generator.integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    # the smallest and largest uniforms (|z| up to 5.8 and down to 3e-4), and angles on a fine grid
    smallest = np.arange(1 << 14, dtype=np.uint32)
    words[0:1 << 15:2], words[1 << 15:1 << 16:2] = smallest << 9, ((1 << 23) - 1 - smallest) << 9
    words[1:1 << 16:2] = np.arange(1 << 15, dtype=np.uint32) << 17
    out = np.empty(words.size, np.float32)
    _box_muller(words, out)
    expected = _reference_box_muller(words).double()
    error = ((torch.from_numpy(out).double() - expected).abs() / (1 + expected.abs())).max().item()
    assert expected.abs().max() > 5.5 and error <= kernels.GAUSSIAN_RTOL / 4


def test_gaussian_against_the_reference():
    n, start = 300_007, 1_000_003
    expected, out = torch.empty(n), torch.empty(n)
    reference.fill(expected, start, 2**64 - 1, 2**63 + 5, "gaussian")
    cpu.fill(out, start, 2**64 - 1, 2**63 + 5, "gaussian")
    assert ((out.double() - expected.double()).abs() <= kernels.GAUSSIAN_RTOL * (1 + expected.double().abs())).all()
    weight = torch.randn(n, generator=torch.Generator().manual_seed(3))
    expected, out = weight.clone(), weight.clone()
    reference.update(expected, start, [4, 5], [1.0, -0.5], 9, "gaussian", 1e-2, 0.0, None)
    cpu.update(out, start, [4, 5], [1.0, -0.5], 9, "gaussian", 1e-2, 0.0, None)
    # lr * sum |coeffs| * the Gaussian tolerance at |z| = 6, plus an ulp of the weight
    slack = 1e-2 * 1.5 * kernels.GAUSSIAN_RTOL * 7 + 2 * torch.finfo(torch.float32).eps * expected.abs()
    assert ((out - expected).abs() <= slack).all()


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "rademacher-v1"])
def test_threads_and_pieces_agree(distribution):
    # the parallel path (over cpu.SERIAL elements) against pieces that each run serially
    n, start = 5 * cpu.SERIAL + 77, 3 * cpu.TILE - 5
    whole = torch.empty(n)
    cpu.fill(whole, start, 8, 9, distribution)
    for begin in range(0, n, 40_000):
        piece = torch.empty(min(40_000, n - begin))
        cpu.fill(piece, start + begin, 8, 9, distribution)
        assert torch.equal(piece, whole[begin:begin + piece.numel()])
    weight = torch.randn(n, generator=torch.Generator().manual_seed(4)).bfloat16()
    updated, pieces = weight.clone(), weight.clone()
    cpu.update(updated, start, [1, 2], [0.3, -0.7], 9, distribution, 1e-2, 0.01, 11)
    for begin in range(0, n, 40_000):
        cpu.update(pieces[begin:begin + 40_000], start + begin, [1, 2], [0.3, -0.7], 9, distribution, 1e-2, 0.01, 11)
    assert _same_bits(updated, pieces)


@pytest.mark.parametrize("distribution,per_block", [("gaussian", 4), ("rademacher", 128), ("rademacher-v1", 4)])
def test_counter_carries_into_its_high_word(distribution, per_block):
    start, n = per_block * (1 << 32) - 3000, 6001
    expected, out = torch.empty(n), torch.empty(n)
    reference.fill(expected, start, 1, 2, distribution)
    cpu.fill(out, start, 1, 2, distribution)
    tolerance = kernels.GAUSSIAN_RTOL * (1 + expected.abs()) if distribution == "gaussian" else 0
    assert ((out - expected).abs() <= tolerance).all()
    values = torch.randn(n, generator=torch.Generator().manual_seed(6))
    expected, out = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    reference.round_into(expected, values, 8 * (1 << 32) - 3000, 3, 4)  # rounding blocks carry too
    cpu.round_into(out, values, 8 * (1 << 32) - 3000, 3, 4)
    assert _same_bits(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rounding", [None, 21])
def test_non_finite_and_signed_zero_weights(dtype, rounding):
    weight = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1.0, -1e-6] * 300).to(dtype)
    for distribution in ("rademacher", "rademacher-v1"):
        for decay in (0.0, 0.1):
            expected, out = weight.clone(), weight.clone()
            args = (5, [3], [0.0], 4, distribution, 0.5, decay, rounding)
            reference.update(expected, *args)
            cpu.update(out, *args)
            assert _same_bits(out, expected)
        expected, out = torch.empty_like(weight), torch.empty_like(weight)
        reference.perturb(expected, weight, 5, 3, 4, distribution, 0.25)
        cpu.perturb(out, weight, 5, 3, 4, distribution, 0.25)
        assert _same_bits(out, expected)


def test_parameters_empty_tensors_and_errors():
    weight = torch.nn.Parameter(torch.randn(5000).bfloat16())
    expected = weight.detach().clone()
    reference.update(expected, 0, [1], [1.0], 2, "rademacher", 0.1, 0.0, 3)
    cpu.update(weight, 0, [1], [1.0], 2, "rademacher", 0.1, 0.0, 3)
    assert _same_bits(weight.detach(), expected)
    cpu.fill(torch.empty(0), 5, 1, 2, "gaussian")
    cpu.update(torch.empty(0, dtype=torch.bfloat16), 5, [1], [1.0], 2, "gaussian", 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="unknown distribution"):
        cpu.fill(torch.empty(3), 0, 1, 2, "uniform")
    with pytest.raises(TypeError, match="float32"):
        cpu.fill(torch.empty(3, dtype=torch.bfloat16), 0, 1, 2, "gaussian")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_kernels_leave_torch_thread_count_alone(threads):
    """torchrun gives each process OMP_NUM_THREADS=1; numba's OpenMP pool must not raise it
    (two processes on two cores would each run torch on two threads)."""
    code = ("import torch; from zotune.core.kernels import cpu; w = torch.zeros(1 << 20); "
            "before = torch.get_num_threads(); cpu.update(w, 0, [1], [1.0], 7, 'gaussian', 0.1, 0.0, None); "
            "print(before, torch.get_num_threads(), bool(w.abs().sum() > 0))")
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [threads, threads, "True"]
