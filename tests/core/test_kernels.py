"""Every kernel backend against the contract of zotune.core.kernels.reference."""

import pytest
import torch

from zotune.core import kernels
from zotune.core.kernels import reference
from zotune.core.rng import philox4x32

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
DISTRIBUTIONS = ["gaussian", "rademacher"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _backends():
    names = []
    for name in kernels.BACKENDS:
        try:
            kernels.load(name)
        except ImportError as error:
            names.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} backend: {error}")))
            continue
        names.append(name)
    return names


@pytest.fixture(params=_backends())
def backend(request):
    return kernels.load(request.param)


def close_to_reference(a, b, distribution):
    if distribution == "gaussian":
        return torch.allclose(a.double(), b.double(), rtol=0, atol=0) or bool(
            ((a.double() - b.double()).abs() <= kernels.GAUSSIAN_RTOL * (1 + b.double().abs())).all())
    return torch.equal(a, b)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_matches_known_answers(counter, key, expected):
    words = [torch.tensor([c]) for c in counter]
    assert tuple(int(x) for x in philox4x32(*words, *key)) == expected
    assert philox4x32(*counter, *key) == expected  # on Python ints too


def test_streams_are_pinned():
    # A change here breaks every saved trajectory: the Gaussian stream is zotune 0.1's.
    from zotune.core.rng import hash64

    z = torch.empty(4)
    reference.fill(z, 0, 0, hash64("param", "w"), "gaussian")
    assert torch.allclose(z, torch.tensor([0.8215214014053345, 1.002485752105713, -0.33696448802948,
                                           -0.6580892205238342]), atol=1e-6)
    r = torch.empty(8)
    reference.fill(r, 0, 0, 1, "rademacher-v1")
    assert r[:4].tolist() == [-1.0, -1.0, 1.0, -1.0]
    reference.fill(r, 0, 0, 1, "rademacher")
    assert r.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("start,n", [(0, 1), (5, 40_003), (130, 127), ((1 << 33) + 3, 1000)])
def test_fill_matches_reference(backend, distribution, start, n):
    expected, out = torch.empty(n), torch.full((n,), float("nan"))
    reference.fill(expected, start, 11, 22, distribution)
    backend.fill(out, start, 11, 22, distribution)
    assert close_to_reference(out, expected, distribution)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_any_slice_is_the_same_elements(backend, distribution):
    full = torch.empty(10_000)
    backend.fill(full, 0, 7, 99, distribution)
    for begin, end in [(0, 333), (4321, 5322), (9999, 10_000), (127, 129)]:
        part = torch.empty(end - begin)
        backend.fill(part, begin, 7, 99, distribution)
        assert torch.equal(part, full[begin:end])


def test_moments(backend):
    z = torch.empty(400_000)
    backend.fill(z, 0, 3, 4, "gaussian")
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01
    assert abs(((z**4).mean() - 3).item()) < 0.1 and z.abs().max() > 3
    backend.fill(z, 0, 3, 4, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(z.mean().item()) < 0.01
    # neighbouring bits are independent: the lag-1 correlation of the signs is ~0
    assert abs((z[1:] * z[:-1]).mean().item()) < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_perturb_matches_reference(backend, dtype, distribution):
    weight = torch.randn(70_001, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected, out = torch.empty_like(weight), torch.empty_like(weight)
    reference.perturb(expected, weight, 17, 5, 6, distribution, 1e-2)
    backend.perturb(out, weight, 17, 5, 6, distribution, 1e-2)
    diff = (out.double() - expected.double()).abs()
    ulp = torch.finfo(dtype).eps * expected.double().abs()
    assert bool((diff <= ulp + 1e-2 * kernels.GAUSSIAN_RTOL * 7).all())  # |z| < 5.8
    assert (out != weight).float().mean() > 0.5  # it perturbed


def spacings(a, b, dtype):
    """|a - b| in spacings of ``dtype`` at the larger of the two magnitudes."""
    info = torch.finfo(dtype)
    big = torch.maximum(a.double().abs(), b.double().abs()).clamp_min(info.smallest_normal)
    return (a.double() - b.double()).abs() / (info.eps * torch.exp2(torch.floor(torch.log2(big))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("rounding", [None, 1234])
def test_update_matches_reference(backend, dtype, distribution, rounding):
    weight = torch.randn(50_003, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, out = weight.clone(), weight.clone()
    args = (3, [10, 20, 30], [0.5, -1.25, 2.0], 77, distribution, 1e-2, 0.1)
    reference.update(expected, *args, rounding)
    backend.update(out, *args, rounding)
    mismatched = (out != expected).float().mean()
    if dtype in kernels.HALF:
        # The float32 values before rounding differ by a few float32 ulps at most (Gaussian math
        # libraries, fma): a rounding decision, nearest or stochastic with the same bits, flips
        # rarely and by one spacing.
        assert bool((spacings(out, expected, dtype) <= 1).all())
        assert mismatched < 1e-3
        if rounding is not None:  # ... which tells apart round-to-nearest and other rounding bits
            for other in (None, rounding + 1):
                wrong = weight.clone()
                reference.update(wrong, *args, other)
                assert (wrong != expected).float().mean() > 0.1
    else:
        spacing = 2 * torch.finfo(dtype).eps * expected.double().abs() + 1e-30
        z_error = 1e-2 * (0.5 + 1.25 + 2.0) * 7 * kernels.GAUSSIAN_RTOL if distribution == "gaussian" else 0.0
        assert bool(((out.double() - expected.double()).abs() <= spacing + z_error).all())
        if distribution == "rademacher":
            assert mismatched < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_into_is_bit_identical(backend, dtype):
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(30_011, generator=generator) * torch.logspace(-9, 3, 30_011)
    values[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    expected, out = torch.empty(30_011, dtype=dtype), torch.empty(30_011, dtype=dtype)
    reference.round_into(expected, values, 9, 8, 7)
    backend.round_into(out, values, 9, 8, 7)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    # 1 + a quarter of a spacing, and a float16 subnormal 0.3 spacings above a multiple of 2**-24
    spacing = torch.finfo(dtype).eps
    for value in (1.0 + spacing / 4, -(1.0 + spacing / 4), (5 + 0.3) * 2.0**-24):
        if dtype == torch.bfloat16 and abs(value) < 1e-6:
            continue
        values = torch.full((200_000,), value)
        out = torch.empty(200_000, dtype=dtype)
        reference.round_into(out, values, 0, 1, 99)
        assert len(out.unique()) == 2  # only the two neighbours
        assert abs(out.double().mean().item() - value) < 0.01 * abs(value) * spacing + 3e-3 * 2.0**-24
    nearest = torch.empty(10, dtype=torch.bfloat16)
    reference.round_into(nearest, torch.full((10,), 1.0 + torch.finfo(torch.bfloat16).eps / 4), 0, 1, None)
    assert nearest.eq(1.0).all()


def test_no_global_rng(backend):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    backend.fill(torch.empty(5000), 0, 1, 2, "gaussian")
    backend.update(torch.ones(5000, dtype=torch.bfloat16), 0, [1], [1.0], 2, "gaussian", 0.1, 0.0, 5)
    assert torch.equal(torch.rand(3), expected)


def test_get_picks_a_backend_per_device(monkeypatch):
    monkeypatch.delenv("ZOTUNE_KERNELS", raising=False)
    assert kernels.get("cpu").__name__.rsplit(".", 1)[1] in ("cpu", "reference")
    monkeypatch.setenv("ZOTUNE_KERNELS", "reference")
    assert kernels.get("cpu") is reference
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get("cpu", "magic")
