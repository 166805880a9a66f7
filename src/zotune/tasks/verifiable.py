"""Verifiable tasks generated offline from a seed (no download), for training on rewards.

* ``arith``: "What is 7 * 8?" with numbers of ``--digits`` digits and the ``--operations``
  chosen (+, -, *); the reward is 1 when the last number of the answer is right ("3 + 4 = 7" counts).
* ``countdown``: reach a target from ``--countdown-numbers`` given numbers with + - * /, each
  number used at most once; reward 1 for a correct expression and 0.1 for a well-formed one
  (only the given numbers and operators) that misses the target.

Both are generation tasks: their examples carry a gold answer (the number, or one solution),
which the supervised baselines train on. Their pools are fixed (a draw with
``tasks.TEST_POOL_SEED``, never the run's seed), with the test problems apart from the
training ones.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

from zotune.errors import UserError
from zotune.tasks.examples import TEST_POOL_FRACTION, TEST_POOL_SEED, Example, Task, prompt_template

ARITH_TEMPLATE = "{text} Answer with the number only."
OPERATIONS = "+-*"
POOL_LIMIT = 5_000  # problems drawn at most (1-digit arithmetic has only 300)

COUNTDOWN_TEMPLATE = ("{text} Use each number at most once, with + - * / and parentheses. Answer with the "
                      "expression only.")
COUNTDOWN_PATTERN = re.compile(r"Numbers: ([\d ]+)\. Target: (\d+)\.")
COUNTDOWN_MAX = 20  # the given numbers are 1..20
WELL_FORMED = 0.1
_NUMBER = re.compile(r"-?\d+")


MIN_TEST = 100  # a held-out score of 60 problems moves by 6 points at random; a third of a small pool, up to 100


def _fixed_pools(problems: list[Example]) -> tuple[list[Example], list[Example]]:
    n_test = max(1, int(len(problems) * TEST_POOL_FRACTION), min(MIN_TEST, len(problems) // 3))
    return problems[n_test:], problems[:n_test]


# -- arithmetic -------------------------------------------------------------------------------------------------

def arithmetic_problems(digits: int, operations: str) -> list[Example]:
    """Every distinct problem (up to :data:`POOL_LIMIT`, drawn), in a fixed shuffled order."""
    if not 1 <= digits <= 6:
        raise UserError(f"--digits must be between 1 and 6, got {digits}")
    unknown = sorted(set(operations) - set(OPERATIONS))
    if not operations or unknown:
        raise UserError(f"--operations takes some of {OPERATIONS!r}, got {operations!r}")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    ops = sorted(set(operations), key=OPERATIONS.index)
    rng = random.Random(f"arith-{TEST_POOL_SEED}-{digits}-{''.join(ops)}")
    count = (high - low + 1) ** 2 * len(ops)
    if count <= POOL_LIMIT:
        triples = [(a, op, b) for op in ops for a in range(low, high + 1) for b in range(low, high + 1)]
        rng.shuffle(triples)
    else:
        seen, triples = set(), []
        while len(triples) < POOL_LIMIT:
            triple = (rng.randint(low, high), rng.choice(ops), rng.randint(low, high))
            if triple not in seen:
                seen.add(triple)
                triples.append(triple)
    return [Example(f"arith-{a}{op}{b}", f"What is {a} {op} {b}?", -1, answers=(str(_apply(a, op, b)),))
            for a, op, b in triples]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_reward(prompt: str, completion: str, example: Example) -> float:
    """1.0 when the last number in the completion is the answer (a model may restate the question first)."""
    found = _NUMBER.findall(completion.replace(",", ""))
    return float(bool(found) and found[-1] == example.answers[0])


def build_arith(config) -> Task:
    train_pool, test_pool = _fixed_pools(arithmetic_problems(config.digits, config.operations))
    return Task("arith", prompt_template(config, ARITH_TEMPLATE), [], train_pool, test_pool, format="generation",
                reward="arith", chat=True)


# -- countdown -------------------------------------------------------------------------------------------------

def countdown_problems(count: int) -> list[Example]:
    """Problems whose target some expression over a subset of the numbers reaches (one is the gold answer)."""
    if not 2 <= count <= 6:
        raise UserError(f"--countdown-numbers must be between 2 and 6, got {count}")
    rng = random.Random(f"countdown-{TEST_POOL_SEED}-{count}")
    problems, seen = [], set()
    while len(problems) < POOL_LIMIT // 5:
        numbers = [rng.randint(1, COUNTDOWN_MAX) for _ in range(count)]
        used = rng.sample(numbers, rng.randint(2, count))
        expression, value = _random_expression(used, rng)
        if value is None or value.denominator != 1 or not 1 <= value <= 999 or (tuple(numbers), value) in seen:
            continue
        seen.add((tuple(numbers), value))
        text = f"Numbers: {' '.join(map(str, numbers))}. Target: {int(value)}."
        problems.append(Example(f"countdown-{len(problems)}", text, -1, answers=(expression,)))
    return problems


def _random_expression(numbers: list[int], rng: random.Random) -> tuple[str, Fraction | None]:
    """A random binary tree over ``numbers`` (in their order) and its exact value (None: division by 0)."""
    if len(numbers) == 1:
        return str(numbers[0]), Fraction(numbers[0])
    cut = rng.randint(1, len(numbers) - 1)
    (left, a), (right, b) = _random_expression(numbers[:cut], rng), _random_expression(numbers[cut:], rng)
    op = rng.choice("+-*/")
    if a is None or b is None or (op == "/" and b == 0):
        return "", None
    value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    wrap = (lambda s: f"({s})" if not s.isdigit() else s)
    return f"{wrap(left)} {op} {wrap(right)}", value


def _evaluate(node) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError
        return a / b
    raise ValueError("not an arithmetic expression")


def _leaves(node) -> list[int]:
    if isinstance(node, ast.BinOp):
        return _leaves(node.left) + _leaves(node.right)
    return [node.value]


def countdown_reward(prompt: str, completion: str, example: Example) -> float:
    """1.0: an expression over the given numbers (each at most once) equal to the target; 0.1: such an expression
    with another value; 0: anything else. The expression is the completion's first line, up to any '='."""
    found = COUNTDOWN_PATTERN.search(example.text)
    if found is None:
        raise ValueError(f"no 'Numbers: ... Target: ...' in {example.text!r}")
    numbers, target = [int(n) for n in found.group(1).split()], int(found.group(2))
    expression = completion.strip().split("\n")[0].split("=")[0].strip()
    try:
        tree = ast.parse(expression, mode="eval").body
        value = _evaluate(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    available = list(numbers)
    for leaf in _leaves(tree):
        if leaf not in available:
            return 0.0
        available.remove(leaf)
    return 1.0 if value == target else WELL_FORMED


def build_countdown(config) -> Task:
    train_pool, test_pool = _fixed_pools(countdown_problems(config.countdown_numbers))
    return Task("countdown", prompt_template(config, COUNTDOWN_TEMPLATE), [], train_pool, test_pool,
                format="generation", reward="countdown", chat=True)


REWARDS = {"arith": arithmetic_reward, "countdown": countdown_reward}
BUILDERS = {"arith": build_arith, "countdown": build_countdown}
