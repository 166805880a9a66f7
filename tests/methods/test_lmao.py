import pytest
import torch
from peft import LoraConfig, get_peft_model

import zotune
from zotune.methods.adapters import is_adapter

from ..conftest import lm_closure, tiny_model

TARGETS = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def lora_model(family, seed=0):
    model = tiny_model(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[family],
                            fan_in_fan_out=family == "gpt2")
        model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero; make it non-zero so that adapters matter in the ZO phase
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    return model


def split(model):
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n)}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter(n)}
    return adapters, base


def changed(before, model):
    now = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, now[n])}


def test_each_phase_changes_only_its_own_parameters(family):
    for lr_fo, lr_zo, adapters_move, base_moves in ((1e-2, 0.0, True, False), (0.0, 1e-2, False, True),
                                                         (1e-2, 1e-2, True, True)):
        model = lora_model(family)
        adapters, base = split(model)
        optimizer = zotune.LMAO(model, lr_fo=lr_fo, lr_zo=lr_zo, eps=1e-2)
        optimizer.step(lm_closure(model))
        assert bool(changed(adapters, model)) == adapters_move
        assert changed(base, model) == (set(base) if base_moves else set())
        assert all(p.grad is None for p in model.parameters())


def test_lr_zo_zero_is_lora_fine_tuning(family):
    model, reference = lora_model(family), lora_model(family)
    optimizer = zotune.LMAO(model, lr_fo=1e-2, lr_zo=0.0, max_grad_norm=0.5)
    adapters = [p for n, p in reference.named_parameters() if is_adapter(n)]
    for n, p in reference.named_parameters():
        p.requires_grad_(is_adapter(n))
    adamw = torch.optim.AdamW(adapters, lr=1e-2, weight_decay=0.0)
    for step in range(3):
        torch.manual_seed(step)  # OPT's dropout: the same masks in both runs
        optimizer.step(lm_closure(model, seed=step))
        torch.manual_seed(step)
        reference.train()
        adamw.zero_grad()
        lm_closure(reference, seed=step)().backward()
        torch.nn.utils.clip_grad_norm_(adapters, 0.5)
        adamw.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_lr_fo_zero_is_mezo_on_the_base_weights(family):
    model, reference = lora_model(family), lora_model(family)
    optimizer = zotune.LMAO(model, lr_fo=0.0, lr_zo=1e-2, eps=1e-2, seed=5)
    for n, p in reference.named_parameters():
        p.requires_grad_(not is_adapter(n))
    mezo = zotune.MeZO([(n, p) for n, p in reference.named_parameters() if not is_adapter(n)],
                       lr=1e-2, eps=1e-2, seed=5)
    reference.eval()
    for step in range(3):
        optimizer.step(lm_closure(model, seed=step))
        mezo.step(lm_closure(reference, seed=step))
    assert [s.grads for s in optimizer.trajectory.steps] == [s.grads for s in mezo.trajectory.steps]
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_resume_is_bit_identical():
    straight = lora_model("llama")
    optimizer = zotune.LMAO(straight, lr_fo=1e-2, lr_zo=1e-2, eps=1e-2)
    for step in range(4):
        optimizer.step(lm_closure(straight, seed=step))

    first = lora_model("llama")
    optimizer = zotune.LMAO(first, lr_fo=1e-2, lr_zo=1e-2, eps=1e-2)
    for step in range(2):
        optimizer.step(lm_closure(first, seed=step))
    saved_weights = {n: p.detach().clone() for n, p in first.named_parameters()}
    saved_state = optimizer.state_dict()

    resumed = lora_model("llama", seed=1)  # different init: everything must come from the checkpoint
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(saved_weights[n])
    optimizer = zotune.LMAO(resumed, lr_fo=1e-2, lr_zo=1e-2, eps=1e-2)
    optimizer.load_state_dict(saved_state)
    for step in range(2, 4):
        optimizer.step(lm_closure(resumed, seed=step))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_needs_adapters():
    with pytest.raises(ValueError, match="LoRA adapters"):
        zotune.LMAO(tiny_model("llama"))


def test_the_previous_keywords_still_work_and_name_the_new_ones():
    model = lora_model("llama")
    with pytest.warns(FutureWarning, match="LMAO's lr_lora is now lr_fo"):
        optimizer = zotune.LMAO(model, lr_lora=3e-3, lr_base=2e-6)
    assert (optimizer.fo.param_groups[0]["lr"], optimizer.zo.param_groups[0]["lr"]) == (3e-3, 2e-6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr_adapters'"):
        zotune.LMAO(model, lr_adapters=1e-3)
