import io
import math

import pytest
import torch
from torch import nn

import zotune
from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune.core.directions import Dense
from zotune.core import kernels

DISTRIBUTIONS = ["gaussian", "rademacher"]


def z_of(seed, n, distribution="gaussian", key="#0"):
    out = torch.empty(n)
    kernels.get("cpu").fill(out, 0, seed, Dense.key_hash(key), distribution)  # the backend the step used
    return out


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


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_projected_gradient_of_a_linear_loss_is_a_dot_z(distribution):
    a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = Linear(a)
    optimizer = zotune.MeZO(model.parameters(), lr=0.0, eps=1e-3, direction=distribution)
    optimizer.step(model)
    step = optimizer.trajectory.steps[0]
    z = z_of(step.seeds[0], 50, distribution).double()
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


@pytest.mark.parametrize("estimator", ["spsa", "one-sided"])
def test_mezo_drives_a_quadratic_down(estimator):
    model = Quadratic()
    initial = model().item()
    optimizer = zotune.MeZO(model.parameters(), lr=0.02, eps=1e-4, estimator=estimator, seed=3)
    for _ in range(300):
        optimizer.step(model)
    assert model().item() < 0.05 * initial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS + ["lowrank"])
def test_lr_zero_leaves_weights_bit_identical(family, dtype, distribution):
    model = tiny_model(family, dtype)
    before = snapshot(model)
    optimizer = zotune.MeZO(model.parameters(), lr=0.0, eps=1e-2, n_samples=2, direction=distribution)
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
    zotune.MeZO(model.parameters(), lr=0.1, n_samples=3, estimator="one-sided").step(closure)
    assert calls == [False] * 4


def test_return_values():
    model = Quadratic()
    unperturbed = model().item()
    one_sided = zotune.MeZO(model.parameters(), lr=0.0, estimator="one-sided").step(model)
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
        expected -= 0.1 / 3 * g * z_of(seed, 8).double()
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
        ({"lr": 0.1, "direction": "uniform"}, "direction"),
        ({"lr": 0.1, "estimator": "magic"}, "estimator"),
        ({"lr": 0.1, "estimator": "fzoo"}, "n_samples"),
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
    with pytest.warns(UserWarning, match="1 of 2 parameters were not read"):
        optimizer.step(model)


# -- every parameter the loss reads is perturbed -------------------------------


def test_bare_parameter_quadratic_is_trained():
    target = torch.linspace(-2.0, 3.0, 10)
    theta = nn.Parameter(torch.zeros(10))
    loss = lambda: ((theta - target) ** 2).sum()  # noqa: E731: no module owns theta
    initial = loss().item()
    optimizer = zotune.MeZO([theta], lr=0.02, eps=1e-3, seed=1)
    for _ in range(400):
        optimizer.step(loss)
    assert loss().item() < 1e-3 * initial


def test_weight_read_outside_its_module_is_perturbed_exactly():
    class TiedByHand(nn.Module):  # the head reads the embedding functionally, outside nn.Embedding.forward
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(12, 6, dtype=torch.float64)

        def forward(self, ids):
            return torch.logsumexp(self.embed(ids) @ self.embed.weight.T, -1).sum()

    model, ids = TiedByHand(), torch.tensor([1, 5, 7])
    before = model.embed.weight.detach().clone()
    optimizer = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-3)
    optimizer.step(lambda: model(ids))
    assert torch.equal(model.embed.weight, before)
    # the estimate equals the one computed with W + eps z written into a copy, both reads perturbed
    z = z_of(optimizer.last_step.seeds[0], before.numel(), key="embed.weight").double().view_as(before)
    loss_at = lambda w: torch.logsumexp(w[ids] @ w.T, -1).sum().item()  # noqa: E731
    expected = (loss_at(before + 1e-3 * z) - loss_at(before - 1e-3 * z)) / 2e-3
    assert optimizer.last_step.grads[0] == pytest.approx(expected, rel=1e-6)


def test_add_param_group_is_used():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    optimizer = zotune.MeZO([a], lr=0.05, seed=2)
    optimizer.add_param_group({"params": [b], "lr": 0.1, "direction": "rademacher"})
    loss = lambda: ((a - 1) ** 2).sum() + ((b + 1) ** 2).sum()  # noqa: E731
    for _ in range(300):
        optimizer.step(loss)
    assert torch.allclose(a, torch.ones(4), atol=0.05) and torch.allclose(b, -torch.ones(4), atol=0.05)
    assert optimizer.trajectory.keys == [["#0"], ["#1"]]
    assert optimizer.trajectory.directions[1] == {"kind": "dense", "distribution": "rademacher"}
    named = zotune.MeZO([("x", nn.Parameter(torch.zeros(1)))], lr=0.1)
    with pytest.raises(ValueError, match="unique"):
        named.add_param_group({"params": [("x", nn.Parameter(torch.zeros(1)))]})


# -- estimators and directions ---------------------------------------------------


def test_fzoo_divides_by_the_std_of_the_losses():
    model = Quadratic(dim=8)
    optimizer = zotune.MeZO(model.parameters(), lr=0.0, estimator="fzoo", n_samples=4, direction="rademacher")
    unperturbed = model().item()
    assert optimizer.step(model) == unperturbed
    step = optimizer.last_step
    losses = [unperturbed + g * 1e-3 for g in step.grads]
    sigma = torch.tensor(losses, dtype=torch.float64).std().item()
    assert step.coeffs == pytest.approx([g / (4 * sigma) for g in step.grads], rel=1e-6)


def test_fzoo_trains():
    model = Quadratic()
    initial = model().item()
    # the step is normalised by std(losses) ~ eps |grad|: its size is ~ lr / eps per coordinate
    optimizer = zotune.MeZO(model.parameters(), lr=1e-5, estimator="fzoo", n_samples=4, direction="rademacher")
    for _ in range(400):
        optimizer.step(model)
    assert model().item() < 0.1 * initial


@pytest.mark.parametrize("direction", ["rademacher", "lowrank", zotune.LowRank(rank=1, interval=3, orthonormal=True)])
def test_directions_train_tiny_models(direction):
    model = tiny_model("llama")
    closure = lm_closure(model)
    initial = closure().item()
    optimizer = zotune.MeZO(model.named_parameters(), lr=2e-3, direction=direction, seed=1)
    for _ in range(120):
        optimizer.step(closure)
    assert closure().item() < initial - 0.05


def test_losses_cross_to_the_host_once_per_step(monkeypatch):
    model = Quadratic()
    optimizer = zotune.MeZO(model.parameters(), lr=0.01, n_samples=3)
    transfers = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: transfers.append(1) or real_tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() inside a step"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() inside a step"))
    optimizer.step(model)
    assert len(transfers) == 1


# -- low precision that learns ----------------------------------------------------


def test_stochastic_rounding_moves_bf16_weights_in_expectation():
    # Every update is ~1e-3 of a bf16 spacing: rounding to nearest drops all of them.
    dim, lr = 4096, 1e-6
    target = torch.ones(dim, dtype=torch.float64)

    def run(stochastic):
        w = nn.Parameter(torch.ones(dim, dtype=torch.bfloat16))
        optimizer = zotune.MeZO([w], lr=lr, stochastic_rounding=stochastic, seed=4)
        loss = lambda: (w.double() * target).sum()  # noqa: E731: gradient 1 everywhere
        for _ in range(50):
            optimizer.step(loss)
        return w.detach().double()

    assert torch.equal(run(False), torch.ones(dim, dtype=torch.float64))
    moved = 1 - run(True).mean().item()
    # fp32 would move each weight by lr * sum g z_i, ~ lr * dim per step on average along z
    assert moved > 0


# -- stacked evaluation -------------------------------------------------------------


def stacked_closure(model, seed=0, batch=3, length=10):
    ids = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))

    def closure(copies=None):
        if copies is None:
            return model(input_ids=ids, labels=ids).loss
        repeated = ids.repeat(copies, 1)
        logits = model(input_ids=repeated).logits[:, :-1].float()
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), repeated[:, 1:].flatten(), reduction="none")
        return losses.view(copies, -1).mean(1)

    return closure


@pytest.mark.parametrize("direction", ["lowrank", "gaussian"])
@pytest.mark.parametrize("estimator,n", [("spsa", 2), ("fzoo", 3)])
def test_stacked_evaluation_equals_separate_forwards(family, direction, estimator, n):
    separate, stacked = tiny_model(family, torch.float64), tiny_model(family, torch.float64)
    kwargs = dict(lr=1e-6, n_samples=n, direction=direction, estimator=estimator, seed=4)  # FZOO steps ~ lr / eps
    opt_separate = zotune.MeZO(separate.named_parameters(), **kwargs)
    opt_stacked = zotune.MeZO(stacked.named_parameters(), stacked=True, **kwargs)
    for t in range(2):
        loss_separate = opt_separate.step(stacked_closure(separate, seed=t))
        loss_stacked = opt_stacked.step(stacked_closure(stacked, seed=t))
        assert loss_stacked == pytest.approx(loss_separate, rel=1e-5)
        assert opt_stacked.last_step.grads == pytest.approx(opt_separate.last_step.grads, rel=1e-3, abs=1e-3)


def test_stacked_closure_must_return_one_loss_per_copy():
    model = tiny_model("llama")
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3, direction="lowrank", stacked=True)
    plain = stacked_closure(model)
    with pytest.raises(ValueError, match="2 losses"):
        optimizer.step(lambda copies: plain(copies).mean())
