"""Task formats beyond fixed-candidate classification: multiple choice, generation, the
non-differentiable objectives and in-context demonstrations."""

import pytest
import torch

from zotune import cli
from zotune.assets import models
from zotune import tasks
from zotune.tasks import catalogue
from zotune.tasks.metrics import exact_match, token_f1
from zotune.tasks.objectives import evaluate, loss_function
from zotune.tasks.scoring import Scorer
from zotune.recipe.train import train

from ..conftest import save_tiny_model
from .test_scoring import reference_score
from ..recipe.test_train import config

WORDS = ["the film is good", "a dull story", "it was", "the plot is weak", "lovely actors", "a moving story"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.load(str(save_tiny_model(tmp_path_factory.mktemp("formats"))), device="cpu")


def choice_task():
    def example(i):
        return tasks.Example(f"mc-{i}", WORDS[i % 6], i % 2, candidates=("great", "very bad", "fun")[: 2 + i % 2])

    return tasks.Task("toy-mc", "{text} so", [], [example(i) for i in range(24)], [example(i) for i in range(6)],
                      "multiple_choice")


def generation_task():
    def example(i):
        return tasks.Example(f"gen-{i}", f"{WORDS[i % 6]} . It was", -1, answers=(("good", "great")[i % 2],))

    return tasks.Task("toy-gen", "{text}", [], [example(i) for i in range(24)], [example(i) for i in range(6)],
                      "generation")


def test_per_example_choices_match_the_reference_and_pad_with_minus_infinity(tiny):
    model, tokenizer, kind = tiny
    scorer = Scorer(model, tokenizer, [], kind)
    prompts, choices = ["the film is good so", "a dull story so"], [["great", "very bad", "fun"], ["fun", "great"]]
    with torch.no_grad():
        table = scorer.scores(prompts, choices=choices)
        stacked = scorer.scores(prompts, copies=2, choices=choices)
    assert table.shape == (2, 3) and table[1, 2] == float("-inf")
    for i, prompt in enumerate(prompts):
        for j, word in enumerate(choices[i]):
            assert torch.allclose(table[i, j], reference_score(model, tokenizer, prompt, word), atol=1e-5)
    assert torch.equal(stacked[:2], stacked[2:]) and torch.allclose(stacked[:2], table, atol=1e-5)
    loss = scorer.loss(prompts, [0, 1], choices=choices)
    assert torch.isfinite(loss) and torch.allclose(loss, torch.nn.functional.cross_entropy(table, torch.tensor([0, 1])))


def test_answer_loss_is_the_answers_negative_log_likelihood(tiny):
    model, tokenizer, kind = tiny
    scorer = Scorer(model, tokenizer, [], kind)
    prompts, answers = ["the film is good . It was", "it was"], ["great", "very bad"]
    with torch.no_grad():
        loss = scorer.answer_loss(prompts, answers)
        per_copy = scorer.answer_loss(prompts, answers, copies=3)
    newline = scorer._newline()
    expected = []
    for prompt, answer in zip(prompts, answers):
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + newline
        ids = torch.tensor([tokenizer(prompt)["input_ids"] + target])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        start = ids.shape[1] - len(target)
        expected.append(-sum(logp[start - 1 + j, t] for j, t in enumerate(target)) / len(target))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)
    assert per_copy.shape == (3,) and torch.allclose(per_copy, loss.expand(3), atol=1e-5)


def test_generation_is_greedy_and_cut_at_a_newline(tiny):
    model, tokenizer, kind = tiny
    scorer = Scorer(model, tokenizer, [], kind, max_new_tokens=5)
    answers = scorer.generate(["the film is good . It was", "it was"])
    assert len(answers) == 2 and all("\n" not in a for a in answers)
    assert answers == scorer.generate(["the film is good . It was", "it was"])  # greedy: deterministic
    result = evaluate(scorer, generation_task(), generation_task().test_pool, 4, progress=False)
    assert result["metric"] == "f1" and 0 <= result["em"] <= result["f1"] <= 1 and result["score"] == result["f1"]


def test_f1_and_exact_match_follow_squad():
    assert exact_match("The  Eiffel tower!", ["eiffel tower"]) == 1.0
    assert token_f1("in Paris France", ["Paris"]) == pytest.approx(0.5)
    assert token_f1("nothing", ["Paris", "nothing at all"]) == pytest.approx(0.5)
    assert token_f1("", ["Paris"]) == 0.0 and exact_match("Lyon", ["Paris"]) == 0.0


def test_objectives_accuracy_and_f1_are_minus_the_metric(tiny):
    model, tokenizer, kind = tiny
    scorer = Scorer(model, tokenizer, [], kind, max_new_tokens=3)
    task = choice_task()
    batch = task.train_pool[:6]
    with torch.no_grad():
        accuracy = loss_function(scorer, task, batch, "accuracy")
        predicted = scorer.scores([task.prompt(e) for e in batch], choices=[task.choices(e) for e in batch]).argmax(1)
        expected = -sum(int(p == e.label) for p, e in zip(predicted.tolist(), batch)) / len(batch)
        assert accuracy().item() == pytest.approx(expected)
        assert torch.allclose(accuracy(2), torch.tensor([expected, expected]))
        gen = generation_task()
        f1 = loss_function(scorer, gen, gen.train_pool[:4], "f1")
        answers = scorer.generate([gen.prompt(e) for e in gen.train_pool[:4]])
        assert f1() == pytest.approx(-sum(token_f1(a, e.answers) for a, e in zip(answers, gen.train_pool[:4])) / 4)
    from zotune.errors import UserError

    with pytest.raises(UserError, match="--objective f1 needs a generation task"):
        loss_function(scorer, task, batch, "f1")
    with pytest.raises(UserError, match="--objective accuracy needs a task with candidates"):
        loss_function(scorer, gen, batch, "accuracy")


def test_every_right_choice_counts_in_the_metric_and_the_accuracy_objective(tiny):
    model, tokenizer, kind = tiny
    scorer = Scorer(model, tokenizer, [], kind)
    task = choice_task()
    batch = task.train_pool[:6]
    with torch.no_grad():
        predicted = scorer.scores([task.prompt(e) for e in batch], choices=[task.choices(e) for e in batch]).argmax(1)
    # Each example also accepts the prediction, when the label is not it: all are right.
    accepting = [tasks.Example(e.id, e.text, e.label, e.candidates, also_right=(p,) if p != e.label else ())
                 for e, p in zip(batch, predicted.tolist())]
    assert any(e.also_right for e in accepting)
    assert evaluate(scorer, task, accepting, progress=False)["accuracy"] == 1.0
    with torch.no_grad():
        assert torch.equal(loss_function(scorer, task, accepting, "accuracy")(2), torch.tensor([-1.0, -1.0]))
        # Cross-entropy still trains on the label alone.
        assert torch.equal(loss_function(scorer, task, accepting)(), loss_function(scorer, task, batch)())


def test_demonstrations_come_before_every_prompt():
    task = choice_task()
    shown = task.with_demonstrations(task.train_pool[:2])
    first, second = task.train_pool[:2]
    expected = f"{task.prompt(first)} {task.gold(first)}\n\n{task.prompt(second)} {task.gold(second)}\n\n"
    assert shown.prompt(second) == expected + task.prompt(second) and task.prefix == ""
    gen = generation_task()
    assert gen.with_demonstrations(gen.train_pool[:1]).prefix == f"{gen.prompt(gen.train_pool[0])} " \
                                                                 f"{gen.train_pool[0].answers[0]}\n\n"


@pytest.mark.parametrize("task_builder,objective", [(choice_task, "loss"), (choice_task, "accuracy"),
                                                    (generation_task, "loss"), (generation_task, "f1")])
def test_runs_on_multiple_choice_and_generation_tasks(tiny_model_dir, tmp_path, monkeypatch, task_builder, objective):
    monkeypatch.setitem(catalogue.BUILDERS, "csv", lambda config: task_builder())
    result = train(config(tiny_model_dir, tmp_path / "run", method="mezo", lr=1e-3, objective=objective,
                          max_new_tokens=3))
    metric = "f1" if task_builder is generation_task else "accuracy"
    assert result["metric"] == metric and 0 <= result[f"test_{metric}"] <= 1
    assert result[f"zero_shot_{metric}"] is not None


def test_a_non_differentiable_objective_needs_a_gradient_free_method(tiny_model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--model", str(tiny_model_dir), "--method", "lora-ft", "--objective", "accuracy",
                     "--output", str(tmp_path / "r")]) == 2
    assert "no gradient" in capsys.readouterr().err


def test_a_jsonl_file_brings_its_own_choices_or_answers(tmp_path):
    import json

    from zotune.recipe.config import from_mapping
    from zotune.errors import UserError

    choices = tmp_path / "copa.jsonl"
    choices.write_text("\n".join(json.dumps({"text": f"it rained {i}, so", "choices": ["we stayed in", "we swam"],
                                             "label": i % 2}) for i in range(10)))
    task = tasks.build_task(from_mapping({"task": "jsonl", "data": str(choices)}))
    assert task.format == "multiple_choice" and len(task.train_pool) + len(task.test_pool) == 10
    assert task.choices(task.train_pool[0]) == ["we stayed in", "we swam"] and task.template == "{text}"
    answers = tmp_path / "qa.jsonl"
    answers.write_text('{"text": "Capital of France?", "answers": ["Paris"]}\n{"text": "2+2?", "answer": "4"}\n')
    task = tasks.build_task(from_mapping({"task": "jsonl", "data": str(answers), "test_data": str(answers)}))
    assert task.format == "generation" and task.train_pool[1].answers == ("4",)
    assert task.prompt(task.train_pool[0]) == "Capital of France?\nAnswer:"
    choices.write_text('{"text": "x", "choices": ["a", "b"], "label": 2}\n')
    with pytest.raises(UserError, match="copa.jsonl:1: multiple choice needs"):
        tasks.build_task(from_mapping({"task": "jsonl", "data": str(choices)}))
