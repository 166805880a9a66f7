"""The offload engine on a real GPU: pinned host buffers, three streams, events. Skipped without CUDA."""

import pytest
import torch

import zotune
from zotune.engine.blocks import find_blocks
from zotune.engine.offload import Offload

from ..conftest import assert_same, snapshot, tiny_model
from .test_offload import stacked_closure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("merge", ["step", "resample"])
def test_offloaded_run_on_the_gpu_equals_the_in_memory_one(merge):
    runs = []
    for offload in (False, True):
        model = tiny_model("llama")
        if not offload:
            model.cuda()
        optimizer = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, stacked=True, seed=2, merge=merge,
                                direction=zotune.LowRank(rank=2, interval=2))
        engine = None
        if offload:
            engine = Offload(model, [m for _, m in find_blocks(model).blocks], "cuda")
            engine.attach(optimizer)
            assert all(host.is_pinned() for block in engine.blocks for host in block.host.values())
        closure = stacked_closure(model)
        for _ in range(5):
            optimizer.step(closure)
        if engine:
            engine.flush(merge=True)
        optimizer.merge_factors()
        runs.append({name: weight.cpu() for name, weight in snapshot(model).items()})
    assert_same(*runs)
