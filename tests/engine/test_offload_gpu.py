"""The offload engine on a real GPU: bit-identical to the in-memory run in fp32 and bf16,
for MeZO and HZO, and uploads and write-backs that overlap the compute. Skipped without CUDA."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zotune
from zotune.engine.offload import Offload

from ..conftest import assert_same, snapshot, tiny_model
from .test_offload import hzo_runs, stacked_closure

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def streamed(model):
    return [model.model.embed_tokens, *model.model.layers, model.lm_head]


UPDATES = {"gaussian": "step", "lowrank": "step", "lowrank-factored": "resample"}  # the update: its merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
def test_offloaded_mezo_on_cuda_equals_the_in_memory_run(dtype, update, stacked):
    runs = []
    for offload in (False, True):
        direction = "gaussian" if update == "gaussian" else zotune.LowRank(rank=2, interval=2)
        model = tiny_model("llama", dtype)  # untied head: embeddings, blocks and head all stream
        if not offload:
            model.cuda()
        optimizer = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, direction=direction, stacked=stacked,
                                merge=UPDATES[update], seed=2)
        engine = Offload(model, streamed(model), "cuda") if offload else None
        if engine:
            engine.attach(optimizer)
            assert engine.arena.pinned
            assert all(p.is_pinned() for block in engine.blocks for p in block.params)  # registered pages
        closure = stacked_closure(model)
        losses = [optimizer.step(closure if stacked else (lambda: closure())) for _ in range(5)]
        if engine:
            engine.flush(merge=True)
        optimizer.merge_factors()
        runs.append((losses, {name: w.cpu() for name, w in snapshot(model).items()}))
    (losses, weights), (offloaded_losses, offloaded) = runs
    assert losses == offloaded_losses
    assert_same(weights, offloaded)
    assert any(not torch.equal(w, tiny_model("llama", dtype).state_dict()[n]) for n, w in weights.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_hzo_on_cuda_equals_the_in_memory_run(dtype):
    # bf16: the deep block's AdamW float32 masters are made on the host and must follow it to the GPU.
    assert_same(*hzo_runs("cuda", dtype, order="joint", estimator="one-sided", merge="resample"))


def test_uploads_and_write_backs_overlap_the_compute():
    # Blocks big enough that a copy takes a while; dense directions write every block back every step.
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(config).half().eval()
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, stacked=True)
    engine = Offload(model, list(model.model.layers), "cuda")
    engine.attach(optimizer)
    closure = stacked_closure(model, batch=8, length=256, vocab=1024)
    optimizer.step(closure)  # warm-up: kernels compiled, the probe run
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        optimizer.step(closure)
        torch.cuda.synchronize()
    gpu = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = {"HtoD": [], "DtoH": []}
    kernels = []
    for event in gpu:
        span = (event.time_range.start, event.time_range.end)
        if "Memcpy HtoD" in event.name:
            copies["HtoD"].append(span)
        elif "Memcpy DtoH" in event.name:
            copies["DtoH"].append(span)
        elif not event.name.startswith(("Memcpy", "Memset")):
            kernels.append(span)

    def overlapping(spans):
        return sum(any(a < d and c < b for c, d in kernels) for a, b in spans)

    assert len(copies["HtoD"]) >= len(engine.blocks) and len(copies["DtoH"]) >= len(engine.blocks) - 1
    assert overlapping(copies["HtoD"]) >= len(engine.blocks) // 2, "uploads waited for the compute"
    assert overlapping(copies["DtoH"]) >= len(engine.blocks) // 2, "write-backs waited for the compute"
