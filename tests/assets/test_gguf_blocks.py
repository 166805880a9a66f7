import numpy as np
import pytest
import torch

from zotune.assets import gguf_blocks, models
from zotune.assets.cache import CACHE_ENV
from zotune.core.quant import QuantizedEmbedding, QuantizedLinear, dequantize
from zotune.errors import UserError

from .test_convert import write_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def dequantized(data, kind, rows, columns):
    codes, scales, offsets, layout = gguf_blocks.blocks(data, kind, rows, columns)
    return dequantize(codes, scales, offsets, layout, torch.float32).numpy()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_are_kept_without_loss(kind):
    weights = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    data = gguf.quants.quantize(weights, T[kind])
    assert np.array_equal(dequantized(data, kind, 6, 128), gguf.quants.dequantize(data, T[kind]))


def test_q4_k_blocks_differ_only_by_the_float16_rounding_of_their_scales():
    rng = np.random.default_rng(1)
    rows, columns = 3, 512
    data = rng.integers(0, 256, (rows, columns // 256, 144), dtype=np.uint8)
    halves = rng.uniform(1e-3, 2e-2, (rows, columns // 256, 2)).astype(np.float16)
    data[..., :4] = halves.view(np.uint8).reshape(rows, columns // 256, 4)  # d and dmin, small and positive
    data = data.reshape(rows, -1)
    reference = gguf.quants.dequantize(data, T.Q4_K)
    ours = dequantized(data, "Q4_K", rows, columns)
    assert np.abs(ours - reference).max() <= 2e-3 * np.abs(reference).max()


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf", kind="Q4_1")


def test_a_gguf_keeps_its_blocks_and_computes_what_the_float_conversion_computes(q4_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the float conversion is cached
    model, tokenizer, kind = models.load(str(q4_gguf), device="cpu", keep_quantized=True)
    floats, _, _ = models.load(str(q4_gguf), device="cpu")
    assert kind == "causal"
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)  # rows put back in HF's order
    assert model.model.layers[0].self_attn.q_proj.quantized.layout.bits == 4
    ids = tokenizer("The film was great. It was terrible.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, floats(ids).logits, atol=1e-5)


def test_the_first_order_blocks_of_a_kept_gguf_come_back_in_float(q4_gguf):
    model, _, _ = models.load(str(q4_gguf), device="cpu", keep_quantized=True,
                              keep_float=lambda model: ("model.layers.1",))
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)


def test_an_unsupported_block_type_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "tiny.Q5_0.gguf", kind="Q5_0")
    with pytest.raises(UserError, match="is Q5_0; --keep-quantized reads Q8_0, Q4_0, Q4_1, Q4_K matrices"):
        models.load(str(path), device="cpu", keep_quantized=True)


def test_train_eval_and_replay_on_a_kept_gguf(q4_gguf, tmp_path, capsys):
    from zotune import cli
    from zotune.recipe.evaluation import evaluate_run, replay_run

    from ..test_cli import CSV_TASK

    out = tmp_path / "run"
    args = ["train", "--model", str(q4_gguf), "--keep-quantized", "--peft", "scales", *CSV_TASK, "--steps", "2",
            "--batch-size", "2", "--lr-zo", "1e-5", "--eps", "1e-4", "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert (out / "scales" / "scales.safetensors").is_file()
    accuracy = [line for line in capsys.readouterr().out.splitlines() if "test accuracy" in line]
    assert accuracy and 0 <= evaluate_run(str(out), progress=False)["test_accuracy"] <= 1
    assert "bit-identical to the run's scales" in replay_run(str(out), str(tmp_path / "replayed"))


def test_keep_quantized_needs_a_gguf(tiny_model_dir, capsys):
    from zotune import cli

    assert cli.main(["train", "--model", str(tiny_model_dir), "--keep-quantized", "--peft", "scales"]) != 0
    assert "is not a .gguf file" in capsys.readouterr().err


def test_a_damaged_gguf_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "cut.Q4_1.gguf", kind="Q4_1")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5000)
    with pytest.raises(UserError, match="cannot read"):
        models.load(str(path), device="cpu", keep_quantized=True)
