import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_impl

from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune import directions
from zotune.perturb import Perturbation, PerturbedParam


def items_of(model, distribution="gaussian"):
    return [
        PerturbedParam(p, directions.hash64("param", name), distribution)
        for name, p in model.named_parameters()
    ]


def explicitly_perturbed(model, seed, eps, distribution="gaussian"):
    """The reference: a copy of the model with W + eps*z written into it."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            z = directions.direction(seed, directions.hash64("param", name), p.numel(), distribution=distribution)
            p.add_(eps * z.to(p.dtype).view_as(p))
    return other


@pytest.mark.parametrize("distribution", directions.DISTRIBUTIONS)
def test_forward_sees_the_perturbed_weights(family, distribution):
    # float64, so that the reference's in-place add is exact enough to compare tightly.
    model = tiny_model(family, torch.float64)
    before = snapshot(model)
    for eps in (1e-2, -1e-2):
        reference = lm_closure(explicitly_perturbed(model, 42, eps, distribution))()
        with torch.no_grad(), Perturbation(items_of(model, distribution), 42, eps):
            perturbed = lm_closure(model)()
        unperturbed = lm_closure(model)()
        assert torch.allclose(perturbed, reference, rtol=0, atol=1e-12)
        assert abs(perturbed.item() - unperturbed.item()) > 1e-6  # the perturbation did something
    assert_same(before, snapshot(model))


def test_tied_weights_see_one_perturbation():
    model = tiny_model("gpt2", torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad(), Perturbation(items_of(model), 1, 1e-2) as perturbation:
        lm_closure(model)()
    assert perturbation.unused == []


def test_hooks_are_removed_and_weights_restored_after_an_error():
    model = tiny_model("llama")
    before = snapshot(model)
    n_pre, n_post = len(module_impl._global_forward_pre_hooks), len(module_impl._global_forward_hooks)

    class Boom(Exception):
        pass

    def failing_forward(module, args):
        raise Boom

    handle = model.model.layers[1].mlp.register_forward_pre_hook(failing_forward)
    with pytest.raises(Boom), torch.no_grad(), Perturbation(items_of(model), 3, 1.0):
        lm_closure(model)()
    handle.remove()
    assert_same(before, snapshot(model))
    assert len(module_impl._global_forward_pre_hooks) == n_pre
    assert len(module_impl._global_forward_hooks) == n_post


def test_unused_parameters_are_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    spare = nn.Linear(3, 3)
    items = [PerturbedParam(p, i, "gaussian") for i, p in enumerate([*model.parameters(), *spare.parameters()])]
    with torch.no_grad(), Perturbation(items, 0, 1e-3) as perturbation:
        model(torch.ones(2, 3))
    assert [item.param for item in perturbation.unused] == list(spare.parameters())


def test_reentrant_module_is_perturbed_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))

        def forward(self, x, depth=0):
            if depth == 0:
                return self(x, depth=1)  # runs the hooks again while already perturbed
            return x + self.weight

    module = Twice()
    item = PerturbedParam(module.weight, 9, "rademacher")
    with torch.no_grad(), Perturbation([item], 5, 0.5):
        out = module(torch.zeros(4, dtype=torch.float64))
    z = directions.direction(5, 9, 4, distribution="rademacher").double()
    assert torch.equal(out, 0.5 * z)
    assert torch.equal(module.weight, torch.zeros(4, dtype=torch.float64))


def test_active_dropout_warns():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).train()
    items = [PerturbedParam(p, i, "gaussian") for i, p in enumerate(model.parameters())]
    with pytest.warns(UserWarning, match="model.eval"), torch.no_grad(), Perturbation(items, 0, 1e-3):
        model(torch.ones(2, 3))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), Perturbation(items, 0, 1e-3):
            model(torch.ones(2, 3))
