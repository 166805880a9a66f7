"""``--method es``: a population decoded in one batch, scored by a reward; runs resume and replay bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune import cli
from zotune.errors import UserError
from zotune.recipe.config import from_mapping
from zotune.recipe.evaluation import evaluate_run, replay_run
from zotune.recipe.train import Interrupted, Run, resume_config, train

from ..conftest import stop_after
from ..recipe.test_checkpoint import assert_one_line_error

ANSWERS = [("the film is", "good"), ("it was", "great"), ("a dull story . it was", "bad"), ("the plot is", "weak"),
           ("lovely actors and", "good"), ("the film was", "great")]


@pytest.fixture(scope="module")
def answers_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("es-data")
    (folder / "answers.jsonl").write_text("".join(json.dumps({"text": text, "answer": answer}) + "\n"
                                                 for text, answer in ANSWERS * 4))
    # A reward that the random tiny model's answers vary in (exact match would be 0 for every copy: no step).
    (folder / "rewards.py").write_text("def letters(prompt, completion, example):\n    return len(completion)\n")
    return folder / "answers.jsonl"


def letters(data):
    return f"{data.parent / 'rewards.py'}:letters"


def config(model_dir, data, out, **extra):
    values = dict(model=str(model_dir), method="es", task="jsonl", data=str(data), template="{text}", n_train=12,
                  n_dev=0, n_test=4, steps=4, batch_size=3, population=4, lr=1e-2, sigma=1e-2, max_new_tokens=3,
                  output=str(out), progress=False)
    return from_mapping({**values, **extra})


def weights(out):
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("options", [{}, {"direction": "gaussian", "stacked": False, "shaping": "zscore",
                                          "materialize": True},
                                     {"checkpoint": "trajectory", "save_every": 1, "temperature": 1.0}],
                         ids=["lowrank-stacked", "dense-one-by-one", "trajectory-sampled"])
def test_es_runs_resume_and_replay_bit_identically(tiny_model_dir, answers_file, tmp_path, monkeypatch, options):
    options = {"reward": letters(answers_file), **options}
    straight = tmp_path / "straight"
    result = train(config(tiny_model_dir, answers_file, straight, **options))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "test_reward": result["zero_shot_reward"]}
    assert all(row["reward"] >= 0 and row["loss"] == -row["reward"] for row in rows[1:])
    # 4 copies (and once, the probe's unperturbed decoding) x 3 prompts x at most 3 tokens
    assert all(0 < row["generated_tokens"] <= 5 * 3 * 3 for row in rows[1:])
    trained = weights(straight)
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)

    assert "bit-identical" in replay_run(str(straight), str(tmp_path / "replayed"))
    assert evaluate_run(str(straight), progress=False)["test_reward"] == result["test_reward"]

    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, answers_file, interrupted, **options))
    monkeypatch.setattr(Run, "train_step", original)
    train(resume_config(str(interrupted), {"progress": False}), resume=True)
    again = weights(interrupted)
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_a_users_reward_trains_and_a_broken_one_is_one_line(tiny_model_dir, answers_file, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(
        "def short(prompt, completion, example):\n    return -len(completion.split())\n"
        "def broken(prompt, completion, example):\n    return {'score': 1}\n")
    result = train(config(tiny_model_dir, answers_file, tmp_path / "own", objective="reward",
                          reward=f"{tmp_path / 'mine.py'}:short", zero_shot=False))
    assert result["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()]
    assert all(-3 <= row["reward"] <= 0 for row in rows)  # at most 3 new tokens
    assert_one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--method", "es", "--task", "jsonl",
                                   "--data", str(answers_file), "--template", "{text}", "--n-train", "6", "--n-dev",
                                   "0", "--n-test", "2", "--steps", "1", "--batch-size", "2", "--reward",
                                   f"{tmp_path / 'mine.py'}:broken", "--output", str(tmp_path / "broken"),
                                   "--no-progress", "--no-zero-shot"],
                          "mine.py:broken returned {'score': 1} on example answers.jsonl:")


@pytest.mark.parametrize("extra, message", [
    ({"task": "csv"}, "has candidates: use a generation task"),
    ({"population": 3}, "even number"),
    ({"materialize": True}, "add --no-stacked"),
    ({"reward": "exact-match", "objective": "loss"}, "add --objective reward"),
    ({"reward": "nope"}, "unknown reward 'nope'")])
def test_bad_es_settings_are_one_line(tiny_model_dir, answers_file, tmp_path, extra, message):
    from ..conftest import DATA

    data = answers_file
    if extra.get("task") == "csv":
        data, extra = DATA / "reviews.csv", {**extra, "candidates": "neg=terrible,pos=great"}
    with pytest.raises(UserError, match=message):
        train(config(tiny_model_dir, data, tmp_path / "bad", **extra))


def test_arith_trains_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    code = cli.main(["train", "--model", str(tiny_model_dir), "--method", "es", "--task", "arith", "--n-train", "8",
                     "--n-dev", "0", "--n-test", "4", "--steps", "2", "--batch-size", "2", "--population", "2",
                     "--max-new-tokens", "2", "--output", str(tmp_path / "arith"), "--no-progress"])
    assert code == 0
    assert "test reward" in capsys.readouterr().out
    saved = (tmp_path / "arith" / "config.yaml").read_text()
    assert "objective: reward" in saved and "digits: 1" in saved
