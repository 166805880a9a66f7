"""Examples and tasks (MeZO protocol): what a task is, how its examples are sampled into a
run's train, dev and test sets, and how ``--candidates`` names the classes' words.

A task turns labelled examples into prompts in one of three formats: classification
(the model scores each candidate word and predicts the best), multiple choice (each
example has its own continuations) and generation (greedy answers, token F1).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from zotune.errors import UserError

# The test pool of a single-file task is a fixed slice (not drawn with the run seed),
# so that runs with different seeds are evaluated on the same sentences.
TEST_POOL_FRACTION = 0.2
TEST_POOL_SEED = 1234


FORMATS = ("classification", "multiple_choice", "generation")


@dataclass(frozen=True)
class Example:
    """One labelled example. ``text`` fills the task's template ({text}); loaders of
    multi-field datasets format their fields into it.

    * classification: ``label`` indexes the task's candidates;
    * multiple choice: ``candidates`` are this example's own continuations and ``label``
      indexes them (the training target); ``also_right`` indexes other candidates that count
      as right when scoring (ReCoRD names one gold entity in several ways);
    * generation: ``answers`` are the gold answers (the first is the training target) and
      ``label`` is -1.
    """

    id: str
    text: str
    label: int
    candidates: tuple[str, ...] | None = None
    answers: tuple[str, ...] = ()
    also_right: tuple[int, ...] = ()

    def is_right(self, choice: int) -> bool:
        return choice == self.label or choice in self.also_right


@dataclass
class Task:
    name: str
    template: str  # str.format template over {text}; the candidate (or answer) follows it after the separator
    candidates: list[str]  # verbaliser words, one per class (empty for multiple choice and generation)
    train_pool: list[Example]
    test_pool: list[Example]
    format: str = "classification"  # one of FORMATS
    prefix: str = ""  # in-context demonstrations put before every prompt
    separator: str = " "  # between a prompt and its continuation ("" after a prompt that ends in a newline)
    reward: str | None = None  # generation: the reward evaluation reports (a built-in name or module:function)
    chat: bool = False  # generation: prompts go through the tokenizer's chat template (instruction-tuned models)

    def prompt(self, example: Example) -> str:
        return self.prefix + self.template.format(text=example.text)

    def gold(self, example: Example) -> str:
        """The right continuation of ``example``: its candidate, or its first answer."""
        return example.answers[0] if self.format == "generation" else self.choices(example)[example.label]

    def with_demonstrations(self, demonstrations: list[Example]) -> Task:
        """The task with ``demonstrations`` (prompt and right continuation each) before every
        prompt: in-context learning. A prompt too long for the model loses its oldest
        demonstrations first, since the scorer keeps the end of a prompt."""
        shown = "".join(f"{self.prompt(e)}{self.separator}{self.gold(e)}\n\n" for e in demonstrations)
        return dataclasses.replace(self, prefix=self.prefix + shown)

    def choices(self, example: Example) -> list[str]:
        """The continuations scored for ``example``."""
        return list(example.candidates) if example.candidates is not None else self.candidates


@dataclass
class Split:
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    def ids(self) -> dict:
        return {name: [e.id for e in getattr(self, name)] for name in ("train", "dev", "test")}


def sample(task: Task, n_train: int, n_dev: int, n_test: int, seed: int) -> Split:
    """N train + M dev drawn with ``seed`` from the train pool; test from the disjoint test pool."""
    if n_train < 1:
        raise UserError(f"--n-train must be at least 1, got {n_train}")
    pool = list(task.train_pool)
    random.Random(seed).shuffle(pool)
    if n_train + n_dev > len(pool):
        raise UserError(
            f"task {task.name} has {len(pool)} training examples, fewer than "
            f"--n-train {n_train} + --n-dev {n_dev}: lower them"
        )
    test = list(task.test_pool)
    if n_test > 0 and not test:
        raise UserError(f"task {task.name} has no test examples: give a test file (--test-data) or --n-test 0")
    random.Random(seed).shuffle(test)
    return Split(pool[:n_train], pool[n_train:n_train + n_dev], test[:n_test])


def parse_candidates(spec) -> dict[str, str]:
    """``"neg=terrible,pos=great"`` or a mapping → {label value: verbaliser word}."""
    if isinstance(spec, dict):
        mapping = {str(k): str(v) for k, v in spec.items()}
    else:
        pairs = [item.split("=", 1) for item in str(spec).split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise UserError(f"--candidates {spec!r}: write label=word pairs, e.g. 'neg=terrible,pos=great'")
        mapping = {k.strip(): v.strip() for k, v in pairs}
    if len(mapping) < 2 or not all(mapping.values()):
        raise UserError(f"--candidates {spec!r}: give at least two label=word pairs with non-empty words")
    return mapping


def fixed_split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """A single-file task's pools: a fixed slice for the test pool, the rest to train on."""
    order = list(examples)
    random.Random(TEST_POOL_SEED).shuffle(order)
    n_test = max(1, int(len(order) * TEST_POOL_FRACTION))
    return order[n_test:], order[:n_test]


def prompt_template(config, default: str) -> str:
    """``--template``, or the task's ``default``: it must hold ``{text}``, or every prompt would be one string."""
    chosen = config.template or default
    if "{text}" not in chosen:
        raise UserError(f"--template {chosen!r} must contain {{text}} (task {config.task}'s text goes there)")
    return chosen


def class_words(config, classes, default, aliases=()) -> list[str]:
    """The verbaliser words in class order: ``default``, or ``--candidates`` keyed by the class
    names (``classes``, or one of the key sets in ``aliases``) or by index, in any order, or
    else taken in the order given."""
    if not config.candidates:
        return list(default)
    mapping = parse_candidates(config.candidates)
    if len(mapping) != len(classes):
        raise UserError(f"task {config.task} has {len(classes)} classes ({', '.join(classes)}): "
                        f"--candidates needs {len(classes)} label=word pairs, got {len(mapping)}")
    for keys in (tuple(classes), tuple(str(i) for i in range(len(classes))), *aliases):
        if set(mapping) == set(keys):
            return [mapping[key] for key in keys]
    return list(mapping.values())
