"""--peft head: zeroth order on a correction of the output layer on the task's candidate words. The points of a step
share one forward of the batch; whole runs export head/, evaluate, resume bit-identically and replay."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune import cli
from zotune.errors import UserError
from zotune.recipe import config as cfg
from zotune.core.head import feature_rms
from zotune.recipe.train import Interrupted, Run, resume_config, train
from zotune.tasks.features import HeadFeatures
from zotune.tasks.objectives import loss_function

from ..conftest import stop_after
from ..recipe.test_train import config


def test_a_step_runs_the_trunk_once_whatever_its_points_and_scores_as_full_forwards(tiny_model_dir, tmp_path):
    run = Run(config(tiny_model_dir, tmp_path / "run", peft="head", n_samples=4, lr_zo=1e-1, eps=1e-2), False)
    trunk = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model.model
    calls = []
    trunk.register_forward_hook(lambda module, args, output: calls.append(1))
    examples = run.batch(0)
    closure = loss_function(run.scorer, run.task, examples)
    run.method.step(closure)
    assert len(calls) == 1  # 2 x 4 points, one forward
    # The recorded trunk scores as a fresh forward does, after the step moved the head.
    calls.clear()
    fresh = loss_function(run.scorer, run.task, examples)()
    assert len(calls) == 1
    assert torch.equal(closure(), fresh)
    assert len(calls) == 1
    # Once the trunk trains too, every evaluation runs the model.
    run.model.get_output_embeddings().output.weight.requires_grad_(True)
    again = loss_function(run.scorer, run.task, examples)
    again(), again()
    assert len(calls) == 3


def test_run_exports_the_head_evaluates_resumes_and_replays(tiny_model_dir, tmp_path, monkeypatch, capsys):
    options = dict(peft="head", n_samples=2, checkpoint="trajectory", eval_every=0, steps=4)
    straight = tmp_path / "straight"
    result = train(config(tiny_model_dir, straight, **options))
    names = {p.name for p in straight.iterdir()}
    assert {"head", "trajectory.json"} <= names and not {"model", "adapter"} & names
    head = load_file(straight / "head" / "head.safetensors")
    assert set(head) == {"delta", "bias", "token_ids", "scale"} and head["delta"].abs().sum() > 0

    capsys.readouterr()
    assert cli.main(["eval", "--run", str(straight), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == result["test_accuracy"]
    assert cli.main(["replay", "--run", str(straight)]) == 0
    assert "bit-identical to the run's head" in capsys.readouterr().out

    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted):
        train(config(tiny_model_dir, interrupted, **options))
    monkeypatch.setattr(Run, "train_step", original)
    train(resume_config(str(interrupted), {"progress": False}), resume=True)
    resumed = load_file(interrupted / "head" / "head.safetensors")
    assert all(torch.equal(resumed[k], head[k]) for k in head)


def test_the_head_measures_its_feature_scale_on_the_training_prompts(tiny_model_dir, tmp_path):
    options = dict(peft="head", n_samples=2, eval_every=0, steps=2)
    train(config(tiny_model_dir, tmp_path / "prompts", **options))
    measured = load_file(tmp_path / "prompts" / "head" / "head.safetensors")["scale"]
    run = Run(config(tiny_model_dir, tmp_path / "check", **options), False)
    on_random_tokens = run.scorer.head.scale.clone()
    features = HeadFeatures(run.scorer, run.scorer.head)
    assert features.fill([run.task.prompt(e) for e in run.split.train], 5, progress=False)
    assert torch.allclose(measured, feature_rms(features.hidden_states()), rtol=1e-5)
    assert not torch.allclose(measured, on_random_tokens, rtol=1e-2)
    train(config(tiny_model_dir, tmp_path / "random", head_scale="random", **options))
    assert torch.equal(load_file(tmp_path / "random" / "head" / "head.safetensors")["scale"], on_random_tokens)


def test_defaults_and_refusals_are_one_line():
    options = cfg.from_mapping({"peft": "head"}).options
    assert (options.lr_zo, options.eps) == (3e-3, 1e-2)
    for values, message in [({"peft": "head", "stacked": True}, "drop --stacked"),
                            ({"method": "hzo", "peft": "head"}, "use --method mezo --peft head"),
                            ({"head_scale": "random"}, "--head-scale sets how the candidate head reads: add --peft")]:
        with pytest.raises(UserError, match=message) as error:
            cfg.from_mapping(values)
        assert len(str(error.value).splitlines()) == 1


def test_a_task_without_candidate_words_is_refused_before_training(tiny_model_dir, tmp_path):
    values = config(tiny_model_dir, tmp_path / "run", peft="head").to_dict()
    values.update(task="arith", data=None, template=None, candidates=None)
    with pytest.raises(UserError, match="has none .a generation task.: use --peft lora or prefix"):
        Run(cfg.from_mapping(values), False)


def test_a_head_on_a_middle_block_trains_evaluates_and_replays(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, out, peft="head", head_layer=1, n_samples=2, eval_every=0, steps=3,
                          lr_zo=1e-1))
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == result["test_accuracy"]
    assert cli.main(["replay", "--run", str(out)]) == 0
    assert "bit-identical to the run's head" in capsys.readouterr().out
    for layer in (3, -3):
        with pytest.raises(UserError, match=f"--head-layer {layer}: LlamaForCausalLM has 2 blocks; choose 1 to 2 "
                           r"\(or -1 to -2, counted from the last\)"):
            Run(config(tiny_model_dir, tmp_path / "bad", peft="head", head_layer=layer), False)
    # Counted from the last, as in Python: -2 is the first of two blocks.
    first = Run(config(tiny_model_dir, tmp_path / "first", peft="head", head_layer=1), False).scorer.head
    back = Run(config(tiny_model_dir, tmp_path / "back", peft="head", head_layer=-2), False).scorer.head
    half = Run(config(tiny_model_dir, tmp_path / "half", peft="head", head_layer=0.5), False).scorer.head
    assert torch.equal(first.scale, back.scale) and torch.equal(first.scale, half.scale)
    assert not torch.equal(first.scale, Run(
        config(tiny_model_dir, tmp_path / "last", peft="head", head_layer=-1), False).scorer.head.scale)
    with pytest.raises(UserError, match="--head-layer chooses what the candidate head reads: add --peft head"):
        cfg.from_mapping({"head_layer": 2})
    for layer in (2.5, -0.5, float("inf"), float("nan")):
        with pytest.raises(UserError, match=f"--head-layer {layer:g}: give a block's number"):
            cfg.from_mapping({"peft": "head", "head_layer": layer})
