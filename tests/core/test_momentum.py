"""Momentum without a buffer: each update adds the last steps' estimates again, regenerated from their seeds."""

import pytest
import torch

import zotune
from tests.conftest import assert_replays_and_resumes, tiny_model

from .test_optim import Linear, z_of


def test_an_update_is_the_heavy_ball_sum_over_the_window():
    a = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = Linear(a)
    start = model.p.detach().clone()
    beta, window, lr = 0.5, 3, 1e-2
    optimizer = zotune.MeZO(model.parameters(), lr=lr, eps=1e-3, momentum=beta, momentum_window=window)
    for _ in range(5):
        optimizer.step(model)
    steps = optimizer.trajectory.steps
    expected = start.clone()
    for t in range(5):
        for k in range(min(window, t + 1)):
            earlier = steps[t - k]
            expected -= lr * beta**k * earlier.coefficients()[0] * z_of(earlier.seeds[0], 40).double()
    assert torch.allclose(model.p.detach(), expected, rtol=0, atol=1e-12)
    assert [len(step.echoes) for step in steps] == [0, 1, 2, 2, 2]


def test_momentum_replays_and_resumes_bit_identically(tmp_path):
    # Resumed after step 3: the echoes of steps 4-6 reach back before the resume.
    assert_replays_and_resumes(tmp_path, dict(lr=1e-2, eps=1e-2, momentum=0.9, momentum_window=4, seed=2))


def test_momentum_refuses_low_rank_directions_and_bad_values():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="low-rank"):
        zotune.MeZO(model.parameters(), lr=1e-3, direction="lowrank", momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be in"):
        zotune.MeZO(model.parameters(), lr=1e-3, momentum=1.0)
