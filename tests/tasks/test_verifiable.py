"""The verifiable tasks (arith, countdown) and the reward interface."""

import pytest

from zotune.errors import UserError
from zotune.tasks import rewards
from zotune.tasks.examples import Example
from zotune.tasks.verifiable import (COUNTDOWN_PATTERN, WELL_FORMED, arithmetic_problems, arithmetic_reward,
                                     countdown_problems, countdown_reward)


def test_arithmetic_pools_are_fixed_distinct_and_right():
    problems = arithmetic_problems(1, "+-*")
    assert len(problems) == 300 and len({e.id for e in problems}) == 300  # every 1-digit problem once
    assert [e.id for e in problems] == [e.id for e in arithmetic_problems(1, "*-+")]  # not the run's seed
    for example in problems[:50]:
        a, op, b = example.text.removeprefix("What is ").removesuffix("?").split()
        assert int(example.answers[0]) == eval(f"{a}{op}{b}")
    two = arithmetic_problems(2, "+")
    assert all(10 <= int(n) <= 99 for e in two for n in e.text.removeprefix("What is ").removesuffix("?").split(" + "))


@pytest.mark.parametrize("digits, operations", [(0, "+"), (7, "+"), (1, ""), (1, "/")])
def test_arithmetic_settings_are_checked(digits, operations):
    with pytest.raises(UserError):
        arithmetic_problems(digits, operations)


@pytest.mark.parametrize("completion, reward", [("56", 1.0), ("7 * 8 = 56", 1.0), ("The answer is 56.", 1.0),
                                                ("5,6", 1.0), ("56 or 57", 0.0), ("fifty-six", 0.0), ("", 0.0),
                                                ("-56", 0.0)])
def test_arithmetic_reward_reads_the_last_number(completion, reward):
    example = Example("arith-7*8", "What is 7 * 8?", -1, answers=("56",))
    assert arithmetic_reward("", completion, example) == reward


def test_every_countdown_gold_answer_reaches_its_target():
    problems = countdown_problems(3)
    assert len({e.text for e in problems}) == len(problems) == 1000
    for example in problems:
        assert countdown_reward("", example.answers[0], example) == 1.0, (example.text, example.answers)


@pytest.mark.parametrize("completion, reward", [
    ("2 * (10 - 4)", 1.0), ("(10 - 4) * 2 = 12", 1.0), ("10 + 2", 1.0), ("12", 0.0),  # 12 is not a given number
    ("10 + 4", WELL_FORMED), ("10 - 4 - 2 + 2", 0.0),  # 2 used twice
    ("10 / (4 - 4)", 0.0), ("10 ** 2", 0.0), ("__import__('os')", 0.0), ("ten", 0.0), ("", 0.0),
    ("10 + 2\nmore text", 1.0)])
def test_countdown_reward(completion, reward):
    example = Example("countdown-x", "Numbers: 2 10 4. Target: 12.", -1, answers=("2 + 10",))
    assert COUNTDOWN_PATTERN.search(example.text)
    assert countdown_reward("", completion, example) == reward


def test_built_in_and_own_rewards_load(tmp_path):
    example = Example("q", "?", -1, answers=("The Thing",))
    assert rewards.load("exact-match")("", "the thing", example) == 1.0
    assert rewards.load("f1")("", "thing", example) == pytest.approx(1.0)
    (tmp_path / "mine.py").write_text("def longer(prompt, completion, example):\n    return len(completion)\n")
    assert rewards.load(f"{tmp_path / 'mine.py'}:longer")("", "abc", example) == 3
    assert rewards.load("zotune.tasks.verifiable:arithmetic_reward") is arithmetic_reward


@pytest.mark.parametrize("spec, message", [("exact", "did you mean 'exact-match'"),
                                           ("no_such_module_here:f", "cannot import"),
                                           ("zotune.tasks.verifiable:missing", "no function 'missing'"),
                                           ("/nowhere/mine.py:f", "no file")])
def test_bad_reward_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        rewards.load(spec)


@pytest.mark.parametrize("value, message", [(ValueError("bad input"), "raised ValueError on example e7: bad input"),
                                            ("1.0", "returned '1.0' on example e7"),
                                            (float("nan"), "returned nan"), (None, "returned None")])
def test_a_failing_reward_names_itself_and_the_example(value, message):
    def reward(prompt, completion, example):
        if isinstance(value, Exception):
            raise value
        return value

    with pytest.raises(UserError, match=message) as error:
        rewards.score(reward, "mine:reward", "p", "c", Example("e7", "t", -1, answers=("a",)))
    assert "mine:reward" in str(error.value)


def test_booleans_and_integers_are_numbers():
    example = Example("e", "t", -1)
    assert rewards.score(lambda *_: True, "r", "p", "c", example) == 1.0
    assert rewards.score(lambda *_: 3, "r", "p", "c", example) == 3.0


def test_task_pools_are_disjoint_and_the_small_test_pool_holds_a_third():
    from types import SimpleNamespace

    from zotune.tasks.verifiable import build_arith, build_countdown

    arith = build_arith(SimpleNamespace(task="arith", template=None, digits=1, operations="+-*"))
    assert (len(arith.train_pool), len(arith.test_pool)) == (200, 100)
    assert not {e.id for e in arith.train_pool} & {e.id for e in arith.test_pool}
    assert arith.format == "generation" and arith.reward == "arith" and arith.chat
    countdown = build_countdown(SimpleNamespace(task="countdown", template=None, countdown_numbers=4))
    assert len(countdown.test_pool) == 200 and not {e.text for e in countdown.train_pool} & {e.text for e in
                                                                                          countdown.test_pool}
