"""Prompted tasks (MeZO protocol): loader + template + candidates + metric.

A task turns labelled examples into prompts in one of three formats: classification
(the model scores each candidate word and predicts the best), multiple choice (each
example has its own continuations) and generation (greedy answers, token F1). Built in:
``rt-sst2`` (Rotten Tomatoes sentences, offline), the offline built-ins of
:mod:`zotune.tasks_offline`, ``sst2`` (GLUE) and the MeZO paper's tasks of
:mod:`zotune.tasks_hub` (through ``datasets``, need the hub), and ``csv`` / ``jsonl``
(a user's own file).
"""

from __future__ import annotations

import csv
import json
import random
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError, unknown

TASKS = ("rt-sst2", "sst2", "csv", "jsonl")
SST2_TEMPLATE = "{text} It was"
SST2_CANDIDATES = {"0": "terrible", "1": "great"}
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


def build_task(config) -> Task:
    """The task named by ``config.task`` (a :class:`zotune.config.TrainConfig`)."""
    name = config.task
    if name in BUILDERS:
        return BUILDERS[name](config)
    if name == "rt-sst2":
        examples = _rt_sst2_examples()
        train_pool, test_pool = _fixed_split(examples)
        return Task(name, config.template or SST2_TEMPLATE, _words(SST2_CANDIDATES, config), train_pool, test_pool)
    if name == "sst2":
        train_pool, test_pool = _glue_sst2()
        return Task(name, config.template or SST2_TEMPLATE, _words(SST2_CANDIDATES, config), train_pool, test_pool)
    if name in ("csv", "jsonl"):
        if not config.data:
            raise UserError(f"task {name} needs --data FILE (and --template, --candidates)")
        if name == "jsonl" and not config.candidates:
            own = _own_continuations(config)
            if own is not None:
                return own
        if not config.template or not config.candidates:
            raise UserError(f"task {name} needs --template (with {{text}}) and --candidates label=word,...")
        if "{text}" not in config.template:
            raise UserError(f"--template {config.template!r} must contain {{text}}")
        mapping = parse_candidates(config.candidates)
        examples = _read_file(Path(config.data), name, config, mapping)
        if config.test_data:
            train_pool, test_pool = examples, _read_file(Path(config.test_data), name, config, mapping)
        else:
            train_pool, test_pool = _fixed_split(examples)
        return Task(name, config.template, list(mapping.values()), train_pool, test_pool)
    raise UserError(unknown("task", name, TASKS))


def _own_continuations(config) -> Task | None:
    """A JSON-lines file whose rows carry their own continuations: ``choices`` (a list) and
    ``label`` (its index) for multiple choice, ``answers`` (a list) or ``answer`` for
    generation; None for a classification file."""
    files = [Path(config.data)] + ([Path(config.test_data)] if config.test_data else [])
    for path in files:
        if not path.is_file():
            raise UserError(f"data file {path} does not exist")
    first = next(_jsonl_rows(files[0]), (0, {}))[1]
    kind = "multiple_choice" if "choices" in first else "generation" if {"answers", "answer"} & set(first) else None
    if kind is None:
        return None
    pools = []
    for path in files:
        examples = []
        for line_number, row in _jsonl_rows(path):
            where = f"{path}:{line_number}"
            if not isinstance(row.get(config.text_column), str):
                raise UserError(f"{where}: no text in column {config.text_column!r} (set --text-column)")
            text, key = row[config.text_column].strip(), f"{path.name}:{line_number}"
            if kind == "multiple_choice":
                choices, label = row.get("choices"), row.get(config.label_column)
                if not (isinstance(choices, list) and len(choices) >= 2 and isinstance(label, int)
                        and 0 <= label < len(choices)):
                    raise UserError(f"{where}: multiple choice needs 'choices' (2 or more) and {config.label_column!r} "
                                    "(the index of the right one)")
                examples.append(Example(key, text, label, candidates=tuple(str(c) for c in choices)))
            else:
                answers = row.get("answers", [row.get("answer")])
                if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a for a in answers)):
                    raise UserError(f"{where}: generation needs 'answers' (a list of strings) or 'answer'")
                examples.append(Example(key, text, -1, answers=tuple(answers)))
        if not examples:
            raise UserError(f"data file {path} holds no examples")
        pools.append(examples)
    train_pool, test_pool = (pools[0], pools[1]) if len(pools) == 2 else _fixed_split(pools[0])
    template = config.template or ("{text}\nAnswer:" if kind == "generation" else "{text}")
    if "{text}" not in template:
        raise UserError(f"--template {template!r} must contain {{text}}")
    return Task("jsonl", template, [], train_pool, test_pool, kind)


# How a user may name the two sentiment classes in --candidates (negative first).
SST2_LABELS = (("0", "1"), ("neg", "pos"), ("negative", "positive"))


def _words(default: dict, config) -> list[str]:
    """The words of the negative and positive class: ``--candidates`` keyed 0/1, neg/pos or
    negative/positive (in any order), or else taken in the order given."""
    if not config.candidates:
        return list(default.values())
    mapping = parse_candidates(config.candidates)
    if len(mapping) != 2:
        raise UserError(f"task {config.task} has 2 classes: --candidates needs 2 label=word pairs, got {len(mapping)}")
    for keys in SST2_LABELS:
        if set(mapping) == set(keys):
            return [mapping[key] for key in keys]
    return list(mapping.values())


def _fixed_split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    order = list(examples)
    random.Random(TEST_POOL_SEED).shuffle(order)
    n_test = max(1, int(len(order) * TEST_POOL_FRACTION))
    return order[n_test:], order[:n_test]


def _rt_sst2_examples() -> list[Example]:
    from zotune.assets import rt_sentences_file

    examples = []
    with open(rt_sentences_file(), encoding="utf-8", newline="") as handle:
        for line in handle:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                continue
            rating = float(fields[1])
            if abs(rating) < 0.5:  # near-neutral sentences: not a clean binary label
                continue
            examples.append(Example(fields[0], fields[2].strip(), int(rating > 0)))
    return examples


def _glue_sst2() -> tuple[list[Example], list[Example]]:
    try:
        import datasets
    except ImportError:
        raise UserError("task sst2 needs the datasets package and hub access: pip install datasets "
                        "(offline, use --task rt-sst2)") from None
    try:
        data = datasets.load_dataset("glue", "sst2")
    except Exception as error:  # the hub raises many types; the user needs the first line
        raise UserError(f"could not load GLUE SST-2 from the hub ({str(error).splitlines()[0]}); "
                        "offline, use --task rt-sst2") from None

    def convert(split):
        return [Example(f"{split}-{row['idx']}", row["sentence"].strip(), int(row["label"])) for row in data[split]]

    return convert("train"), convert("validation")


def _read_file(path: Path, kind: str, config, mapping: dict[str, str]) -> list[Example]:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    rows = _csv_rows(path) if kind == "csv" else _jsonl_rows(path)
    labels = list(mapping)
    examples = []
    for line_number, row in rows:
        where = f"{path}:{line_number}"
        for column in (config.text_column, config.label_column):
            if column not in row:
                raise UserError(f"{where}: no column {column!r} (set --text-column / --label-column)")
        label = str(row[config.label_column]).strip()
        if label not in mapping:
            raise UserError(f"{where}: label {label!r} is not among the candidates {labels}")
        examples.append(Example(f"{path.name}:{line_number}", str(row[config.text_column]).strip(), labels.index(label)))
    if not examples:
        raise UserError(f"data file {path} holds no examples")
    return examples


def _csv_rows(path: Path):
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise UserError(f"{path}: empty file or no header line")
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                raise UserError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} fields")
            yield reader.line_num, row


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object per line")
            yield line_number, row


# The loaders of the paper's tasks and of the offline built-ins build on the classes above.
from zotune import tasks_hub, tasks_offline  # noqa: E402

BUILDERS = {**tasks_offline.BUILDERS, **tasks_hub.BUILDERS}
TASKS = TASKS + tuple(name for name in BUILDERS if name not in TASKS)
