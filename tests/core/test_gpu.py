"""CUDA checks of the core guarantees; skipped on machines without a GPU."""

import pytest
import torch

import zotune
from zotune.core import kernels
from zotune.core.kernels import reference
from tests.conftest import VOCAB, snapshot, assert_same, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def cuda_closure(model, batch=4, length=12):
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0)).cuda()
    return lambda: model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cuda_directions_match_cpu(distribution):
    cpu = torch.empty(100_003)
    reference.fill(cpu, 7, 3, 4, distribution)
    out = torch.empty(100_003, device="cuda")
    kernels.get("cuda").fill(out, 7, 3, 4, distribution)
    if distribution == "rademacher":
        assert torch.equal(out.cpu(), cpu)
    else:
        assert torch.allclose(out.cpu(), cpu, rtol=kernels.GAUSSIAN_RTOL, atol=kernels.GAUSSIAN_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["gaussian", "rademacher", "lowrank"])
def test_lr_zero_exact_on_cuda(dtype, direction):
    model = tiny_model("llama", dtype).cuda()
    before = snapshot(model)
    optimizer = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-2, direction=direction)
    for _ in range(3):
        optimizer.step(cuda_closure(model))
    assert_same(before, snapshot(model))


def test_step_peak_memory_bounded_by_forward_plus_largest_parameter():
    model = tiny_model("llama", torch.float16).cuda()
    closure = cuda_closure(model, batch=8, length=32)
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-4)
    optimizer.step(closure)  # warm-up: allocator caches, lazy init
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        closure()
    forward_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    optimizer.step(closure)
    step_peak = torch.cuda.max_memory_allocated() - base
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # one scratch, the weights' dtype
    assert step_peak <= forward_peak + largest + 1024 * 1024


def test_no_perturbation_buffer_outlives_a_cuda_step():
    # Kept buffers would add a weight copy to whatever runs between steps (LMAO's and HZO's first-order phases).
    model = tiny_model("llama").cuda()
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3, eps=1e-2)
    closure = cuda_closure(model)
    optimizer.step(closure)  # the first step also probes for reads outside the modules
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    optimizer.step(closure)
    torch.cuda.synchronize()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.memory_allocated() - before < largest
