import pytest
import torch

import zotune
from zotune.errors import UserError
from zotune.methods.hzo import split_parameters
from zotune.recipe.train import train

from ..conftest import lm_closure, snapshot, tiny_model
from ..recipe.test_train import config


def test_the_last_blocks_norm_and_head_are_first_order():
    model = tiny_model("llama")  # 2 blocks, untied head
    shallow, deep, shallow_blocks, boundary = split_parameters(model, deep_blocks=1)
    deep_names = {name for name, _ in deep}
    assert deep_names == {n for n, _ in model.named_parameters()
                          if n.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    assert {name for name, _ in shallow}.isdisjoint(deep_names) and len(shallow) + len(deep) == 21
    assert shallow_blocks == [model.model.layers[0]] and boundary is model.model.layers[1]
    _, head_only, _, boundary = split_parameters(model, deep_blocks=0)
    assert {n for n, _ in head_only} == {"model.norm.weight", "lm_head.weight"} and boundary is model.model.norm
    with pytest.raises(UserError, match="--deep-blocks 3"):
        split_parameters(model, deep_blocks=3)


def test_a_tied_head_follows_the_head_option():
    model = tiny_model("gpt2")
    shallow, deep, _, _ = split_parameters(model, deep_blocks=1, head="fo")
    assert "transformer.wte.weight" in {n for n, _ in deep} and "transformer.wpe.weight" in {n for n, _ in shallow}
    for head in ("zo", "auto"):  # auto: tied to the zeroth-order embedding, so zeroth order too
        shallow, deep, _, _ = split_parameters(model, deep_blocks=1, head=head)
        assert {"transformer.wte.weight", "transformer.ln_f.weight"} <= {n for n, _ in shallow}
        assert all(n.startswith("transformer.h.1.") for n, _ in deep)
    assert "transformer.wte.weight" in {n for n, _ in split_parameters(model, deep_blocks=0, head="auto")[1]}
    with pytest.raises(UserError, match="--deep-blocks 1"):
        split_parameters(model, deep_blocks=0, head="zo")


def test_backward_runs_through_the_deep_blocks_alone():
    model = tiny_model("llama")
    hzo = zotune.HZO(model, deep_blocks=1, lr_fo=1e-2, lr_zo=1e-2)
    needs_grad = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad
                                    if isinstance(out, tuple) else out.requires_grad))
    before = snapshot(model)
    hzo._first_order(lm_closure(model))
    assert needs_grad == {0: False, 1: True}  # no graph, hence no saved activations, in the shallow block
    after = snapshot(model)
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed == {n for n, p in model.named_parameters() if any(p is q for q in hzo.deep)}
    assert all(p.grad is None for p in hzo.shallow + hzo.deep)


def test_zeroth_order_step_changes_only_the_shallow_part_and_first_order_can_wait_for_resamples():
    model = tiny_model("llama")
    hzo = zotune.HZO(model, deep_blocks=1, lr_fo=1e-2, lr_zo=1e-2, interval=3, fo_every="resample")
    closure = lm_closure(model)
    due = []
    for _ in range(7):
        due.append(hzo.fo_due())
        hzo.step(closure)
    assert due == [True, False, False, True, False, False, True] and hzo.fo_steps == 3
    before = snapshot(model)
    hzo.step(closure)  # step 7: zeroth order only
    after = snapshot(model)
    deep = {id(p) for p in hzo.deep}
    for name, param in model.named_parameters():
        assert torch.equal(before[name], after[name]) == (id(param) in deep), name


def test_orders_differ_and_state_dict_resumes():
    results = {}
    for order in ("zo-first", "fo-first"):
        model = tiny_model("llama")
        hzo = zotune.HZO(model, lr_fo=1e-2, lr_zo=1e-2, order=order, seed=2)
        for _ in range(2):
            hzo.step(lm_closure(model))
        results[order] = snapshot(model)
        state = hzo.state_dict()
        again = zotune.HZO(tiny_model("llama"), lr_fo=1e-2, lr_zo=1e-2, order=order, seed=2)
        again.load_state_dict(state)
        assert again.steps_done == 2 and again.fo_steps == 2
    assert any(not torch.equal(results["zo-first"][n], results["fo-first"][n]) for n in results["zo-first"])


def test_unknown_model_names_the_option():
    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
            self.out = torch.nn.Linear(4, 2)

    with pytest.raises(UserError, match="--blocks"):
        zotune.HZO(Mystery())
    hzo = zotune.HZO(Mystery(), blocks="layers")
    assert len(hzo.shallow_blocks) == 1


def test_hzo_run_replays_from_trajectory_and_first_order_file(tiny_model_dir, tmp_path):
    from zotune.recipe.evaluation import replay_run

    out = tmp_path / "hzo"
    train(config(tiny_model_dir, out, method="hzo", lr=1e-2, lr_zo=1e-2, zero_shot=False, rank=1,
                 resample_every=2))
    assert "bit-identical to the run's model" in replay_run(str(out), str(tmp_path / "replayed"))


@pytest.mark.parametrize("method", ["mezo", "hzo"])
def test_offloaded_run_equals_the_in_memory_run(tiny_model_dir, tmp_path, method):
    from safetensors.torch import load_file

    options = dict(method=method, lr=1e-2, lr_zo=1e-2, zero_shot=False, eval_every=0) if method == "hzo" else \
        dict(method=method, lr=1e-2, zero_shot=False, eval_every=0)
    train(config(tiny_model_dir, tmp_path / "memory", stacked=True, **options))
    train(config(tiny_model_dir, tmp_path / "offload", offload="cpu", **options))
    a = load_file(tmp_path / "memory" / "model" / "model.safetensors")
    b = load_file(tmp_path / "offload" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("order, estimator, calls", [("zo-first", "spsa", 3), ("fo-first", "spsa", 3),
                                                      ("joint", "one-sided", 2)])
def test_forwards_per_step(order, estimator, calls):
    model = tiny_model("llama")
    hzo = zotune.HZO(model, lr_fo=1e-2, lr_zo=1e-2, order=order, estimator=estimator)
    closure, count = lm_closure(model), []
    hzo.step(lambda: (count.append(1), closure())[1])
    assert len(count) == calls and hzo.fo_steps == 1
    with pytest.raises(ValueError, match="one-sided"):
        zotune.HZO(model, order="joint")


def test_joint_stacked_is_one_forward_per_step_and_matches_joint_separate():
    from ..engine.test_offload import stacked_closure

    results = {}
    for stacked in (False, True):
        model = tiny_model("llama")
        hzo = zotune.HZO(model, lr_fo=1e-2, lr_zo=1e-2, order="joint", estimator="one-sided", stacked=stacked,
                         seed=3)
        closure, count, graph = stacked_closure(model), [], []
        model.model.layers[0].register_forward_hook(lambda m, a, out: graph.append(out[0].requires_grad
                                                    if isinstance(out, tuple) else out.requires_grad))
        counted = lambda copies=None: (count.append(copies), closure(copies))[1]
        losses = [hzo.step(counted if stacked else (lambda: counted(None))) for _ in range(3)]
        results[stacked] = losses, snapshot(model)
        assert graph and not any(graph)  # no forward builds a graph through a shallow block
        if stacked:  # the first step also probes for parameters read outside their modules
            assert count == [1, 2, 2, 2] and hzo.fo_steps == 3
    (separate, a), (stacked, b) = results[False], results[True]
    assert stacked == pytest.approx(separate, rel=1e-4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
