"""First-order parts of half-precision models: AdamW must not divide by an eps that rounds
to zero (fp16) nor lose its updates below the weights' spacing (bf16)."""

import pytest
import torch

import zotune
from zotune.core.mixed_precision import MasterAdamW, adamw
from zotune.methods import FT, FTConfig

from ..conftest import lm_closure, snapshot, tiny_model


def deep_weights(model, hzo) -> dict:
    deep = {id(p) for p in hzo.deep}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in deep}


def test_hzo_deep_block_stays_finite_in_fp16():
    model = tiny_model("llama", torch.float16)
    hzo = zotune.HZO(model, deep_blocks=1, lr_fo=1e-3, lr_zo=1e-3)
    closure = lm_closure(model)
    losses = [hzo.step(closure) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and hzo.fo_steps == 3
    assert all(torch.isfinite(t).all() for t in snapshot(model).values())


def test_ft_stays_finite_in_fp16():
    model = tiny_model("llama", torch.float16)
    ft = FT(model, FTConfig(lr_fo=1e-3))
    closure = lm_closure(model)
    losses = [ft.step(closure)["loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(t).all() for t in snapshot(model).values())


def test_hzo_deep_block_in_bf16_moves_as_far_as_in_fp32():
    """Updates of lr 1e-5 are below bf16's spacing for most weights: only fp32 masters keep them."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", torch.bfloat16).to(dtype)  # the same (bf16-exact) start
        hzo = zotune.HZO(model, deep_blocks=1, lr_fo=1e-5, lr_zo=0.0, max_grad_norm=None)
        before = deep_weights(model, hzo)
        closure = lm_closure(model)
        for _ in range(8):
            hzo.step(closure)
        after = deep_weights(model, hzo)
        moved[dtype] = sum((after[n].float() - before[n].float()).abs().sum() for n in before)
    assert moved[torch.float32] > 0
    assert moved[torch.bfloat16] == pytest.approx(float(moved[torch.float32]), rel=0.1)


def grads(step: int, shapes) -> list:
    """Fixed gradients, exact in bf16 (and so in fp32), with zero elements."""
    generator = torch.Generator().manual_seed(step)
    return [(torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) > 0.3))
            .to(torch.bfloat16) for shape in shapes]


def test_half_weights_are_the_rounding_of_an_fp32_adamw_run():
    torch.manual_seed(0)
    start = [torch.randn(4, 3) * 0.02, torch.randn(5) * 0.02]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]
    half = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in start]
    full = [torch.nn.Parameter(t.to(torch.bfloat16).float()) for t in start]
    mixed, plain = adamw(groups(half), lr=1e-5), torch.optim.AdamW(groups(full), lr=1e-5)
    assert isinstance(mixed, MasterAdamW) and type(plain) is torch.optim.AdamW
    for step in range(6):
        for optimizer, params in ((mixed, half), (plain, full)):
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads(step, [t.shape for t in start])):
                p.grad = g.to(p.dtype)
            if step == 3:  # a schedule sets the rate on the groups the optimizer shows
                for group in optimizer.param_groups:
                    group["lr"] = 1e-3
            optimizer.step()
    masters = [m for _, m in mixed._pairs()]
    assert all(torch.equal(m, f) for m, f in zip(masters, full))
    assert all(torch.equal(h, f.to(torch.bfloat16)) for h, f in zip(half, full))
    assert all(m.grad is None for m in masters)


def test_fp16_zero_gradients_stay_finite_at_lr_0():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = adamw([param], lr=0.0)
    param.grad = torch.tensor([0, 1e-3, 1, 0], dtype=torch.float16)
    optimizer.step()
    assert torch.equal(param, torch.ones(4, dtype=torch.float16))


def test_fp32_parameters_keep_plain_adamw_and_train_in_place():
    fp32 = torch.nn.Parameter(torch.randn(3))
    assert type(adamw([fp32])) is torch.optim.AdamW
    half = torch.nn.Parameter(torch.randn(3).half())
    mixed = adamw([{"params": [fp32, half]}], lr=1e-2)
    assert mixed.adamw.param_groups[0]["params"][0] is fp32  # its own master: no copy
    reference = torch.nn.Parameter(fp32.detach().clone())
    plain = torch.optim.AdamW([reference], lr=1e-2)
    for optimizer, params in ((mixed, [fp32, half]), (plain, [reference])):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    assert torch.equal(fp32, reference)


def test_state_dict_resumes_bit_identically_through_a_checkpoint(tmp_path):
    from zotune.recipe.checkpoint import load_state, save_state

    torch.manual_seed(0)
    start = [torch.randn(4, 3) * 0.02, torch.randn(5) * 0.02]

    def build():
        params = [torch.nn.Parameter(t.half()) for t in start]
        return params, adamw([{"params": params, "weight_decay": 0.1}], lr=1e-4)

    def run(params, optimizer, steps):
        for step in steps:
            for group in optimizer.param_groups:
                group["lr"] = 1e-4 * (1 + step)
            for p, g in zip(params, grads(step, [t.shape for t in start])):
                p.grad = g.half()
            optimizer.step()

    straight, optimizer = build()
    run(straight, optimizer, range(4))
    first, interrupted = build()
    run(first, interrupted, range(2))
    masters = [m for _, m in interrupted._pairs()]
    assert any(not torch.equal(m, p.float()) for m, p in zip(masters, first))  # the weights alone would not do
    save_state(tmp_path, "state", interrupted.state_dict())
    resumed, again = build()
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    again.load_state_dict(load_state(tmp_path, "state"))
    assert again.param_groups[0]["lr"] == 2e-4 and again.param_groups[0]["weight_decay"] == 0.1
    run(resumed, again, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(optimizer._pairs(), again._pairs()))


@pytest.mark.parametrize("method, checkpoint", [("hzo", "full"), ("hzo", "trajectory"), ("ft", "full")])
def test_fp16_run_resumes_bit_identically(tiny_model_dir, tmp_path, monkeypatch, method, checkpoint):
    from safetensors.torch import load_file

    from zotune.recipe.train import Interrupted, Run, resume_config, train

    from ..conftest import stop_after
    from ..recipe.test_train import config

    options = dict(method=method, dtype="fp16", lr=1e-3, zero_shot=False, eval_every=0, n_test=2, checkpoint=checkpoint)
    train(config(tiny_model_dir, tmp_path / "straight", **options))
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted):
        train(config(tiny_model_dir, tmp_path / "interrupted", **options))
    monkeypatch.setattr(Run, "train_step", original)
    train(resume_config(str(tmp_path / "interrupted"), {"progress": False}), resume=True)
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "interrupted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
