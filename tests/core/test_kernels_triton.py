"""The Triton backend's own pieces: Philox in Triton integer ops, far streams, int64 offsets, one compile."""

import contextlib
import types

import pytest
import torch

from zotune.core import kernels
from zotune.core.kernels import reference
from zotune.core.rng import MASK32, MASK64, hash64, philox4x32, split64

try:
    cuda = kernels.load("cuda")
except ImportError as error:
    pytest.skip(f"cuda backend: {error}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cpu" if cuda._INTERPRET else "cuda"
# Random123's known answers as (first block, seed, key): counter = (block lo, block hi, key lo, key hi).
KAT = [
    (0, 0, 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (MASK64, MASK64, MASK64, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (0x85A308D3_243F6A88, 0x299F31D0_A4093822, 0x03707344_13198A2E, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
BIG_SEEDS = [0, 1, MASK32, 1 << 32, (1 << 63) + 12345, MASK64, hash64("seed", 3)]


@triton.jit
def _philox_words(out, p, M: tl.constexpr):
    first = cuda._u64(p, 0).to(tl.int64, bitcast=True)
    words = cuda._philox(first, M, cuda._word(p, 2), cuda._word(p, 3), cuda._word(p, 4), cuda._word(p, 5))
    for j in tl.static_range(4):
        tl.store(out + tl.arange(0, M) * 4 + j, words[j].to(tl.int64))


def triton_philox(first: int, seed: int, key: int, blocks: int = 4) -> list[tuple[int, ...]]:
    out = torch.zeros(blocks * 4, dtype=torch.int64, device=DEVICE)
    _philox_words[(1,)](out, cuda._pack(first, seed, key), blocks)
    return [tuple(row) for row in out.view(blocks, 4).tolist()]


def python_philox(block: int, seed: int, key: int) -> tuple[int, ...]:
    block &= MASK64
    return philox4x32(block & MASK32, block >> 32, *split64(key), *split64(seed))


@pytest.mark.parametrize("first,seed,key,expected", KAT)
def test_philox_known_answers(first, seed, key, expected):
    assert triton_philox(first, seed, key, 1)[0] == expected


@pytest.mark.parametrize("first", [0, (1 << 32) - 2, (1 << 40) + 7, (1 << 62) + 3, MASK64 - 1])
def test_philox_matches_python_ints(first):
    # blocks crossing 2**32 and 2**64 (wrapping), 64-bit seeds and keys with both halves set
    for seed, key in zip(BIG_SEEDS, reversed(BIG_SEEDS)):
        expected = [python_philox(first + i, seed, key) for i in range(4)]
        assert triton_philox(first, seed, key) == expected


def close(a, b, distribution):
    if distribution == "gaussian":
        return bool(((a.double() - b.double()).abs() <= kernels.GAUSSIAN_RTOL * (1 + b.double().abs())).all())
    return torch.equal(a, b)


@pytest.mark.parametrize("distribution,start", [("gaussian", ((1 << 34) + 5) * 4 + 1),
                                                ("rademacher", ((1 << 33) + 1) * 128 + 77),
                                                ("rademacher-v1", (1 << 36) * 4 + 2)])
def test_fill_beyond_block_2_32(distribution, start):
    seed, key = (1 << 63) + 99, MASK64 - 5
    expected, out = torch.empty(300), torch.full((300,), float("nan"))
    reference.fill(expected, start, seed, key, distribution)
    cuda.fill(out, start, seed, key, distribution)
    assert close(out, expected, distribution)


def test_int64_offsets(monkeypatch):
    monkeypatch.setattr(cuda, "_INT32_LIMIT", 0)  # the path taken by tensors of 2**31 elements and more
    weight = torch.randn(3000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    expected, out = weight.clone(), weight.clone()
    args = ((1 << 33) + 3, [5, 6], [0.5, -2.0], 8, "rademacher", 1e-2, 0.1, 42)
    reference.update(expected, *args)
    cuda.update(out, *args)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    z, expected_z = torch.empty(3000), torch.empty(3000)
    cuda.fill(z, 77, 1, 2, "gaussian")
    reference.fill(expected_z, 77, 1, 2, "gaussian")
    assert close(z, expected_z, "gaussian")


def test_update_without_draws_is_decay_and_rounding():
    weight = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    expected, out = weight.clone(), weight.clone()
    reference.update(expected, 0, [], [], 1, "gaussian", 0.5, 0.1, 7)
    cuda.update(out, 0, [], [], 1, "gaussian", 0.5, 0.1, 7)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.skipif(not cuda._INTERPRET, reason="compiled, libdevice's Gaussian may flip a rounding: test_kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_interpreted_stochastic_rounding_is_bit_identical(dtype, distribution):
    # The interpreter computes the Gaussian with torch's math: every rounding bit must agree.
    weight = torch.randn(20_000, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected, out = weight.clone(), weight.clone()
    args = (77, [10, 20], [0.5, -1.25], 3, distribution, 1e-2, 0.1, 1234)
    reference.update(expected, *args)
    cuda.update(out, *args)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_one_compiled_kernel_for_any_scalars():
    # Triton specialises each tuple element on its value; the packing must hide every value
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("triton's specialisation hook moved")
    values = [0, 1, 16, 2**31, (1 << 32) + 16, (1 << 63) + 1, MASK64]
    specs = {repr(native_specialize_impl(BaseBackend, cuda._pack(v, -v, float(v), 1.0 / (v + 1)), False, True, True))
             for v in values}
    assert len(specs) == 1, specs


def test_launch_on_the_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device: tensors on cuda:1 while cuda:0 is current must switch to 1
    guard = cuda._device_of(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(cuda._device_of(torch.empty(1)), torch.cuda.device)
    events = []

    @contextlib.contextmanager
    def device_of(tensor):
        events.append("enter")
        yield
        events.append("exit")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append("launch")

    monkeypatch.setattr(cuda, "_device_of", device_of)
    monkeypatch.setattr(cuda, "_kernel", Kernel())
    cuda.fill(torch.empty(10, device=DEVICE), 0, 1, 2, "gaussian")
    assert events == ["enter", "launch", "exit"]
