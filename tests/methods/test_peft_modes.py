"""--peft lora|prefix for the zeroth-order methods (MeZO §1's variants): zeroth order on the
adapter alone, the base frozen; mode-dependent lr/eps defaults; prefix initialised from real
activations; whole runs export adapter/, evaluate, resume bit-identically and replay."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM

from zotune import cli, methods
from zotune.recipe import config as cfg
from zotune.errors import UserError
from zotune.methods.adapters import add_adapters, init_prefix, prefix_weight
from zotune.recipe.train import Interrupted, Run, resume_config, train

from ..conftest import VOCAB, stop_after, tiny_model
from ..recipe.test_train import config


# -- options and defaults ------------------------------------------------------------------------------------------

def test_lr_and_eps_default_by_mode_and_the_saved_config_keeps_the_numbers():
    expected = {"none": (1e-6, 1e-3), "lora": (1e-4, 1e-2), "prefix": (1e-2, 1e-1), "lowrank": (1e-4, 1e-3),
                "scales": (1e-6, 1e-5)}
    for peft, (lr, eps) in expected.items():
        options = cfg.from_mapping({"peft": peft, "quantize": "int4" if peft == "scales" else "none"}).options
        assert (options.lr_zo, options.eps) == (lr, eps)
    given = cfg.from_mapping({"peft": "prefix", "lr_zo": "1e-3"}).options  # YAML gives strings
    assert (given.lr_zo, given.eps, given.prefix_tokens) == (1e-3, 1e-1, 5)
    # config.yaml holds the resolved numbers: the file reads back to the same config.
    flat = cfg.from_mapping({"peft": "lora", "lora_r": 4}).to_dict()
    assert (flat["lr_zo"], flat["eps"], flat["lora_r"], flat["lora_targets"]) == (1e-4, 1e-2, 4, "q_proj,v_proj")
    assert cfg.from_mapping(yaml.safe_load(yaml.safe_dump(flat))) == cfg.from_mapping(flat)
    hzo = cfg.from_mapping({"method": "hzo", "peft": "lora"}).options
    assert (hzo.lr_fo, hzo.lr_zo, hzo.eps) == (1e-4, 1e-4, 1e-2)
    plain = cfg.from_mapping({"method": "hzo"}).options
    assert (plain.lr_zo, plain.eps) == (1e-6, 1e-3)
    assert cfg.from_mapping({"method": "lmao"}).options.eps == 1e-3  # shared eps: the other methods keep theirs
    cfg.method_fields()  # lr, eps, lora_*: one type per name across the methods
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "default by --peft: none 1e-6, lora 1e-4, lowrank 1e-4, prefix 1e-2, scales 1e-6" in help_text
    assert "--prefix-tokens" in help_text


@pytest.mark.parametrize("values, message", [
    ({"peft": "ia3"}, "peft 'ia3' is not one of none, lora, lowrank, prefix, scales"),
    ({"peft": "lora", "offload": "cpu"}, "--peft lora trains a small adapter on a frozen model"),
    ({"method": "hzo", "peft": "lora", "offload": "cpu"}, "drop --offload"),
    ({"method": "hzo", "peft": "prefix"}, "use --method mezo --peft prefix"),
    ({"peft": "prefix", "prefix_tokens": 0}, "--prefix-tokens must be positive"),
    ({"peft": "lora", "lora_r": 0}, "--lora-r must be positive"),
])
def test_bad_combinations_are_one_line_user_errors(values, message):
    with pytest.raises(UserError, match=message) as error:
        cfg.from_mapping(values)
    assert len(str(error.value).splitlines()) == 1


def test_adapters_a_model_cannot_take_are_one_line_user_errors():
    masked = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64)).eval()
    with pytest.raises(UserError, match="--peft prefix needs a causal LM"):
        methods.MeZOMethod(masked, methods.MeZOConfig(peft="prefix"))
    with pytest.raises(UserError, match="LoRA targets q_proj,v_proj"):  # GPT-2's attention is one c_attn
        methods.MeZOMethod(tiny_model("gpt2"), methods.MeZOConfig(peft="lora"))


# -- the method --------------------------------------------------------------------------------------------------

def toy_closure(model, stacked=False):
    """A toy objective the adapters can lower: predict token 7 everywhere."""
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))

    def closure(copies=None):
        logits = model(input_ids=ids.repeat(copies or 1, 1)).logits
        each = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.full(((copies or 1) * 32,), 7),
                                                 reduction="none").view(copies or 1, -1).mean(1)
        return each if copies else each[0]

    return closure


@pytest.mark.parametrize("peft, lr", [("lora", 3e-2), ("prefix", 3e-1)])
def test_only_the_adapter_trains_and_the_loss_decreases(peft, lr):
    model = tiny_model("llama")
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    method = methods.MeZOMethod(model, methods.MeZOConfig(peft=peft, lr_zo=lr, stacked=True), seed=0, steps=20)
    adapter = {n: p.detach().clone() for n, p in method.model.named_parameters() if p.requires_grad}
    assert sorted(sum(method.optimizer.trajectory.keys, [])) == sorted(adapter)  # named: replay finds them
    assert len(adapter) == (8 if peft == "lora" else 1)  # q_proj, v_proj A and B in 2 layers; one prefix tensor
    closure = toy_closure(method.model, stacked=True)
    with torch.no_grad():
        before = float(closure())
    for _ in range(20):
        method.step(closure)
    with torch.no_grad():
        after = float(closure())
    assert after < before - 0.05, (before, after)
    for name, p in model.named_parameters():  # the base model inside the wrapper: bit-identical
        if name in base:
            assert torch.equal(p, base[name]), name
    trained = dict(method.model.named_parameters())
    assert all(not torch.equal(trained[n], adapter[n]) for n in adapter)


@pytest.mark.parametrize("peft", ["lora", "prefix"])
def test_stacked_evaluation_gives_the_sequential_losses(peft):
    runs = []
    for stacked in (False, True):
        method = methods.MeZOMethod(tiny_model("llama"), methods.MeZOConfig(peft=peft, stacked=stacked), seed=1)
        closure = toy_closure(method.model)
        runs.append([method.step(closure)["loss"] for _ in range(3)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prefix_starts_as_the_base_model_reading_random_vocabulary_tokens(family):
    options = methods.MeZOConfig(peft="prefix")
    wrapped = add_adapters(tiny_model(family), options, seed=3)
    tokens = init_prefix(wrapped, seed=3)  # the same draw again
    weight = prefix_weight(wrapped)
    assert weight.shape[0] == 5 and weight.abs().min() > 0 and weight.std() > 0.05  # activations, not zeros
    # The adapted model on a prompt is the base model on (the random tokens + the prompt), exactly.
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    attention = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        adapted = wrapped(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        base = wrapped.get_base_model()(input_ids=torch.cat([tokens.repeat(2, 1), ids], 1),
                                        attention_mask=torch.cat([torch.ones(2, 5, dtype=torch.long), attention], 1),
                                        position_ids=torch.cat([torch.arange(5).repeat(2, 1), positions + 5], 1)).logits
    assert torch.allclose(adapted, base[:, 5:], atol=1e-5)
    # A function of the seed alone, whatever the global RNG says; another seed, another prefix.
    torch.manual_seed(123)
    again = prefix_weight(add_adapters(tiny_model(family), options, seed=3))
    other = prefix_weight(add_adapters(tiny_model(family), options, seed=4))
    assert torch.equal(again, weight) and not torch.equal(other, weight)


def test_lora_init_is_a_function_of_the_seed():
    options = methods.MeZOConfig(peft="lora")
    weights = []
    for seed, rng in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(rng)
        wrapped = add_adapters(tiny_model("llama"), options, seed)
        weights.append({n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad})
    same, other = weights[0], weights[2]
    assert all(torch.equal(same[n], weights[1][n]) for n in same)
    assert any(not torch.equal(same[n], other[n]) for n in same if "lora_A" in n)
    assert all(not p.any() for n, p in same.items() if "lora_B" in n)  # B starts at zero: the base model's output


# -- whole runs --------------------------------------------------------------------------------------------------

VARIANTS = {  # full checkpoints hold the adapter; trajectory ones rebuild it from the seed (checked by sha256)
    "mezo-lora-trajectory": ("mezo", "lora", "trajectory"),
    "mezo-prefix-trajectory": ("mezo", "prefix", "trajectory"),
    "hzo-lora-full": ("hzo", "lora", "full"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_run_exports_the_adapter_evaluates_resumes_and_replays(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                variant):
    method, peft, checkpoint = VARIANTS[variant]
    options = dict(method=method, peft=peft, checkpoint=checkpoint, eval_every=0)
    straight = tmp_path / "straight"
    result = train(config(tiny_model_dir, straight, **options))
    names = {p.name for p in straight.iterdir()}
    assert {"adapter", "trajectory.json"} <= names and "model" not in names
    assert ("first_order.safetensors" in names) == (method == "hzo")
    saved = yaml.safe_load((straight / "config.yaml").read_text())
    assert saved["peft"] == peft and saved["eps"] == (1e-1 if peft == "prefix" else 1e-2)
    adapter = load_file(straight / "adapter" / "adapter_model.safetensors")
    assert (all("lora_" in k for k in adapter) and len(adapter) == 8) if peft == "lora" else \
        list(adapter) == ["prompt_embeddings"]

    # zotune eval --run: the base model with the adapter scores as the run did.
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(straight), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == result["test_accuracy"]

    # Interrupted after step 2, resumed: bit-identical adapter and metrics.
    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted):
        train(config(tiny_model_dir, interrupted, **options))
    monkeypatch.setattr(Run, "train_step", original)
    with pytest.raises(UserError, match="cannot change: peft"):
        resume_config(str(interrupted), {"peft": "none"})
    train(resume_config(str(interrupted), {"progress": False}), resume=True)
    resumed = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    strip = lambda path: [{k: v for k, v in json.loads(row).items() if k not in ("examples_per_s", "peak_memory_mb")}
                          for row in path.read_text().splitlines()]
    assert strip(interrupted / "metrics.jsonl") == strip(straight / "metrics.jsonl")

    # zotune replay: the seeded initial adapter plus the trajectory (and HZO's first-order part) is the run's adapter.
    assert cli.main(["replay", "--run", str(straight)]) == 0
    assert "bit-identical to the run's adapter" in capsys.readouterr().out
