import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_impl

import zotune

from tests.conftest import assert_same, lm_closure, snapshot, tiny_model
from zotune.core import kernels
from zotune.core.directions import Dense, Draw, LowRank, make
from zotune.core.perturb import Perturbation, PerturbedParam

DISTRIBUTIONS = ["gaussian", "rademacher"]


def draw(seed):
    return Draw(base_seed=0, step=0, seed=seed)


def items_of(model, distribution="gaussian"):
    direction = make(distribution)
    return [PerturbedParam(p, name, direction) for name, p in model.named_parameters()]


def z_of(seed, key, n, distribution="gaussian"):
    out = torch.empty(n)
    kernels.get("cpu").fill(out, 0, seed, Dense.key_hash(key), distribution)
    return out


def explicitly_perturbed(model, seed, eps, distribution="gaussian"):
    """The reference: a copy of the model with W + eps*z written into it."""
    other = copy.deepcopy(model)
    direction = make(distribution)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if isinstance(direction, LowRank) and p.ndim == 2:
                u, v = direction.factors(p.shape, name, draw(seed), "cpu")
                p.add_(eps * (u.double() @ v.double().T))
            else:
                dense = "gaussian" if distribution == "lowrank" else distribution
                p.add_(eps * z_of(seed, name, p.numel(), dense).to(p.dtype).view_as(p))
    return other


@pytest.mark.parametrize("distribution", DISTRIBUTIONS + ["lowrank"])
def test_forward_sees_the_perturbed_weights(family, distribution):
    # float64, so that the reference's in-place add is exact enough to compare tightly.
    model = tiny_model(family, torch.float64)
    before = snapshot(model)
    for eps in (1e-2, -1e-2):
        reference = lm_closure(explicitly_perturbed(model, 42, eps, distribution))()
        with torch.no_grad(), Perturbation(items_of(model, distribution), draw(42), eps):
            perturbed = lm_closure(model)()
        unperturbed = lm_closure(model)()
        # the loss of OPT and GPT-2 is computed from float32 logits whatever the weights dtype
        assert torch.allclose(perturbed, reference, rtol=0, atol=1e-12 if perturbed.dtype == torch.float64 else 2e-6)
        assert abs(perturbed.item() - unperturbed.item()) > 1e-6  # the perturbation did something
    assert_same(before, snapshot(model))


def test_tied_weights_see_one_perturbation():
    model = tiny_model("gpt2", torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad(), Perturbation(items_of(model), draw(1), 1e-2) as perturbation:
        lm_closure(model)()
    assert len(perturbation.used) == len(list(model.parameters()))


def test_hooks_are_removed_and_weights_restored_after_an_error():
    model = tiny_model("llama")
    before = snapshot(model)
    n_pre, n_post = len(module_impl._global_forward_pre_hooks), len(module_impl._global_forward_hooks)

    class Boom(Exception):
        pass

    def failing_forward(module, args):
        raise Boom

    handle = model.model.layers[1].mlp.register_forward_pre_hook(failing_forward)
    with pytest.raises(Boom), torch.no_grad(), Perturbation(items_of(model), draw(3), 1.0):
        lm_closure(model)()
    handle.remove()
    assert_same(before, snapshot(model))
    assert len(module_impl._global_forward_pre_hooks) == n_pre
    assert len(module_impl._global_forward_hooks) == n_post


def test_unused_parameters_are_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    spare = nn.Linear(3, 3)
    items = [PerturbedParam(p, str(i), Dense()) for i, p in enumerate([*model.parameters(), *spare.parameters()])]
    with torch.no_grad(), Perturbation(items, draw(0), 1e-3, probe=True) as perturbation:
        model(torch.ones(2, 3))
    assert perturbation.used == {id(p) for p in model.parameters()}
    assert perturbation.read_outside == set()


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
    item = PerturbedParam(module.weight, "w", Dense("rademacher"))
    with torch.no_grad(), Perturbation([item], draw(5), 0.5):
        out = module(torch.zeros(4, dtype=torch.float64))
    z = z_of(5, "w", 4, "rademacher").double()
    assert torch.equal(out, 0.5 * z)
    assert torch.equal(module.weight, torch.zeros(4, dtype=torch.float64))


def test_active_dropout_warns():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).train()
    items = [PerturbedParam(p, str(i), Dense()) for i, p in enumerate(model.parameters())]
    with pytest.warns(UserWarning, match="model.eval"), torch.no_grad(), Perturbation(items, draw(0), 1e-3):
        model(torch.ones(2, 3))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), Perturbation(items, draw(0), 1e-3):
            model(torch.ones(2, 3))


def test_low_rank_perturbs_layer_outputs_without_building_the_matrix(monkeypatch):
    model = tiny_model("llama", torch.float64)
    built = []
    original = LowRank.perturbed
    monkeypatch.setattr(LowRank, "perturbed", lambda self, w, *a: built.append(w.shape) or original(self, w, *a))
    with torch.no_grad(), Perturbation(items_of(model, "lowrank"), draw(3), 1e-2):
        lm_closure(model)()
    assert built and all(len(shape) == 1 for shape in built)  # only the norms' vectors (dense fallback)


def test_probe_finds_reads_outside_the_owner_and_bare_tensors():
    embed, bare = nn.Embedding(5, 3), nn.Parameter(torch.ones(3))
    items = [PerturbedParam(embed.weight, "e", Dense()), PerturbedParam(bare, "b", Dense())]
    ids = torch.tensor([0, 2])
    with torch.no_grad(), Perturbation(items, draw(0), 1e-3, probe=True) as probe:
        (embed(ids) @ embed.weight.T).sum() + bare.sum()
    assert probe.read_outside == {id(embed.weight), id(bare)}
    before = (embed.weight.detach().clone(), bare.detach().clone())
    with torch.no_grad(), Perturbation(items, draw(0), 1e-3, whole=probe.read_outside):
        seen = (embed.weight.detach().clone(), bare.detach().clone())
        embed(ids)
    assert torch.allclose(seen[1], 1 + 1e-3 * z_of(0, "b", 3))
    assert not torch.equal(seen[0], before[0])
    assert torch.equal(embed.weight, before[0]) and torch.equal(bare, before[1])


def test_cpu_buffers_are_kept_between_evaluations():
    # On the CPU a fresh weight-sized allocation costs page faults on every forward: the buffers stay.
    model = tiny_model("llama")
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-3, eps=1e-2)
    optimizer.step(lm_closure(model))
    kept = {t.data_ptr() for t in optimizer._scratch.values()}
    assert kept
    optimizer.step(lm_closure(model))
    assert {t.data_ptr() for t in optimizer._scratch.values()} == kept


@pytest.mark.parametrize("keep", [False, True], ids=["gpu-style", "cpu-style"])
def test_without_kept_buffers_no_perturbed_copy_outlives_its_module(keep):
    # On a GPU nothing is kept (scratch=None): a spare per weight shape would add several weights to the peak.
    from torch.multiprocessing.reductions import StorageWeakRef

    model = tiny_model("llama")
    first, second = model.model.layers[0].self_attn.q_proj, model.model.layers[1]
    perturbed, alive = [], []
    handles = [first.register_forward_pre_hook(lambda m, a: perturbed.append(StorageWeakRef(m.weight.untyped_storage()))),
               second.register_forward_pre_hook(lambda m, a: alive.append(not perturbed[-1].expired()))]
    try:
        with torch.no_grad(), Perturbation(items_of(model), draw(1), 1e-2, scratch={} if keep else None):
            lm_closure(model)()
    finally:
        for handle in handles:
            handle.remove()
    assert perturbed[-1] is not None and alive == [keep]


def test_stacked_dense_copies_run_each_row_once(family):
    """A module run per copy computes the first copy in its stacked call: no row is computed twice."""
    from tests.core.test_optim import stacked_closure

    model = tiny_model(family)
    optimizer = zotune.MeZO(model.named_parameters(), lr=1e-6, estimator="fzoo", n_samples=3, stacked=True)
    optimizer.step(stacked_closure(model, batch=3))  # the first step also probes, unstacked
    rows = {}
    handle = module_impl.register_module_forward_hook(
        lambda module, args, output: rows.setdefault(module, []).append(args[0].shape[0])
        if isinstance(module, nn.Linear) else None)
    try:
        optimizer.step(stacked_closure(model, batch=3, seed=1))
    finally:
        handle.remove()
    assert rows
    for calls in rows.values():  # 4 copies (3 directions and W), each on its own rows, never all of them at once
        assert len(calls) == 4 and len(set(calls)) == 1
