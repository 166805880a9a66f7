"""The MeZO paper's tasks through ``datasets`` (needs the Hugging Face hub), with the paper's templates.

Each task reads the train split (train pool) and the validation split (test pool: the
paper tests on validation, SuperGLUE's test labels are hidden). The prompts follow the
MeZO reference code (princeton-nlp/MeZO, large_models/templates.py):

* classification (rte, cb, boolq, wsc, wic, multirc): the whole prompt is formatted into
  ``Example.text`` (the fields differ per task), the task's template is ``{text}`` and the
  candidates are fixed words (Yes/No, Yes/No/Maybe);
* multiple choice (copa, record): ``Example.candidates`` are the example's continuations;
* generation (squad, drop): ``Example.answers`` are the gold answers, template ``{text}\\nAnswer:``.

Ids are ``<split>-<row position>``: stable for a given dataset revision, and the train and
test ids never collide.
"""

from __future__ import annotations

from zotune.errors import UserError, reason
from zotune.tasks.examples import Example, Task, class_words, prompt_template

# task -> (hub dataset id, config name). Parquet repositories: the script-based "super_glue",
# "squad" and "drop" no longer load with datasets>=4 (scripts are no longer supported).
HUB_DATASETS = {
    "rte": ("aps/super_glue", "rte"),
    "cb": ("aps/super_glue", "cb"),
    "boolq": ("aps/super_glue", "boolq"),  # the same BoolQ splits as the paper's "boolq" (google/boolq)
    "wsc": ("aps/super_glue", "wsc.fixed"),  # the reference code's config: span texts fixed to match the text
    "wic": ("aps/super_glue", "wic"),
    "multirc": ("aps/super_glue", "multirc"),
    "copa": ("aps/super_glue", "copa"),
    "record": ("aps/super_glue", "record"),
    "squad": ("rajpurkar/squad", None),  # SQuAD v1.1, one config (plain_text)
    "drop": ("ucinlp/drop", None),
}

GENERATION_TEMPLATE = "{text}\nAnswer:"


def load_splits(task: str):
    """(train rows, validation rows) of ``task``'s hub dataset: the one place that touches the hub."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"task {task} needs the datasets package and hub access: pip install 'zotune[hub]' "
                        "(offline, use --task rt-sst2 or your own --task csv/jsonl)") from None
    path, name = HUB_DATASETS[task]
    where = path + (f" ({name})" if name else "")
    try:
        data = datasets.load_dataset(path, name)
        return data["train"], data["validation"]
    except Exception as error:  # the hub raises many types; the user needs the first line
        why = reason(error)
        raise UserError(f"could not load {where} from the hub for task {task} ({why}); "
                        "check the network, or use an offline task (rt-sst2, csv, jsonl)") from None


# -- classification: (candidate words, row -> (prompt text, label index)) ---------------------

def _question(text: str) -> str:
    # BoolQ questions come lower-case without a question mark; the reference code fixes both.
    text = text if text.endswith("?") else text + "?"
    return text[0].upper() + text[1:]


# Label order of the hub's ClassLabels: RTE/CB 0 = entailment (Yes), CB 1 = contradiction (No),
# 2 = neutral (Maybe); BoolQ/WSC/WiC/MultiRC 0 = False, 1 = True.
CLASSIFICATION = {
    "rte": (["Yes", "No"], lambda r: (
        f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n', r["label"])),
    "cb": (["Yes", "No", "Maybe"], lambda r: (
        f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n', r["label"])),
    # The candidates read Yes, No, so True (1) is candidate 0.
    "boolq": (["Yes", "No"], lambda r: (f'{r["passage"]} {_question(r["question"])}\n', 1 - r["label"])),
    "wsc": (["No", "Yes"], lambda r: (
        f'{r["text"]}\nIn the previous sentence, does the pronoun "{r["span2_text"].lower()}" refer to '
        f'{r["span1_text"]}? Yes or No?\n', r["label"])),
    "wic": (["No", "Yes"], lambda r: (
        f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
        f'{r["sentence1"]}\n{r["sentence2"]}\n', r["label"])),
    "multirc": (["No", "Yes"], lambda r: (
        f'{r["paragraph"]}\nQuestion: {r["question"]}\nI found this answer "{r["answer"]}". '
        f'Is that correct? Yes or No?\n', r["label"])),
}


# -- multiple choice: row -> (prompt text, continuations, label index) or None -------------------

def _copa(row):
    # "<premise without its final period> so|because <choice, first word lower-cased>".
    premise = row["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conjunction = {"effect": "so", "cause": "because"}[row["question"]]

    def lower_first(choice: str) -> str:
        first, _, rest = choice.partition(" ")
        return (first if first == "I" else first.lower()) + (" " + rest if rest else "")

    return f"{premise} {conjunction}", (lower_first(row["choice1"]), lower_first(row["choice2"])), row["label"]


def _record(row):
    # The reference code's GPT-3 style: the passage with its highlights as "- " bullets, then
    # one more bullet that each candidate completes as the query with @placeholder filled in.
    text = row["passage"].replace("@highlight\n", "- ") + "\n-"
    entities = list(dict.fromkeys(row["entities"]))  # the hub stores a set; guard against repeats
    correct = [entities.index(a) for a in row["answers"] if a in entities]
    if not correct:  # no gold entity among the candidates: the example can be neither trained nor scored
        return None
    # Trained on the first gold entity (as the reference code); any of them scores as right.
    return text, tuple(row["query"].replace("@placeholder", e) for e in entities), correct[0], tuple(correct[1:])


MULTIPLE_CHOICE = {"copa": _copa, "record": _record}


# -- generation: row -> (prompt text without "Answer:", gold answers) -----------------------------

GENERATION = {
    "squad": lambda r: (f'Title: {r["title"]}\nContext: {r["context"]}\nQuestion: {r["question"].strip()}',
                        r["answers"]["text"]),
    "drop": lambda r: (f'Passage: {r["passage"]}\nQuestion: {r["question"].strip()}', r["answers_spans"]["spans"]),
}


def _examples(task: str, split: str, rows, convert):
    """Example per row; ``convert(row)`` returns the Example's fields, or None to drop the row."""
    examples = []
    for position, row in enumerate(rows):
        fields = convert(row)
        if fields is not None:
            examples.append(Example(f"{split}-{position}", **fields))
    if not examples:
        raise UserError(f"task {task}: the hub's {split} split holds no usable examples")
    return examples


def build(name: str, config):
    """The Task ``name`` (one of HUB_DATASETS) with the paper's template and candidates."""
    if name in CLASSIFICATION:
        default, render = CLASSIFICATION[name]
        words = class_words(config, default, default)

        def convert(row):
            text, label = render(row)
            # -1 marks an unlabelled row (the hub's test splits): nothing to learn or score.
            return {"text": text, "label": int(label)} if 0 <= label < len(words) else None

        template, candidates, kind = prompt_template(config, "{text}"), words, "classification"
    else:
        if config.candidates:  # each example carries its own continuations or answers
            raise UserError(f"task {name} brings its own answers per example: drop --candidates")
        if name in MULTIPLE_CHOICE:
            make = MULTIPLE_CHOICE[name]

            def convert(row):
                made = make(row)
                if made is None:
                    return None
                text, candidates, label, *also_right = made
                return {"text": text, "candidates": candidates, "label": int(label),
                        "also_right": also_right[0] if also_right else ()}

            template, kind = prompt_template(config, "{text}"), "multiple_choice"
        else:
            make = GENERATION[name]

            def convert(row):
                text, answers = make(row)
                answers = tuple(dict.fromkeys(a for a in answers if a.strip()))  # drop blanks and repeats
                # Without a gold answer there is nothing to train on or to score F1 against.
                return {"text": text, "label": -1, "answers": answers} if answers else None

            template, kind = prompt_template(config, GENERATION_TEMPLATE), "generation"
        candidates = []
    train_rows, validation_rows = load_splits(name)
    # MeZO's classification prompts end in a newline and the word follows it directly.
    separator = "" if kind == "classification" else " "
    return Task(name, template, candidates, _examples(name, "train", train_rows, convert),
                _examples(name, "validation", validation_rows, convert), kind, separator=separator)


# task name -> builder(config) -> zotune.tasks.examples.Task
BUILDERS: dict = {name: (lambda config, name=name: build(name, config)) for name in HUB_DATASETS}
