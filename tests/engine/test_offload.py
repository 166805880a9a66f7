"""The offload engine with the CPU as both host and device: copies instead of transfers,
the same schedule, pending updates and flushes as on a GPU."""

import pytest
import torch

import zotune
from zotune.engine.blocks import find_blocks
from zotune.engine.offload import Offload, device_of
from zotune.methods.mezo import merge_factors

from ..conftest import VOCAB, assert_same, snapshot, tiny_model


def stacked_closure(model, seed: int = 0, batch: int = 3, length: int = 10, vocab: int = VOCAB):
    """A closure for stacked evaluation: ``closure(copies)`` gives one loss per copy of the batch."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

    def closure(copies=None):
        x = (ids if copies is None else ids.repeat(copies, 1)).to(device_of(model))
        logits = model(input_ids=x).logits[:, :-1].float()
        each = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="none")
        return each.mean() if copies is None else each.view(copies, -1).mean(1)

    return closure


def blocks_of(model):
    return [module for _, module in find_blocks(model).blocks]


DIRECTIONS = {"gaussian": "gaussian", "lowrank": zotune.LowRank(rank=2, interval=2)}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
def test_offloaded_mezo_equals_in_memory_bit_for_bit(family, direction, stacked):
    runs = []
    for offload in (False, True):
        model = tiny_model(family)
        optimizer = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, direction=DIRECTIONS[direction],
                                stacked=stacked, seed=5)
        engine = Offload(model, blocks_of(model), "cpu") if offload else None
        if engine:
            engine.attach(optimizer)
        closure = stacked_closure(model)
        losses = [optimizer.step(closure) for _ in range(3)]
        if engine:
            pending = snapshot(model)
            engine.flush()
            flushed = snapshot(model)
            # The last step's update waited for the next upload: the flush is what applies it.
            assert any(not torch.equal(pending[n], flushed[n]) for n in flushed)
        runs.append((losses, snapshot(model)))
    (losses, weights), (offloaded_losses, offloaded) = runs
    assert losses == offloaded_losses
    assert_same(weights, offloaded)


def hzo_runs(device="cpu", dtype=torch.float32, **options) -> list[dict]:
    """The weights after 4 HZO steps in memory on ``device`` and with the shallow block streamed through it."""
    runs = []
    for offload in (False, True):
        model = tiny_model("llama", dtype)
        if not offload:
            model.to(device)
        hzo = zotune.HZO(model, deep_blocks=1, lr_fo=1e-2, lr_zo=1e-2, eps=1e-2, interval=2, seed=1, stacked=True,
                         **options)
        engine = None
        if offload:  # built before the move, as the CLI does: the deep block's optimizer state must follow it
            model.to(device)  # the deep block, head and norms stay; the shallow block streams
            engine = Offload(model, hzo.shallow_blocks, device)
            engine.attach(hzo.zo)
        closure = stacked_closure(model)
        for _ in range(4):
            hzo.step(closure)
        merge_factors(engine, hzo.zo)
        runs.append({name: w.cpu() for name, w in snapshot(model).items()})
    assert all(torch.isfinite(w.float()).all() for w in runs[0].values())
    return runs


@pytest.mark.parametrize("options", [{}, {"order": "joint", "estimator": "one-sided", "merge": "resample"}],
                         ids=["defaults", "joint-factored"])
def test_offloaded_hzo_equals_in_memory_bit_for_bit(options):
    assert_same(*hzo_runs(**options))


def test_one_upload_per_block_and_step_with_stacked_evaluation():
    model = tiny_model("opt")
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3, stacked=True)
    engine = Offload(model, blocks_of(model), "cpu", slots=2)
    engine.attach(optimizer)
    uploads = []
    original = engine._upload
    engine._upload = lambda block: (uploads.append(block.index) if block.slot is None else None, original(block))[1]
    closure = stacked_closure(model)
    optimizer.step(closure)  # the first step also probes for parameters read outside their modules
    uploads.clear()
    optimizer.step(closure)
    optimizer.step(closure)
    assert sorted(uploads) == [0, 0, 1, 1]


def test_blocks_live_in_host_memory_and_the_rest_on_the_device():
    model = tiny_model("llama")
    blocks = blocks_of(model)
    engine = Offload(model, blocks, "cpu")
    assert engine.device_bytes == 3 * max(sum(p.numel() * 4 for p in b.parameters() if p.ndim == 2) for b in blocks)
    assert all(p.ndim == 2 for block in engine.blocks for p in block.params)  # vectors stay on the device
    for block in engine.blocks:  # every parameter a view of the block's one host buffer
        storage = block.host[torch.float32].untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == storage for p in block.params)
    engine.close()
    before = snapshot(model)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # no hooks left: a plain model again
    assert_same(before, snapshot(model))


def test_tied_weights_cannot_be_offloaded():
    model = tiny_model("gpt2")  # lm_head is wte
    with pytest.raises(ValueError, match="outside the blocks"):
        Offload(model, [model.transformer.wte], "cpu")


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
def test_streamed_leaf_modules_are_perturbed_like_in_memory_ones(stacked):
    # The embedding and head are leaf modules: the engine binds their weights in the very call that perturbs them.
    runs = []
    for offload in (False, True):
        model = tiny_model("llama")  # untied head
        optimizer = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, stacked=stacked, seed=3)
        if offload:
            leaves = [model.model.embed_tokens, *model.model.layers, model.lm_head]
            engine = Offload(model, leaves, "cpu")
            engine.attach(optimizer)
        closure = stacked_closure(model)
        losses = [optimizer.step(closure if stacked else (lambda: closure())) for _ in range(3)]
        if offload:
            engine.flush()
        runs.append((losses, snapshot(model)))
    (losses, weights), (offloaded_losses, offloaded) = runs
    assert losses == offloaded_losses
    assert_same(weights, offloaded)


def test_embeddings_and_head_can_stream_too():
    from zotune.methods import MeZOConfig, MeZOMethod

    runs = []
    for options in ({}, {"offload": "cpu", "offload_embeddings": True, "offload_head": True}):
        model = tiny_model("llama")  # untied head
        method = MeZOMethod(model, MeZOConfig(lr_zo=1e-2, stacked=True, **options), seed=1, steps=3)
        closure = stacked_closure(model)
        for _ in range(3):
            method.step(closure)
        method.flush()
        if options:
            streamed = [block.module for block in method.engine.blocks]
            assert streamed == [model.model.embed_tokens, *model.model.layers, model.lm_head]
        runs.append(snapshot(model))
    assert_same(*runs)


def test_what_must_stay_on_the_device_is_a_user_error():
    from zotune.errors import UserError
    from zotune.methods import HZOConfig, HZOMethod, MeZOConfig, MeZOMethod

    with pytest.raises(UserError, match="tied to the input embedding"):
        MeZOMethod(tiny_model("gpt2"), MeZOConfig(offload="cpu", offload_embeddings=True))
    with pytest.raises(UserError, match="first order"):
        HZOMethod(tiny_model("llama"), HZOConfig(offload="cpu", offload_head=True, head="fo"))
