import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.recipe.config import from_mapping
from zotune.recipe.train import Interrupted, Run, lr_factor, resume_config, train

from ..conftest import DATA, stop_after


def config(model_dir, out, **extra):
    values = dict(model=str(model_dir), task="csv", data=str(DATA / "reviews.csv"), template="{text} It was",
                  candidates="neg=terrible,pos=great", n_train=16, n_dev=4, n_test=8, steps=4, batch_size=2,
                  eval_every=2, output=str(out), progress=False)
    values.update(extra)
    return from_mapping(values)  # flat: run fields and the method's options


LRS = {"mezo": 1e-2, "ft": 1e-3, "lora-ft": 1e-2, "lmao": 1e-2, "hzo": 1e-2}
# Runs of a method with options: (method, options).
VARIANTS = {"mezo-offload": ("mezo", {"offload": "cpu"}), "hzo-offload": ("hzo", {"offload": "cpu", "lr_zo": 1e-2}),
            "lmao-cosine": ("lmao", {"lr_schedule": "cosine", "warmup_steps": 1})}


def final_weights(out, method):
    if method == "lmao":  # the merged model and the adapter must both match
        return {**load_file(out / "model" / "model.safetensors"),
                **{"adapter." + k: v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}}
    if method == "lora-ft":
        return load_file(out / "adapter" / "adapter_model.safetensors")
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("variant", ["mezo", "ft", "lora-ft", "lmao", "hzo", "mezo-offload", "hzo-offload",
                                     "lmao-cosine"])
def test_run_folder_and_interrupted_resume_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch, variant):
    method, options = VARIANTS.get(variant, (variant, {}))
    options = {"lr": LRS[method], **options}
    straight = tmp_path / "straight"
    result = train(config(tiny_model_dir, straight, method=method, **options))
    names = {p.name for p in straight.iterdir()}
    assert {"config.yaml", "samples.json", "metrics.jsonl", "result.json"} <= names
    assert ("adapter" in names) == (method in ("lora-ft", "lmao")) and ("model" in names) == (method != "lora-ft")
    assert ("trajectory.json" in names) == (method in ("mezo", "lmao", "hzo")) and "checkpoint" not in names
    assert ("first_order.safetensors" in names) == (method == "hzo")
    assert result["steps"] == 4 and 0 <= result["test_accuracy"] <= 1
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "test_accuracy": result["zero_shot_accuracy"]}
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4] and "dev_accuracy" in rows[2]
    assert all(k in rows[1] for k in ("loss", "lr", "examples_per_s", "peak_memory_mb"))
    assert ("projected_grad" in rows[1]) == (method in ("mezo", "lmao", "hzo"))

    # Ctrl-C after step 2 (the signal handler only sets the flag), then --resume.
    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, interrupted, method=method, **options))
    assert (interrupted / "checkpoint").is_dir() and not (interrupted / "result.json").exists()
    monkeypatch.setattr(Run, "train_step", original)
    resumed = train(resume_config(str(interrupted), {"progress": False}), resume=True)

    a, b = final_weights(straight, method), final_weights(interrupted, method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == result["test_accuracy"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("examples_per_s", "peak_memory_mb")} for r in rows]
    again = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert strip(again) == strip(rows)


def test_lr_schedules_scale_every_rate_of_the_method():
    assert [lr_factor("constant", s, 4) for s in range(4)] == [1, 1, 1, 1]
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1, 0.75, 0.5, 0.25]
    assert [lr_factor("linear", s, 5, warmup=2) for s in range(5)] == [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]
    cosine = [lr_factor("cosine", s, 4) for s in range(4)]
    assert cosine[0] == 1 and cosine == sorted(cosine, reverse=True) and 0 < cosine[-1] < 0.25


def test_a_run_follows_its_lr_schedule_and_records_it(tiny_model_dir, tmp_path):
    train(config(tiny_model_dir, tmp_path / "run", method="mezo", lr=1e-2, lr_schedule="linear", zero_shot=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    trajectory = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert [step["lrs"][0] for step in trajectory["steps"]] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_lmao_run_exports_a_merged_model_that_evaluates_like_the_adapted_one(tiny_model_dir, tmp_path):
    from zotune.recipe.evaluation import evaluate_run

    out = tmp_path / "lmao"
    result = train(config(tiny_model_dir, out, method="lmao", lr=1e-2, lr_base=1e-2, zero_shot=False))
    assert evaluate_run(str(out), progress=False)["test_accuracy"] == result["test_accuracy"]
    # The base weights alone come back from the trajectory; with the adapter merged they are the run's model.
    from zotune.recipe.evaluation import replay_run

    message = replay_run(str(out), str(tmp_path / "base"))
    assert "bit-identical to the run's model with the adapter merged" in message
    base = load_file(tmp_path / "base" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert base.keys() == initial.keys() and all(not torch.equal(base[k], initial[k]) for k in base)


def test_training_changes_only_what_the_method_trains(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    train(config(tiny_model_dir, tmp_path / "mezo", method="mezo", lr=1e-2, zero_shot=False))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "mezo" / "model")
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters())]
    assert all(changed)
    train(config(tiny_model_dir, tmp_path / "lora", method="lora-ft", lr=1e-2, zero_shot=False))
    adapter = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)


def test_resume_refuses_changed_settings_and_finished_runs(tiny_model_dir, tmp_path):
    from zotune.errors import UserError

    out = tmp_path / "run"
    train(config(tiny_model_dir, out, steps=1, zero_shot=False))
    with pytest.raises(UserError, match="cannot change: lr"):
        resume_config(str(out), {"lr": 0.5})
    with pytest.raises(UserError, match="has finished"):
        train(resume_config(str(out), {"steps": 3}), resume=True)
    with pytest.raises(UserError, match="holds another run"):
        train(config(tiny_model_dir, out))
    train(config(tiny_model_dir, out, steps=1, zero_shot=False, overwrite=True))


def test_library_run_leaves_the_global_rng_alone(tiny_model_dir, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(config(tiny_model_dir, tmp_path / "run", method="lora-ft", steps=2, zero_shot=False))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["mezo", "lora-ft"])
def test_masked_lm_trains_and_evaluates(tmp_path, method):
    from ..conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "bert", masked=True)
    result = train(config(model_dir, tmp_path / "run", method=method, lr=LRS[method], steps=2,
                          lora_targets="query,value"))
    assert 0 <= result["test_accuracy"] <= 1 and result["steps"] == 2


@pytest.mark.parametrize("method", ["mezo", "lmao", "hzo"])
def test_a_diverging_zeroth_order_run_is_a_user_error(tiny_model_dir, tmp_path, monkeypatch, method):
    from zotune.errors import UserError
    from zotune.tasks.scoring import Scorer

    def nan_loss(self, scoring, labels, copies=None):
        return torch.full(() if copies is None else (copies,), float("nan"), requires_grad=True)

    monkeypatch.setattr(Scorer, "cross_entropy", nan_loss)
    with pytest.raises(UserError, match="lower"):
        train(config(tiny_model_dir, tmp_path / "run", method=method, zero_shot=False))
