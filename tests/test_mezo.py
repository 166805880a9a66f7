import io
import math

import pytest
import torch
from torch import nn

import zotune
from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune import directions


class Linear(nn.Module):
    """L(p) = a . p"""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.p = nn.Parameter(torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(1)))

    def forward(self):
        return (self.a * self.p).sum()


class Quadratic(nn.Module):
    """L(p) = 0.5 sum_i h_i p_i^2, gradient h * p."""

    def __init__(self, dim=20, dtype=torch.float64):
        super().__init__()
        self.h = torch.linspace(1.0, 3.0, dim, dtype=dtype)
        self.p = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self):
        return 0.5 * (self.h * self.p**2).sum()


def key_hash(optimizer, group=0, index=0):
    return optimizer._key_hashes[group][index]


@pytest.mark.parametrize("distribution", directions.DISTRIBUTIONS)
def test_projected_gradient_of_a_linear_loss_is_a_dot_z(distribution):
    a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = Linear(a)
    optimizer = zotune.MeZO(model.parameters(), lr=0.0, eps=1e-3, distribution=distribution)
    optimizer.step(model)
    step = optimizer.trajectory.steps[0]
    z = directions.direction(step.seeds[0], key_hash(optimizer), 50, distribution=distribution).double()
    assert step.grads[0] == pytest.approx(torch.dot(a, z).item(), rel=1e-9)


def test_averaged_estimate_points_along_the_gradient():
    model = Quadratic()
    true_gradient = (model.h * model.p).detach().clone()
    start = model.p.detach().clone()
    # lr = 1 makes the update equal to minus the averaged estimate (1/n) sum g_j z_j.
    optimizer = zotune.MeZO(model.parameters(), lr=1.0, eps=1e-4, n_samples=2000)
    optimizer.step(model)
    estimate = start - model.p.detach()
    cosine = torch.nn.functional.cosine_similarity(estimate, true_gradient, dim=0)
    assert cosine > 0.9


@pytest.mark.parametrize("one_sided", [False, True])
def test_mezo_drives_a_quadratic_down(one_sided):
    model = Quadratic()
    initial = model().item()
    optimizer = zotune.MeZO(model.parameters(), lr=0.02, eps=1e-4, one_sided=one_sided, seed=3)
    for _ in range(300):
        optimizer.step(model)
    assert model().item() < 0.05 * initial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", directions.DISTRIBUTIONS)
def test_lr_zero_leaves_weights_bit_identical(family, dtype, distribution):
    model = tiny_model(family, dtype)
    before = snapshot(model)
    optimizer = zotune.MeZO(model.parameters(), lr=0.0, eps=1e-2, n_samples=2, distribution=distribution)
    for _ in range(3):
        optimizer.step(lm_closure(model))
    assert_same(before, snapshot(model))
    # ... and the perturbation was real: the two losses differed.
    assert any(g != 0 for step in optimizer.trajectory.steps for g in step.grads)


def test_closure_calls_and_autograd():
    model = Quadratic()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return model()

    zotune.MeZO(model.parameters(), lr=0.1, n_samples=3).step(closure)
    assert calls == [False] * 6
    calls.clear()
    zotune.MeZO(model.parameters(), lr=0.1, n_samples=3, one_sided=True).step(closure)
    assert calls == [False] * 4


def test_return_values():
    model = Quadratic()
    unperturbed = model().item()
    one_sided = zotune.MeZO(model.parameters(), lr=0.0, one_sided=True).step(model)
    assert one_sided == unperturbed
    two_sided = zotune.MeZO(model.parameters(), lr=0.0, eps=1e-3).step(model)
    assert two_sided != unperturbed and two_sided == pytest.approx(unperturbed, rel=1e-4)


def test_two_phase_form_equals_step_with_closure():
    a, b = Quadratic(), Quadratic()
    opt_a = zotune.MeZO(a.parameters(), lr=0.01, seed=5)
    opt_b = zotune.MeZO(b.parameters(), lr=0.01, seed=5)
    for _ in range(4):
        loss_a = opt_a.step(a)
        loss_b = opt_b.estimate(b)
        assert opt_b.step() is None
        assert loss_a == loss_b
    assert torch.equal(a.p, b.p)
    with pytest.raises(RuntimeError, match="estimate"):
        opt_b.step()


def test_n_spsa_applies_each_sample_with_lr_over_n():
    model = Quadratic(dim=8)
    start = model.p.detach().clone()
    optimizer = zotune.MeZO(model.parameters(), lr=0.1, n_samples=3)
    optimizer.step(model)
    step = optimizer.trajectory.steps[0]
    expected = start.clone()
    for seed, g in zip(step.seeds, step.grads):
        expected -= 0.1 / 3 * g * directions.direction(seed, key_hash(optimizer), 8).double()
    assert len(set(step.seeds)) == 3
    assert torch.allclose(model.p.detach(), expected, rtol=0, atol=1e-12)


def test_weight_decay_per_group():
    decayed, plain = nn.Parameter(torch.ones(6)), nn.Parameter(torch.ones(6))

    class Zero(nn.Module):  # constant loss: g = 0, only the decay moves weights
        def __init__(self):
            super().__init__()
            self.decayed, self.plain = decayed, plain

        def forward(self):
            return torch.tensor(1.0)

    model = Zero()
    optimizer = zotune.MeZO(
        [{"params": [decayed], "weight_decay": 0.5}, {"params": [plain]}], lr=0.1
    )
    optimizer.step(model)
    assert torch.allclose(decayed, torch.full((6,), 0.95))
    assert torch.equal(plain, torch.ones(6))


def test_scheduler_changes_the_step():
    model = Quadratic()
    optimizer = zotune.MeZO(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.0)
    optimizer.step(model)
    scheduler.step()
    after_first = model.p.detach().clone()
    optimizer.step(model)
    scheduler.step()
    assert torch.equal(model.p, after_first)  # lr 0 from the second step on
    assert [s.lrs for s in optimizer.trajectory.steps] == [[0.01], [0.0]]


def train(model, optimizer, steps, first=0):
    for t in range(first, first + steps):
        optimizer.step(lm_closure(model, seed=t))


@pytest.mark.parametrize("two_phase_pending", [False, True])
def test_resume_is_bit_identical(two_phase_pending):
    reference = tiny_model("llama")
    opt_ref = zotune.MeZO(reference.named_parameters(), lr=1e-3, n_samples=2, weight_decay=0.01, seed=7)
    train(reference, opt_ref, 6)

    first = tiny_model("llama")
    opt_first = zotune.MeZO(first.named_parameters(), lr=1e-3, n_samples=2, weight_decay=0.01, seed=7)
    train(first, opt_first, 3)
    if two_phase_pending:  # interrupted between estimate() and step()
        opt_first.estimate(lm_closure(first, seed=3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    del first, opt_first

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = tiny_model("llama", seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = zotune.MeZO(resumed.named_parameters(), lr=123.0, seed=0)
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    if two_phase_pending:
        opt_resumed.step()
        train(resumed, opt_resumed, 2, first=4)
    else:
        train(resumed, opt_resumed, 3, first=3)
    assert_same(snapshot(reference), snapshot(resumed))
    assert opt_resumed.trajectory == opt_ref.trajectory


def test_state_dict_for_other_parameters_is_refused():
    small, other = Quadratic(dim=4), Quadratic(dim=5)
    state = zotune.MeZO(small.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="different parameters"):
        zotune.MeZO(other.parameters(), lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="zotune"):
        zotune.MeZO(small.parameters(), lr=0.1).load_state_dict(torch.optim.SGD(small.parameters(), lr=0.1).state_dict())


def test_only_parameters_that_require_grad_move(family):
    model = tiny_model(family)
    frozen = {name for name, p in model.named_parameters() if "embed" in name or "wte" in name or "wpe" in name}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = snapshot(model)
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3)
    train(model, optimizer, 2)
    after = snapshot(model)
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    # The same holds when the optimizer is given only the trainable subset.
    subset = zotune.MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, subset, 1)
    for name in frozen:
        assert torch.equal(before[name], snapshot(model)[name])


def test_tiny_models_learn(family):
    model = tiny_model(family)
    closure = lm_closure(model)
    initial = closure().item()
    optimizer = zotune.MeZO(model.parameters(), lr=1e-3, seed=1)
    for _ in range(150):
        optimizer.step(closure)
    assert closure().item() < initial - 0.05


def test_non_finite_loss_is_refused_and_weights_kept():
    model = Quadratic()
    before = model.p.detach().clone()
    optimizer = zotune.MeZO(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.step(lambda: model() * math.nan)
    assert torch.equal(model.p, before)
    assert optimizer.trajectory.steps == []


def test_global_rng_is_untouched():
    model = tiny_model("gpt2")
    torch.manual_seed(2024)
    expected = torch.rand(4)
    torch.manual_seed(2024)
    optimizer = zotune.MeZO(model.parameters(), lr=1e-3, n_samples=2)
    train(model, optimizer, 2)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"lr": 0.1, "eps": 0.0}, "eps"),
        ({"lr": 0.1, "eps": -1e-3}, "eps"),
        ({"lr": 0.1, "n_samples": 0}, "n_samples"),
        ({"lr": 0.1, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": 0.1, "distribution": "uniform"}, "distribution"),
        ({"lr": 0.1, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zotune.MeZO(Quadratic().parameters(), **kwargs)


def test_groups_must_share_eps():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = zotune.MeZO([{"params": [a]}, {"params": [b], "eps": 1e-2}], lr=0.1)
    with pytest.raises(ValueError, match="one eps"):
        optimizer.step(lambda: torch.tensor(0.0))


def test_unused_parameter_warns():
    model = Quadratic()
    outside = nn.Parameter(torch.ones(3))
    optimizer = zotune.MeZO([model.p, outside], lr=0.1)
    with pytest.warns(UserWarning, match="1 of 2 parameters"):
        optimizer.step(model)
