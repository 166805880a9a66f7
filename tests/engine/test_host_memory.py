"""The offloaded weights' host memory: exactly their size, page-locked by registration."""

import gc

import pytest
import torch

from zotune.engine.host_memory import HostArena
from zotune.engine.offload import Offload, device_of

from ..conftest import tiny_model


class FakeRuntime:
    """Stands in for ``torch.cuda.cudart()``: records registrations; refuses from call ``refuse_at`` on."""

    def __init__(self, refuse_at=None):
        self.registered, self.unregistered, self.refuse_at = [], [], refuse_at

    def cudaHostRegister(self, pointer, size, flags):
        if self.refuse_at is not None and len(self.registered) >= self.refuse_at:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append((pointer, size))
        return 0

    def cudaHostUnregister(self, pointer):
        self.unregistered.append(pointer)
        return 0


def test_an_arena_registers_exactly_its_bytes_once_per_dtype_and_lets_go_when_dropped(monkeypatch):
    runtime = FakeRuntime()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: runtime)
    # 1.23e9 bytes of fp16 would take 2 GiB from the caching host allocator; registered, it takes what it is.
    arena = HostArena({torch.float16: 1000_003, torch.float32: 7})
    assert arena.pin() and arena.pinned
    assert sorted(size for _, size in runtime.registered) == [28, 2000_006]
    assert arena.nbytes == 2000_006 + 28
    pointers = sorted(pointer for pointer, _ in runtime.registered)
    del arena
    gc.collect()
    assert sorted(runtime.unregistered) == pointers


def test_a_refused_registration_warns_once_and_undoes_the_others(monkeypatch):
    runtime = FakeRuntime(refuse_at=1)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: runtime)
    arena = HostArena({torch.float16: 100, torch.float32: 100})
    with pytest.warns(UserWarning, match="ulimit -l") as caught:
        assert not arena.pin()
    assert len(caught) == 1 and not arena.pinned
    assert runtime.unregistered == [pointer for pointer, _ in runtime.registered]


def test_the_engine_keeps_every_block_in_one_arena_of_exactly_the_weights_size():
    model = tiny_model("llama")
    blocks = [model.model.embed_tokens, *model.model.layers]
    weights = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if p.ndim == 2)
    engine = Offload(model, blocks, "cpu")
    assert engine.host_bytes == weights
    storages = {p.untyped_storage().data_ptr() for block in engine.blocks for p in block.params}
    assert storages == {engine.arena.flats[torch.float32].untyped_storage().data_ptr()}


def test_a_model_computes_where_its_engine_streams_to():
    # The embedding lives in host memory between forwards: its device is not the model's. A "meta" device stands
    # in for a GPU: what the engine left resident is put there.
    model = tiny_model("llama")
    Offload(model, [model.model.embed_tokens, *model.model.layers], "cpu")
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not getattr(p, "_zotune_streamed", False):
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"))
    assert next(model.parameters()).device.type == "cpu"  # the embedding: where the scorer used to send the ids
    assert device_of(model).type == "meta"
    assert device_of(tiny_model("llama")).type == "cpu"
