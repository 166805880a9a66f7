"""A backend that cannot import or cannot run leaves directions to the reference, with one warning."""

import sys
import types
import warnings

import pytest
import torch

from zotune.core import kernels
from zotune.core.kernels import reference


CACHED = (kernels.load, kernels._best)  # before the tests patch load


@pytest.fixture(autouse=True)
def fresh_backends(monkeypatch):
    # the choices are cached per process: no test may see another's, nor leave its fake behind
    monkeypatch.delenv("ZOTUNE_KERNELS", raising=False)
    for fn in CACHED:
        fn.cache_clear()
    yield
    for fn in CACHED:
        fn.cache_clear()


def test_triton_too_old_to_import_falls_back(monkeypatch):
    # Triton < 3.4 has no triton.knobs: importing the backend raises AttributeError, not ImportError.
    old = types.ModuleType("triton")
    monkeypatch.setitem(sys.modules, "triton", old)
    monkeypatch.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
    monkeypatch.delitem(sys.modules, "zotune.core.kernels.cuda", raising=False)
    with pytest.raises(ImportError, match="knobs"):
        kernels.load("cuda")
    assert "cuda" not in kernels.available()
    with pytest.warns(UserWarning, match="triton is not importable") as record:
        assert kernels.get("cuda") is reference
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get("cuda") is reference


def broken_backend(monkeypatch, error):
    """A cuda backend whose every kernel raises ``error``; returns the list of its calls."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise error

    backend = types.ModuleType("zotune.core.kernels.cuda")
    for operation in ("fill", "perturb", "update", "round_into"):
        setattr(backend, operation, fail)
    real_load = kernels.load
    monkeypatch.setattr(kernels, "load", lambda name: backend if name == "cuda" else real_load(name))
    return calls


def test_first_launch_failure_falls_back_for_good(monkeypatch):
    calls = broken_backend(monkeypatch, RuntimeError("at 12:4:\nsource line\nPTX .target sm_60 unsupported"))
    expected, out = torch.empty(1000), torch.full((1000,), float("nan"))
    reference.fill(expected, 5, 1, 2, "gaussian")
    backend = kernels.get("cuda")
    with pytest.warns(RuntimeWarning, match="kernels failed") as record:
        backend.fill(out, 5, 1, 2, "gaussian")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert torch.equal(out, expected)
    weight = torch.randn(300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected_weight, out_weight = weight.clone(), weight.clone()
    reference.update(expected_weight, 0, [3], [0.5], 4, "rademacher", 1e-2, 0.0, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.get("cuda").update(out_weight, 0, [3], [0.5], 4, "rademacher", 1e-2, 0.0, 9)
    assert torch.equal(out_weight.view(torch.int16), expected_weight.view(torch.int16))
    assert len(calls) == 1  # the later call went straight to the reference
    assert kernels.get("cuda").__name__ == reference.__name__


def test_a_wrong_call_is_not_a_backend_failure(monkeypatch):
    # the contract's ValueError (unknown distribution, non-contiguous tensors) must reach the caller
    calls = broken_backend(monkeypatch, ValueError("unknown distribution 'uniform'"))
    with pytest.raises(ValueError, match="unknown distribution"):
        kernels.get("cuda").fill(torch.empty(10), 0, 1, 2, "uniform")
    assert kernels.get("cuda").__name__.endswith(".cuda") and len(calls) == 1
