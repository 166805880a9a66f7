import pytest
import torch
from torch import nn

import zotune
from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune.core.directions import Dense, Draw, LowRank
from zotune.core.es import ES
from zotune.core.estimate import centred_ranks, z_scores
from zotune.core.rng import derive_seed


class Target(nn.Module):
    """Reward -||p - target||²: ES must climb it."""

    def __init__(self, dim=40):
        super().__init__()
        self.target = torch.linspace(-1, 1, dim, dtype=torch.float64)
        self.p = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self):
        return -((self.p - self.target) ** 2).sum()


def test_centred_ranks_share_ties_and_span_half_each_side():
    assert centred_ranks([3.0, 1.0, 2.0, 2.0]) == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert centred_ranks([5.0, 5.0]) == [0.0, 0.0]


def test_z_scores_are_centred_and_unit_and_zero_without_spread():
    shaped = z_scores([1.0, 2.0, 3.0, 6.0])
    assert sum(shaped) == pytest.approx(0.0, abs=1e-12)
    assert sum(s * s for s in shaped) / 4 == pytest.approx(1.0)
    assert z_scores([2.0, 2.0]) == [0.0, 0.0]


@pytest.mark.parametrize("shaping", ["ranks", "zscore"])
def test_update_is_the_es_rule(shaping):
    """W <- W + lr sum_i r~_i z_i / (N sigma), with z_i = ±z_j regenerated from the step's seeds."""
    model = Target(dim=30)
    lr, sigma, population = 0.05, 0.1, 6
    optimizer = ES(model.parameters(), lr=lr, sigma=sigma, population=population, shaping=shaping, seed=3)
    start = model.p.detach().clone()
    rewards = []
    with torch.no_grad():
        zs = []
        for j in range(population // 2):
            z = Dense().perturbed(torch.zeros(30, dtype=torch.float64), "#0", Draw(3, 0, derive_seed(3, 0, j)), 1.0)
            zs.append(z)
            for sign in (1, -1):
                rewards.append(-((start + sign * sigma * z - model.target) ** 2).sum().item())
    mean_reward = optimizer.step(model)
    assert mean_reward == pytest.approx(sum(rewards) / population)
    shaped = centred_ranks(rewards) if shaping == "ranks" else z_scores(rewards)
    expected = start + lr * sum((shaped[2 * j] - shaped[2 * j + 1]) * z for j, z in enumerate(zs)) / (population * sigma)
    torch.testing.assert_close(model.p.detach(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", ["gaussian", "lowrank"])
def test_es_climbs_a_reward(direction):
    model = Target()
    optimizer = ES(model.parameters(), lr=0.05, sigma=0.05, population=8, direction=direction, seed=1)
    first = model().item()
    for _ in range(200):
        optimizer.step(model)
    assert model().item() > first / 4


def test_replay_and_resume_are_bit_identical(tmp_path):
    def reward(model, seed):
        loss = lm_closure(model, seed=seed)
        return lambda: -loss()

    options = dict(lr=1e-2, sigma=1e-3, population=4, seed=5, direction="lowrank")
    model = tiny_model("llama", dtype=torch.bfloat16)
    optimizer = ES(model.named_parameters(), **options)
    for step in range(3):
        optimizer.step(reward(model, step))
    state = optimizer.state_dict()
    for step in range(3, 6):
        optimizer.step(reward(model, step))
    optimizer.trajectory.save(tmp_path / "trajectory.json")
    replayed = tiny_model("llama", dtype=torch.bfloat16)
    zotune.replay(replayed.named_parameters(), tmp_path / "trajectory.json")
    assert_same(snapshot(replayed), snapshot(model))
    resumed = tiny_model("llama", dtype=torch.bfloat16)
    recorded = optimizer.trajectory.to_dict()
    zotune.replay(resumed.named_parameters(), {**recorded, "steps": recorded["steps"][:3]})
    again = ES(resumed.named_parameters(), **options)
    again.load_state_dict(state)
    for step in range(3, 6):
        again.step(reward(resumed, step))
    assert_same(snapshot(resumed), snapshot(model))


def _noise(direction, key, member, shape=(256, 384), base_seed=11, step=4):
    draw = Draw(base_seed, step, derive_seed(base_seed, step, member))
    return direction.perturbed(torch.zeros(shape), key, draw, 1.0).reshape(-1)


@pytest.mark.parametrize("direction", [Dense("gaussian"), Dense("rademacher"), LowRank(rank=4, interval=1)],
                         ids=["gaussian", "rademacher", "lowrank"])
def test_noise_is_uncorrelated_across_parameters_and_members(direction):
    """Distinct parameter keys, and distinct population members, draw uncorrelated noise (98,304 entries: a
    correlation's standard error is 0.003), while the same key and member draw the same noise again."""
    base = _noise(direction, "model.layers.0.mlp.up_proj.weight", 0)
    others = [_noise(direction, "model.layers.1.mlp.up_proj.weight", 0),  # another layer, same member
              _noise(direction, "model.layers.0.mlp.gate_proj.weight", 0),  # another matrix of the layer
              _noise(direction, "model.layers.0.mlp.up_proj.weight", 1),  # another member
              _noise(direction, "model.layers.0.mlp.up_proj.weight", 0, step=5)]  # another step
    for other in others:
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1].item()) < 0.02
    assert torch.equal(base, _noise(direction, "model.layers.0.mlp.up_proj.weight", 0))
    if isinstance(direction, Dense):  # no stream repeating inside a tensor (a low-rank draw shares V by design)
        half = base.numel() // 2
        assert abs(torch.corrcoef(torch.stack([base[:half], base[half:]]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("kwargs, message", [
    (dict(population=3), "even"), (dict(population=0), "even"), (dict(shaping="softmax"), "shaping")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ES(Target().parameters(), lr=0.1, **kwargs)


def test_materialized_copies_evaluate_and_train_as_per_module_ones():
    """Building each copy's whole weights once per evaluation changes where W + σz lives, not what the forward
    sees: the same rewards and the same weights, bit for bit."""
    runs = []
    for materialize in (False, True):
        model = tiny_model("llama")
        optimizer = ES(model.named_parameters(), lr=1e-2, sigma=1e-2, population=4, seed=2, materialize=materialize)
        for step in range(3):
            loss = lm_closure(model, seed=step)
            optimizer.step(lambda: -loss())
        runs.append((snapshot(model), optimizer.trajectory))
    assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    with pytest.raises(ValueError, match="stacked=False"):
        ES(tiny_model("llama").parameters(), lr=0.1, stacked=True, materialize=True)
