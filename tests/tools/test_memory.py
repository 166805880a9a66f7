"""`zotune memory`: estimates from a config built on the meta device."""

import pytest
import torch

from zotune import cli
from zotune.tools import bench
from zotune.tools import memory
from zotune.engine.blocks import find_blocks
from zotune.errors import UserError
from zotune.methods import HZOConfig, HZOMethod, MeZOConfig, MeZOMethod
from zotune.methods.footprint import host_bytes, slot_bytes, stacked_copies

from ..conftest import tiny_model


def test_the_meta_model_is_counted_like_the_real_one():
    model = tiny_model("llama")
    shape = memory.shape_of(model.config)
    named = dict(model.named_parameters())
    assert shape.params == sum(p.numel() for p in named.values())
    assert shape.largest == max(p.numel() for p in named.values())
    assert shape.blocks == 2 and shape.block == sum(p.numel() for n, p in named.items() if n.startswith("model.layers.0."))
    assert shape.matrices == tuple(sum(p.numel() for p in layer.parameters() if p.ndim == 2)
                                   for layer in model.model.layers)
    # LoRA r 8 on q_proj (32 -> 32) and v_proj (32 -> 16) of each block.
    assert shape.lora == 2 * 8 * ((32 + 32) + (32 + 16))


def test_estimates_keep_the_methods_order_and_offload_streams_the_blocks():
    shape = memory.shape_of(bench.build_config("opt-13b"))
    assert 12.8e9 < shape.params < 12.9e9 and shape.blocks == 40
    peak = memory.estimate(shape, 16, 128, "fp16")
    assert peak["mezo"] - peak["inference"] == shape.largest * 2  # one perturbed copy of the largest tensor
    assert peak["inference"] < peak["mezo"] < peak["lora-ft"] < peak["ft"]
    assert peak["mezo-offload"] < 0.2 * peak["mezo"] and peak["hzo-offload"] < peak["hzo"]
    assert peak.host["mezo-offload"] == sum(shape.matrices) * 2 > peak.host["hzo-offload"]
    # Offloaded MeZO stacks its evaluations: its forward's transient grows with each copy of the batch.
    twice = memory.estimate(shape, 32, 128, "fp16")
    copies = stacked_copies(MeZOConfig)
    assert copies == 2 and twice["mezo-offload"] - peak["mezo-offload"] == copies * (twice["mezo"] - peak["mezo"])
    # Twice the dtype, twice the weights.
    assert memory.estimate(shape, 16, 128, "fp32")["inference"] > 1.9 * peak["inference"]


@pytest.mark.parametrize("method", ["mezo", "hzo"])
def test_the_offload_terms_are_what_the_engine_allocates(family, method):
    model = tiny_model(family)
    shape = memory.shape_of(model.config)
    if method == "mezo":
        built = MeZOMethod(model, MeZOConfig(offload="cpu"))
        deep, blocks = 0, [module for _, module in find_blocks(model).blocks]
    else:  # the deep blocks train by first order and stay on the device
        built = HZOMethod(model, HZOConfig(offload="cpu"))
        deep, blocks = built.config.deep_blocks, built.optimizer.shallow_blocks
    assert 0 < len(blocks) == shape.blocks - deep
    assert slot_bytes(shape, "fp32", deep) == built.engine.device_bytes
    # Streamed matrices are views of the engine's host buffers: what those hold is the host term, the rest stays.
    host = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for block in blocks for p in block.parameters() if p.ndim >= 2}
    assert host_bytes(shape, "fp32", deep) == sum(host.values())
    stays = sum(p.numel() * 4 for p in model.parameters() if p.untyped_storage().data_ptr() not in host)
    assert shape.params * 4 - host_bytes(shape, "fp32", deep) == stays


def test_the_command_answers_for_a_built_in_config_and_says_what_fits(capsys):
    assert cli.main(["memory", "--model", "opt-175b", "--gpu", "24GB"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"inference", "mezo", "mezo-offload", "es", "lora-ft", "ft", "lmao", "hzo", "hzo-offload"}
    assert rows["mezo"][-1] == "no" and rows["mezo-offload"][-1] == "yes"
    # The offloaded rows add the CPU RAM of the streamed blocks: 96 blocks of 12 h² fp16 weights (h 12288).
    assert len(rows["mezo"]) == 3 and float(rows["mezo-offload"][2]) == round(96 * 12 * 12288**2 * 2 / 2**30, 2)
    assert float(rows["hzo-offload"][2]) == round(95 * 12 * 12288**2 * 2 / 2**30, 2)  # the deep block stays


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 2**30), ("80 GiB", 80 * 2**30), ("40", 40 * 2**30)])
def test_gpu_sizes(text, expected):
    assert memory.parse_size(text) == expected


def test_a_bad_gpu_size_is_a_user_error():
    with pytest.raises(UserError, match="give the card's memory"):
        memory.parse_size("lots")


def test_nothing_is_allocated(monkeypatch):
    allocated = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.device.type != "meta" and tensor.numel() > 1_000_000:
            allocated.append(tensor.shape)
        return tensor

    monkeypatch.setattr(torch, "empty", spy)
    memory.shape_of(bench.build_config("opt-1.3b"))
    assert allocated == []


def test_a_masked_lm_config_is_built_as_one(tmp_path, monkeypatch, capsys):
    import transformers

    def refuse(*args, **kwargs):  # a BERT built as a causal LM has a warning of its own for the user
        raise AssertionError("built as a causal LM")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    transformers.RobertaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                               vocab_size=100, architectures=["RobertaForMaskedLM"]).save_pretrained(tmp_path)
    assert cli.main(["memory", "--model", str(tmp_path)]) == 0
    assert "3 blocks" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_the_adamw_term_is_what_the_optimizer_holds(monkeypatch, dtype):
    """Weights, gradients, masters and moments at the inner AdamW step, per trained element."""
    from dataclasses import replace

    from zotune.methods import FT, FTConfig

    from ..conftest import lm_closure

    model = tiny_model("llama", {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    ft = FT(model, FTConfig(lr_fo=1e-4))
    inner = getattr(ft.optimizer, "adamw", ft.optimizer)  # the float32 AdamW behind half weights
    held = {}
    original = inner.step

    def counting():
        original()
        tensors = [t for p in model.parameters() for t in (p, p.grad)]
        for group in inner.param_groups:
            for master in group["params"]:
                tensors += [master, master.grad, inner.state[master]["exp_avg"], inner.state[master]["exp_avg_sq"]]
        held.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors})

    monkeypatch.setattr(inner, "step", counting)
    ft.step(lm_closure(model))
    shape = memory.shape_of(model.config)
    per_element = (memory.estimate(replace(shape, params=shape.params + 1), 1, 1, dtype)["ft"]
                   - memory.estimate(shape, 1, 1, dtype)["ft"])
    assert per_element == {"fp32": 16, "fp16": 20, "bf16": 20}[dtype]
    assert sum(held.values()) == shape.params * per_element


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_rows_count_the_bytes_that_quantize_model_stores(name):
    from zotune.core.quant import quantize_model

    model = tiny_model("llama")
    shape = memory.shape_of(model.config)
    peak = memory.estimate(shape, 2, 8, "fp32", quantize=name, group_size=16)
    summary = quantize_model(model, name, group_size=16)
    floats = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.endswith(("scales", "offsets")))
    footprint = memory.Footprint(shape, 2, 8, "fp32", quantize=name, group_size=16)
    assert footprint.quantized_weights == summary["bytes"] + floats
    assert peak[f"{name} inference"] < peak[f"{name} mezo"] < peak["mezo"]


def test_a_13b_base_in_4_bits_trains_forward_only_in_under_10_gb():
    shape = memory.shape_of(bench.build_config("opt-13b"))
    assert memory.estimate(shape, 16, 128, "fp16", quantize="int4")["int4 mezo"] < 10e9
