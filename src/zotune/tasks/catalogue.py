"""The task catalogue: ``--task`` names a loader, and the loader a template, candidates and
a metric. Built in:
``rt-sst2`` (Rotten Tomatoes sentences, offline), the offline built-ins of
:mod:`zotune.tasks.offline`, ``sst2`` (GLUE) and the MeZO paper's tasks of
:mod:`zotune.tasks.hub` (through ``datasets``, need the hub), and ``csv`` / ``jsonl``
(a user's own file).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from zotune.errors import UserError, reason, unknown
from zotune.tasks import hub, offline, verifiable
from zotune.tasks.examples import Example, Task, class_words, fixed_split, parse_candidates, prompt_template

TASKS = ("rt-sst2", "sst2", "csv", "jsonl")
SST2_TEMPLATE = "{text} It was"
SST2_CLASSES, SST2_WORDS = ("negative", "positive"), ("terrible", "great")
SST2_ALIASES = (("neg", "pos"),)  # how else a user may name the two classes in --candidates
def build_task(config) -> Task:
    """The task named by ``config.task`` (a :class:`zotune.recipe.config.TrainConfig`), scored by ``config.reward``
    when one is given."""
    task = _build(config)
    reward = getattr(config, "reward", None)
    if reward:
        if task.format != "generation":
            raise UserError(f"--reward scores decoded answers; {task.name} has candidates: use a generation task")
        task = dataclasses.replace(task, reward=reward)
    return task


def _build(config) -> Task:
    name = config.task
    if name in BUILDERS:
        return BUILDERS[name](config)
    if name in ("rt-sst2", "sst2"):
        train_pool, test_pool = fixed_split(_rt_sst2_examples()) if name == "rt-sst2" else _glue_sst2()
        words = class_words(config, SST2_CLASSES, SST2_WORDS, SST2_ALIASES)
        return Task(name, prompt_template(config, SST2_TEMPLATE), words, train_pool, test_pool)
    if name in ("csv", "jsonl"):
        if not config.data:
            raise UserError(f"task {name} needs --data FILE (and --template, --candidates)")
        if name == "jsonl" and not config.candidates:
            own = _own_continuations(config)
            if own is not None:
                return own
        if not config.template or not config.candidates:
            raise UserError(f"task {name} needs --template (with {{text}}) and --candidates label=word,...")
        prompt_template(config, "")
        mapping = parse_candidates(config.candidates)
        examples = _read_file(Path(config.data), name, config, mapping)
        if config.test_data:
            train_pool, test_pool = examples, _read_file(Path(config.test_data), name, config, mapping)
        else:
            train_pool, test_pool = fixed_split(examples)
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
    train_pool, test_pool = (pools[0], pools[1]) if len(pools) == 2 else fixed_split(pools[0])
    default = "{text}\nAnswer:" if kind == "generation" else "{text}"
    return Task("jsonl", prompt_template(config, default), [], train_pool, test_pool, kind)


def _rt_sst2_examples() -> list[Example]:
    from zotune.assets.packages import rt_sentences_file

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
        raise UserError(f"could not load GLUE SST-2 from the hub ({reason(error)}); "
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


BUILDERS = {**offline.BUILDERS, **verifiable.BUILDERS, **hub.BUILDERS}
TASKS = TASKS + tuple(name for name in BUILDERS if name not in TASKS)
