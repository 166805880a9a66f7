"""Normalised updates: each update divided by the RMS of the recent projected gradients, from the step records."""

import math

import pytest
import torch

import zotune
from tests.conftest import assert_replays_and_resumes, tiny_model

from .test_optim import Linear


def test_each_update_is_divided_by_the_rms_of_the_window():
    model = Linear(torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    optimizer = zotune.MeZO(model.parameters(), lr=1e-2, eps=1e-3, n_samples=2, normalize_window=3)
    for _ in range(5):
        optimizer.step(model)
    steps = optimizer.trajectory.steps
    for t, step in enumerate(steps):
        recent = [g for earlier in steps[max(0, t - 2): t + 1] for g in earlier.grads]
        rms = math.sqrt(sum(g * g for g in recent) / len(recent))
        assert step.coeffs == pytest.approx([g / 2 / rms for g in step.grads], rel=1e-12)


def test_a_jump_in_the_gradient_moves_the_weights_less_than_it_would_unnormalised():
    model = Linear(torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    optimizer = zotune.MeZO(model.parameters(), lr=1e-2, eps=1e-3, normalize_window=4)
    for _ in range(3):
        optimizer.step(model)
    model.a.mul_(100)  # the loss landscape steepens: |g| jumps a hundredfold
    optimizer.step(model)
    last = optimizer.trajectory.steps[-1]
    assert abs(last.coefficients()[0]) <= 2 < abs(last.grads[0]) / 10  # at most sqrt(window), however large g is


def test_normalised_runs_replay_and_resume_bit_identically(tmp_path):
    # Resumed after step 3: the window of steps 4-6 reaches back before the resume.
    assert_replays_and_resumes(tmp_path, dict(lr=1e-3, eps=1e-2, normalize_window=4, seed=3))


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="normalize_window"):
        zotune.MeZO(tiny_model("llama").parameters(), lr=1e-3, normalize_window=-1)
