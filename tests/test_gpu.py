"""CUDA checks of the core guarantees; skipped on machines without a GPU."""

import pytest
import torch

import zotune
from zotune import directions

from .conftest import VOCAB, snapshot, assert_same, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def cuda_closure(model, batch=4, length=12):
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0)).cuda()
    return lambda: model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("distribution", directions.DISTRIBUTIONS)
def test_cuda_directions_match_cpu(distribution):
    cpu = directions.direction(3, 4, 100_003, start=7, distribution=distribution)
    out = torch.empty(100_003, device="cuda")
    directions.fill(out, 3, 4, start=7, distribution=distribution)
    if distribution == "rademacher":
        assert torch.equal(out.cpu(), cpu)
    else:
        assert torch.allclose(out.cpu(), cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_exact_on_cuda(dtype):
    model = tiny_model("llama", dtype).cuda()
    before = snapshot(model)
    optimizer = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-2)
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
    largest = max(p.numel() for p in model.parameters()) * 4  # scratch is computed in fp32
    chunk_slack = 3 * directions.CHUNK * 4
    assert step_peak <= forward_peak + largest + chunk_slack
