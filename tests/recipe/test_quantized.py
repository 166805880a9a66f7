import pytest
import torch
from safetensors.torch import load_file

from zotune.errors import UserError
from zotune.recipe.evaluation import evaluate_run, replay_run
from zotune.recipe.train import Interrupted, Run, resume_config, train

from ..conftest import stop_after
from .test_train import config

QZO = dict(method="mezo", quantize="int4", group_size=16, peft="scales", lr=1e-5, eps=1e-4)


@pytest.mark.parametrize("checkpoint, stacked", [("full", False), ("trajectory", True)])
def test_zeroth_order_on_the_scales_of_a_quantized_base_exports_replays_and_resumes(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, checkpoint, stacked):
    straight = tmp_path / "straight"
    result = train(config(tiny_model_dir, straight, checkpoint=checkpoint, stacked=stacked, **QZO))
    scales = load_file(straight / "scales" / "scales.safetensors")
    assert any(name.endswith(".scales") for name in scales) and not any(name.endswith(".offsets") for name in scales)
    base = Run(config(tiny_model_dir, tmp_path / "base", **QZO), resume=False).model
    initial = dict(base.named_parameters())
    assert any(not torch.equal(scales[name], initial[name]) for name in scales)
    assert evaluate_run(str(straight), progress=False)["test_accuracy"] == result["test_accuracy"]
    assert "bit-identical to the run's scales" in replay_run(str(straight), str(tmp_path / "replayed"))

    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, interrupted, checkpoint=checkpoint, stacked=stacked, **QZO))
    monkeypatch.setattr(Run, "train_step", original)
    train(resume_config(str(interrupted), {"progress": False}), resume=True)
    again = load_file(interrupted / "scales" / "scales.safetensors")
    assert all(torch.equal(scales[name], again[name]) for name in scales)


def test_a_quantized_base_without_trainable_scales_is_refused_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"train their scales \(--peft scales\) or adapters on top"):
        Run(config(tiny_model_dir, tmp_path / "run", quantize="int8"), resume=False)


def test_a_quantized_base_evaluates(tiny_model_dir):
    from zotune.recipe.evaluation import evaluate_model

    result = evaluate_model(config(tiny_model_dir, "unused", quantize="int4", group_size=16))
    assert 0 <= result["test_accuracy"] <= 1


@pytest.mark.parametrize("options, message", [
    (dict(peft="scales"), "add --quantize int8 or int4"),
    (dict(quantize="int4", peft="scales", group_size=0), "--group-size"),
])
def test_quantized_runs_refuse_what_they_cannot_do_in_one_line(tiny_model_dir, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        config(tiny_model_dir, tmp_path / "run", **{"method": "mezo", **options})


@pytest.mark.parametrize("method, options", [("mezo", dict(peft="lora", lr=1e-2, eps=1e-2)),
                                             ("mezo", dict(peft="lowrank", lr=1e-2, eps=1e-2)),
                                             ("lora-ft", dict(lr=1e-2))])
def test_lora_adapters_on_a_quantized_base_train_export_and_evaluate(tiny_model_dir, tmp_path, method, options):
    """QLoRA's pattern (lora-ft: by first order through the dequantized base) and its zeroth-order twin."""
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, out, method=method, quantize="int4", group_size=16, **options))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in adapter.items())
    assert evaluate_run(str(out), progress=False)["test_accuracy"] == result["test_accuracy"]
    if method == "mezo":
        assert "bit-identical to the run's adapter" in replay_run(str(out), str(tmp_path / "replayed"))
    if options.get("peft") == "lowrank":  # A is the frozen direction V, drawn from the seed; only B moved
        again = load_file(tmp_path / "replayed" / "adapter_model.safetensors")
        a = [name for name in adapter if "lora_A" in name]
        assert a and all(torch.equal(adapter[name], again[name]) for name in a)
        assert all(abs(adapter[name].std().item() * adapter[name].shape[0] ** 0.5 - 1) < 0.3 for name in a)


def test_hzo_on_a_quantized_base_keeps_its_first_order_blocks_in_float(tiny_model_dir, tmp_path):
    """QLoRA's pattern for HZO: the shallow part's scales by zeroth order, the deep block in float by AdamW."""
    from zotune.core.quant import QuantizedLinear

    out = tmp_path / "run"
    options = dict(method="hzo", quantize="int4", group_size=16, peft="scales", lr_fo=1e-2, lr_zo=1e-5, eps=1e-4)
    run = Run(config(tiny_model_dir, tmp_path / "probe", **options), resume=False)
    layers = run.model.model.layers
    assert isinstance(layers[0].mlp.down_proj, QuantizedLinear)
    assert type(layers[-1].mlp.down_proj) is torch.nn.Linear
    result = train(config(tiny_model_dir, out, **options))
    saved = load_file(out / "scales" / "scales.safetensors")
    base = dict(run.model.named_parameters())
    changed = {name for name in saved if not torch.equal(saved[name], base[name])}
    assert any(name.startswith("model.layers.0.") and name.endswith(".scales") for name in changed)
    assert any(name.startswith("model.layers.1.") and name.endswith(".weight") for name in changed)
    assert evaluate_run(str(out), progress=False)["test_accuracy"] == result["test_accuracy"]
    assert "bit-identical to the run's scales" in replay_run(str(out), str(tmp_path / "replayed"))


def test_lmao_on_a_quantized_base_trains_adapters_by_adamw_and_scales_by_zeroth_order(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, out, method="lmao", quantize="int4", group_size=16, lr_fo=1e-2, lr_zo=1e-5,
                          eps=1e-4))
    names = {p.name for p in out.iterdir()}
    assert {"adapter", "scales", "trajectory.json"} <= names and "model" not in names
    assert evaluate_run(str(out), progress=False)["test_accuracy"] == result["test_accuracy"]
    assert "bit-identical to the run's scales" in replay_run(str(out), str(tmp_path / "replayed"))
