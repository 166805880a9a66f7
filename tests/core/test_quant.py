import pytest
import torch

import zotune
from tests.conftest import VOCAB, lm_closure, snapshot, tiny_model
from zotune.core import quant
from zotune.core.quant import (QuantizedEmbedding, QuantizedLinear, QuantizedWeight, dequantize, layout_of,
                               pack_int4, quantize, quantize_model, quantized_weights, unpack_int4)


def random_weight(out=48, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 4)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantization_error_is_at_most_half_a_step(name):
    layout = layout_of(name, 16)
    weight = random_weight()
    codes, scales, offsets = quantize(weight, layout, torch.float32)
    back = dequantize(codes, scales, offsets, layout, torch.float32)
    step = scales.repeat_interleave(16, dim=1)
    assert ((back - weight).abs() <= step / 2 + 1e-6).all()
    assert codes.dtype == (torch.int8 if name == "int8" else torch.uint8)
    assert codes.shape == (48, 64 if name == "int8" else 32)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantizing_dequantized_weights_is_lossless(name):
    """What lets a GGUF's blocks be kept: weights already on the grid come back bit for bit."""
    layout = layout_of(name, 32)
    once = dequantize(*quantize(random_weight(seed=1), layout, torch.float32), layout, torch.float32)
    twice = dequantize(*quantize(once, layout, torch.float32), layout, torch.float32)
    assert torch.equal(once, twice)


def test_an_all_zero_group_stays_zero():
    weight = random_weight()
    weight[:, :16] = 0
    for name in quant.FORMATS:
        layout = layout_of(name, 16)
        back = dequantize(*quantize(weight, layout, torch.float32), layout, torch.float32)
        assert torch.equal(back[:, :16], torch.zeros(48, 16))


def test_linear_equals_float_linear_of_the_dequantized_weights_also_in_chunks(monkeypatch):
    weight, bias = random_weight(), torch.randn(48)
    layer = QuantizedLinear(QuantizedWeight.of(weight, layout_of("int4", 16), torch.float32), bias)
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, layer.quantized.dequantized(), bias)
    assert torch.equal(layer(x), expected)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 64 * 10)  # 10 output rows at a time: 5 chunks
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_dequantizes_only_the_looked_up_rows():
    weight = QuantizedWeight.of(random_weight(), layout_of("int8", 32), torch.float32)
    embedding = QuantizedEmbedding(weight)
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(embedding(ids), weight.dequantized()[ids])


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_quantized_model_computes_nearly_the_same_logits(family, name):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        floats = sum(p.numel() * 4 for p in model.parameters())
        summary = quantize_model(model, name, group_size=16)
        logits = model(ids).logits
    assert summary["quantized"]
    assert all("forward of its own" in why for why in summary["kept"].values())  # OPT's learned positions
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in model.modules())
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error < (0.02 if name == "int8" else 0.2)
    remaining = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers() if b.dtype in (torch.int8, torch.uint8))
    assert remaining < floats * (0.45 if name == "int8" else 0.35)  # groups of 16: float scales weigh


def test_tied_weights_stay_tied_and_are_stored_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    summary = quantize_model(model, "int8", group_size=16)
    assert model.lm_head.quantized is model.transformer.wte.quantized
    assert len(quantized_weights(model)) == len(summary["quantized"]) - 1


def test_layers_whose_rows_do_not_fit_the_groups_are_kept_in_float_and_named():
    model = tiny_model("llama")
    summary = quantize_model(model, "int4", group_size=64)  # hidden 32: only the 64-wide down_proj fits
    assert summary["quantized"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "not a multiple of the group size 64" in summary["kept"]["model.embed_tokens"]


def test_a_quantized_model_runs_in_bfloat16():
    model = tiny_model("llama")
    quantize_model(model, "int4", group_size=16)
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.quantized.codes.dtype == torch.uint8
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="one of int8, int4"):
        layout_of("int3", 32)


def test_mezo_trains_the_scales_and_replays_them_bit_for_bit():
    """QZO's setting: the codes never change, the scales are ordinary parameters of the optimizer."""
    def quantized():
        model = tiny_model("llama")
        quantize_model(model, "int4", group_size=16)
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("scales"))
        return model

    model = quantized()
    codes = [w.codes.clone() for w in quantized_weights(model)]
    before = snapshot(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = zotune.MeZO(params, lr=1e-3, eps=1e-3, seed=3)
    for step in range(3):
        optimizer.step(lm_closure(model, seed=step))
    after = snapshot(model)
    assert all(torch.equal(c, w.codes) for c, w in zip(codes, quantized_weights(model)))
    assert all(torch.equal(before[n], after[n]) == (not n.endswith("scales")) for n in before)
    replayed = quantized()
    zotune.replay([(n, p) for n, p in replayed.named_parameters() if p.requires_grad], optimizer.trajectory)
    assert all(torch.equal(a, b) for a, b in zip(after.values(), snapshot(replayed).values()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_quantized_model_on_cuda_trains_its_scales_like_on_the_cpu(name):
    """The CUDA path of the quantized layers (never run before a GPU is lent): the same logits as on the CPU
    within float rounding, and a zeroth-order step on the scales that replays bit for bit on the GPU."""
    model = tiny_model("llama")
    quantize_model(model, name, group_size=16)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        model.cuda()
        assert torch.allclose(model(ids.cuda()).logits.cpu(), expected, atol=1e-4)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("scales"))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = zotune.MeZO(params, lr=1e-3, eps=1e-3, seed=1)
    cuda_ids = ids.cuda()
    optimizer.step(lambda: model(input_ids=cuda_ids, labels=cuda_ids).loss)
    again = tiny_model("llama")
    quantize_model(again, name, group_size=16)
    again.cuda()
    zotune.replay([(n, p) for n, p in again.named_parameters() if n.endswith("scales")], optimizer.trajectory)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(params, [(n, p) for n, p in again.named_parameters()
                                                                      if n.endswith("scales")]))
