"""HeadFeatures: the training prompts read once give the scores a forward gives, for any head, and steps that run
no forward."""

import torch

from zotune.recipe.train import Run, train
from zotune.tasks.features import HeadFeatures
from zotune.tasks.objectives import loss_function

from ..recipe.test_train import config


def test_kept_features_score_as_a_forward_for_any_head_and_steps_run_no_forward(tiny_model_dir, tmp_path):
    run = Run(config(tiny_model_dir, tmp_path / "run", peft="head", n_samples=4, lr_zo=1e-1, eps=1e-2), False)
    scorer, head = run.scorer, run.scorer.head
    prompts = [run.task.prompt(e) for e in run.split.train]
    features = HeadFeatures(scorer, head)
    assert features.fill(prompts, batch_size=5, progress=False)
    assert len(features.rows) == len(set(prompts))
    with torch.no_grad():
        head.delta.normal_(generator=torch.Generator().manual_seed(0))
        head.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    scoring = scorer.prepare(prompts[:6])
    forward = scorer.score(scoring)
    assert torch.allclose(features.scores(prompts[:6], scoring.columns), forward, atol=1e-5)

    scorer.features = features
    trunk = run.model.model
    calls = []
    trunk.register_forward_hook(lambda module, args, output: calls.append(1))
    closure = loss_function(scorer, run.task, run.batch(0))
    before = head.delta.detach().clone()
    run.method.step(closure)
    assert calls == [] and not torch.equal(head.delta, before)
    # Prompts it has not read (the test sentences) run the model.
    scorer.score(scorer.prepare([run.task.prompt(e) for e in run.split.test[:2]]))
    assert calls == [1]


def test_multi_token_candidates_keep_one_forward_a_step(tiny_model_dir, tmp_path):
    run = Run(config(tiny_model_dir, tmp_path / "run", peft="head", candidates="neg=very bad,pos=quite good"), False)
    features = HeadFeatures(run.scorer, run.scorer.head)
    assert not features.fill([run.task.prompt(e) for e in run.split.train], 4, progress=False)
    assert not features.rows


def test_a_run_with_kept_features_trains_as_one_with_a_forward_a_step(tiny_model_dir, tmp_path):
    options = dict(peft="head", n_samples=2, eval_every=0, steps=4, lr_zo=1e-1)
    kept = train(config(tiny_model_dir, tmp_path / "kept", **options))
    fresh = train(config(tiny_model_dir, tmp_path / "fresh", head_cache=False, **options))
    from safetensors.torch import load_file
    a = load_file(tmp_path / "kept" / "head" / "head.safetensors")
    b = load_file(tmp_path / "fresh" / "head" / "head.safetensors")
    assert torch.allclose(a["delta"], b["delta"], atol=1e-4) and kept["test_accuracy"] == fresh["test_accuracy"]
