import json

import pytest
import torch

import zotune
from tests.conftest import assert_same, lm_closure, restore, snapshot, tiny_model


def trained(dtype, steps=5, direction="gaussian"):
    model = tiny_model("opt", dtype)
    initial = snapshot(model)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": 0.1, "direction": direction},
        {"params": no_decay, "weight_decay": 0.0, "direction": "rademacher", "lr": 5e-4},
    ]
    optimizer = zotune.MeZO(groups, lr=1e-3, n_samples=2, seed=11)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.2, total_iters=steps)
    for t in range(steps):
        optimizer.step(lm_closure(model, seed=t))
        scheduler.step()
    return model, initial, optimizer, lambda m: [
        {"params": [p for p in m.parameters() if p.dim() > 1]},
        {"params": [p for p in m.parameters() if p.dim() <= 1]},
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["gaussian", "lowrank"])
def test_replay_rebuilds_the_final_weights_bit_identically(dtype, direction, tmp_path):
    model, initial, optimizer, groups_of = trained(dtype, direction=direction)
    path = tmp_path / "trajectory.json"
    optimizer.trajectory.save(path)

    fresh = tiny_model("opt", dtype, seed=5)
    restore(fresh, initial)
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(fresh).values(), snapshot(model).values()))
    zotune.replay(groups_of(fresh), path)
    assert_same(snapshot(model), snapshot(fresh))


def test_trajectory_is_small_json(tmp_path):
    _, _, optimizer, _ = trained(torch.float32, steps=3)
    path = tmp_path / "t.json"
    optimizer.trajectory.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "zotune-trajectory/2"
    assert len(data["steps"]) == 3 and len(data["steps"][0]["seeds"]) == 2
    assert path.stat().st_size < 20_000
    assert zotune.Trajectory.load(path) == optimizer.trajectory


def test_replay_refuses_other_parameters():
    _, _, optimizer, _ = trained(torch.float32, steps=1)
    other = tiny_model("gpt2")
    with pytest.raises(ValueError, match="same groups"):
        zotune.replay(other.parameters(), optimizer.trajectory)
    with pytest.raises(ValueError, match="not a zotune trajectory"):
        zotune.replay(other.parameters(), {"format": "something-else"})


def test_named_trajectory_records_names():
    model = tiny_model("gpt2")
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3)
    optimizer.step(lm_closure(model))
    assert optimizer.trajectory.keys[0][0] == "transformer.wte.weight"
    fresh = tiny_model("gpt2")
    zotune.replay(fresh.named_parameters(), optimizer.trajectory)
    assert_same(snapshot(model), snapshot(fresh))


def test_format_1_files_still_replay():
    model = tiny_model("gpt2")
    initial = snapshot(model)
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3, n_samples=2, seed=3)
    for t in range(3):
        optimizer.step(lm_closure(model, seed=t))
    recorded = optimizer.trajectory
    # what zotune 0.1 wrote: derived seeds, g per sample, coefficients g / n implied
    v1 = {"format": "zotune-trajectory/1", "keys": recorded.keys, "sizes": recorded.sizes,
          "distributions": ["gaussian"], "steps": [
              {"step": s.step, "seeds": s.seeds, "grads": s.grads, "lrs": s.lrs, "weight_decays": s.weight_decays,
               "skipped": s.skipped} for s in recorded.steps]}
    fresh = tiny_model("gpt2", seed=8)
    restore(fresh, initial)
    zotune.replay(fresh.named_parameters(), v1)
    assert_same(snapshot(model), snapshot(fresh))
    assert zotune.Trajectory.from_dict(v1).directions == [{"kind": "dense", "distribution": "gaussian"}]
