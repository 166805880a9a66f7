"""Factored low-rank updates (``MeZO(merge="resample")``): W untouched between draws of V,
the same model as merging every step up to rounding, exact replay and resume."""

import pytest
import torch

import zotune
from zotune.engine.blocks import find_blocks
from zotune.engine.offload import Offload

from ..conftest import assert_same, lm_closure, snapshot, tiny_model


def optimizer_for(model, merge="resample", interval=3, stacked=False, **extra):
    return zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, seed=4, merge=merge, stacked=stacked,
                       direction=zotune.LowRank(rank=2, interval=interval), **extra)


def stacked_closure(model, seed=0):
    from ..engine.test_offload import stacked_closure as make

    return make(model, seed)


def test_matrices_keep_their_updates_as_factors_until_v_is_redrawn(family):
    model = tiny_model(family)
    optimizer = optimizer_for(model)
    factored = {n for n, p in model.named_parameters() if p.ndim == 2}
    start = snapshot(model)
    closure = lm_closure(model)
    for _ in range(3):  # steps 0-2: one draw of V
        optimizer.step(closure)
    now = snapshot(model)
    keys = set(optimizer.trajectory.factored)
    assert keys and keys <= factored
    for name in now:  # the factored matrices untouched, every other parameter updated
        assert torch.equal(now[name], start[name]) == (name in keys), name
    optimizer.step(closure)  # step 3: a new V, so the factors of steps 0-2 are written in
    assert all(not torch.equal(snapshot(model)[n], start[n]) for n in keys)


def test_the_model_is_the_eagerly_merged_one_up_to_rounding(family):
    results = {}
    for merge in ("step", "resample"):
        model = tiny_model(family)
        optimizer = optimizer_for(model, merge=merge)
        closure = lm_closure(model)
        losses = [optimizer.step(closure) for _ in range(5)]
        with torch.no_grad():
            loss = closure().item()  # through the factors, before they are merged
        optimizer.merge_factors()
        results[merge] = losses, loss, snapshot(model)
    (eager_losses, eager_loss, eager), (losses, loss, weights) = results["step"], results["resample"]
    assert losses == pytest.approx(eager_losses, rel=1e-5) and loss == pytest.approx(eager_loss, rel=1e-5)
    for name in eager:
        torch.testing.assert_close(weights[name], eager[name], rtol=1e-5, atol=1e-5)


def test_replay_and_resume_are_exact():
    model = tiny_model("opt")  # Linear layers with biases, a position embedding with an offset
    initial = snapshot(model)
    optimizer = optimizer_for(model)
    closure = lm_closure(model)
    for _ in range(4):
        optimizer.step(closure)
    state, halfway = optimizer.state_dict(), snapshot(model)
    for _ in range(3):
        optimizer.step(closure)
    optimizer.merge_factors()
    final = snapshot(model)

    resumed = tiny_model("opt")
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            param.copy_(halfway[name])
    again = optimizer_for(resumed)
    again.load_state_dict(state)  # rebuilds the factors of the current draw of V from the history
    for _ in range(3):
        again.step(lm_closure(resumed))
    again.merge_factors()
    assert_same(snapshot(resumed), final)

    replayed = tiny_model("opt")
    assert_same(snapshot(replayed), initial)
    trajectory = optimizer.trajectory
    assert trajectory.merge == "resample" and trajectory.factored
    zotune.replay(replayed.named_parameters(), trajectory.to_dict())
    assert_same(snapshot(replayed), final)


def test_weight_decay_and_substituted_matrices_are_merged_every_step():
    model = tiny_model("opt")
    groups = zotune.decay_groups(model.named_parameters(), 0.1)
    optimizer = zotune.MeZO(groups, lr=1e-2, merge="resample", direction=zotune.LowRank(interval=5))
    optimizer.step(lm_closure(model))
    assert optimizer.trajectory.factored == []  # every matrix is in the decayed group

    model = tiny_model("opt")
    optimizer = optimizer_for(model)
    optimizer.step(lm_closure(model))
    factored = set(optimizer.trajectory.factored)
    # OPT's position embedding adds an offset in its forward: perturbed by substitution, so merged eagerly
    assert "model.decoder.embed_positions.weight" not in factored
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in factored


def test_stacked_evaluation_applies_the_factors_to_rerun_layers():
    losses = {}
    for stacked in (False, True):
        model = tiny_model("opt")  # biases are perturbed by substitution: their Linear is rerun per copy
        optimizer = optimizer_for(model, stacked=stacked)
        closure = stacked_closure(model)
        losses[stacked] = [optimizer.step(closure if stacked else (lambda: closure(None))) for _ in range(4)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_offloaded_blocks_are_written_back_only_when_v_is_redrawn():
    runs = []
    for offload in (False, True):
        model = tiny_model("llama")
        optimizer = optimizer_for(model, stacked=True, interval=3)
        closure = stacked_closure(model)
        engine = None
        if offload:
            engine = Offload(model, [m for _, m in find_blocks(model).blocks], "cpu")
            engine.attach(optimizer)
            writes = []
            release = engine._release
            engine._release = lambda block: (writes.append(block.dirty), release(block))[1]
        per_step = []
        for _ in range(7):
            optimizer.step(closure)
            if offload:
                per_step.append(sum(writes))
                writes.clear()
        if offload:
            # Step t's update reaches a block when step t + 1 uploads it. V is redrawn at step 3,
            # whose update merges the factors of steps 0-2: step 4 writes both blocks back, no other.
            assert per_step == [0, 0, 0, 0, 2, 0, 0]
            engine.flush(merge=True)
        optimizer.merge_factors()
        runs.append(snapshot(model))
    assert_same(*runs)
