"""Sparse directions (Sparse-MeZO): z on each tensor's smallest-magnitude weights, the mask read from the weights."""

import pytest
import torch

import zotune
from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune.core.directions import Dense, Draw, Sparse, make


def test_the_perturbed_weight_moves_only_where_the_magnitude_is_small():
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    direction, draw = Sparse(fraction=0.25), Draw(0, 3, 12345)
    perturbed = direction.perturbed(weight, "w", draw, 1e-2)
    dense = Dense().perturbed(weight, "w", draw, 1e-2)
    small = weight.abs() <= weight.abs().flatten().kthvalue(round(0.25 * weight.numel())).values
    assert torch.equal(perturbed[small], dense[small]) and torch.equal(perturbed[~small], weight[~small])
    assert small.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert make(direction.spec) == direction and make("sparse") == Sparse()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_updates_the_small_weights_alone_and_replays_bit_identically(dtype, tmp_path):
    model = tiny_model("llama", dtype)
    before = snapshot(model)
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, direction=Sparse(fraction=0.5), seed=4)
    masks = {n: Sparse(fraction=0.5).mask(p) for n, p in model.named_parameters()}
    optimizer.step(lm_closure(model))
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        assert not (moved & ~masks[name]).any(), name  # nothing outside the mask changes
        assert moved.any(), name
    for seed in (1, 2):
        optimizer.step(lm_closure(model, seed=seed))
    replayed = tiny_model("llama", dtype)
    optimizer.trajectory.save(tmp_path / "trajectory.json")  # the direction's spec travels in the file
    zotune.replay(replayed.named_parameters(), tmp_path / "trajectory.json")
    assert_same(snapshot(replayed), snapshot(model))


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="fraction must be in"):
        Sparse(fraction=0.0)
