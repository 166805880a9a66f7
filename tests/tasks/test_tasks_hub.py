"""The MeZO paper's hub tasks, loaded from small fixture files in each dataset's hub column layout
(tests/data/hub/<task>.jsonl: one {"split", "row"} object per line) through a stand-in for
``datasets``, so that no network and no ``datasets`` package is needed."""

import json
import sys
import types

import pytest

from zotune import tasks
from zotune.tasks import hub as tasks_hub
from zotune.recipe.config import TrainConfig
from zotune.errors import UserError

from ..conftest import DATA

HUB = DATA / "hub"
# task -> (format, train examples, test examples)
EXPECTED = {
    "rte": ("classification", 4, 3), "cb": ("classification", 4, 3), "boolq": ("classification", 4, 3),
    "wsc": ("classification", 4, 3), "wic": ("classification", 4, 3), "multirc": ("classification", 4, 3),
    "copa": ("multiple_choice", 4, 3), "record": ("multiple_choice", 4, 3),  # one validation row has no gold entity
    "squad": ("generation", 4, 3), "drop": ("generation", 4, 3),
}


def fixture_splits(task):
    splits = {"train": [], "validation": []}
    for line in (HUB / f"{task}.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        splits[record["split"]].append(record["row"])
    return splits


@pytest.fixture
def hub(monkeypatch):
    """A stand-in ``datasets`` module serving the fixtures; records what was asked of it."""
    calls = []
    by_dataset = {spec: task for task, spec in tasks_hub.HUB_DATASETS.items()}

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return fixture_splits(by_dataset[(path, name)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def build(task, **extra):
    return tasks.build_task(TrainConfig(task=task, **extra))


def by_id(task):
    return {e.id: e for e in task.train_pool + task.test_pool}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_task_reads_train_and_validation_of_its_hub_dataset(hub, name):
    assert name in tasks.TASKS
    task = build(name)
    kind, n_train, n_test = EXPECTED[name]
    assert hub == [tasks_hub.HUB_DATASETS[name]]
    assert task.name == name and task.format == kind
    assert (len(task.train_pool), len(task.test_pool)) == (n_train, n_test)
    ids = [e.id for e in task.train_pool + task.test_pool]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("train-") for i in ids[:n_train])
    assert all(i.startswith("validation-") for i in ids[n_train:])
    for example in task.train_pool + task.test_pool:
        if kind == "classification":
            assert example.candidates is None and example.answers == () and 0 <= example.label < len(task.candidates)
        elif kind == "multiple_choice":
            assert task.candidates == [] and 0 <= example.label < len(example.candidates)
            assert task.choices(example) == list(example.candidates)
        else:
            assert task.candidates == [] and example.label == -1 and example.answers
            assert task.prompt(example).endswith("\nAnswer:")


def test_ids_are_the_row_positions_and_stable(hub):
    first, again = build("rte"), build("rte")
    assert [e.id for e in first.train_pool] == ["train-0", "train-1", "train-2", "train-3"]
    assert first.train_pool == again.train_pool and first.test_pool == again.test_pool


# -- the paper's templates, rendered exactly ------------------------------------------------------

def test_rte_template_and_labels(hub):
    task = build("rte")
    assert task.template == "{text}" and task.candidates == ["Yes", "No"]
    example = by_id(task)["train-0"]
    assert task.prompt(example) == ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that '
                                    '"Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert [e.label for e in task.train_pool] == [1, 1, 0, 0]  # 0 = entailment = Yes


def test_cb_template_and_labels(hub):
    task = build("cb")
    assert task.candidates == ["Yes", "No", "Maybe"]
    example = by_id(task)["validation-1"]
    assert task.prompt(example) == ('Suppose A: Do you think that\'s a good idea? B: I do think that it is. '
                                    'Can we infer that "it is a good idea"? Yes, No, or Maybe?\n')
    assert [e.label for e in task.train_pool] == [0, 2, 1, 2]


def test_boolq_capitalises_the_question_and_maps_true_to_yes(hub):
    task = build("boolq")
    assert task.candidates == ["Yes", "No"]
    examples = by_id(task)
    assert task.prompt(examples["train-0"]) == ("Persian language -- Persian is spoken in Iran, Afghanistan and "
                                                "Tajikistan. Do iran and afghanistan speak the same language?\n")
    assert task.prompt(examples["train-2"]).endswith(" Is windows movie maker part of windows essentials?\n")
    assert [e.label for e in task.train_pool] == [0, 0, 0, 1]  # hub label 1 (True) -> "Yes"
    assert [e.label for e in task.test_pool] == [1, 0, 0]


def test_wsc_template_lowercases_the_pronoun(hub):
    task = build("wsc")
    assert task.candidates == ["No", "Yes"]
    example = by_id(task)["train-0"]
    assert task.prompt(example) == ("Mark told Pete many lies about himself, which Pete included in his book. He "
                                    "should have been more skeptical.\nIn the previous sentence, does the pronoun "
                                    '"he" refer to Mark? Yes or No?\n')
    assert [e.label for e in task.train_pool] == [0, 1, 1, 1]


def test_wic_template(hub):
    task = build("wic")
    assert task.candidates == ["No", "Yes"]
    assert task.prompt(by_id(task)["train-0"]) == ('Does the word "carry" have the same meaning in these two '
                                                   'sentences? Yes, No?\nYou must carry your camping gear.\n'
                                                   'Sound carries well over water.\n')
    assert [e.label for e in task.test_pool] == [0, 1, 1]


def test_multirc_template(hub):
    task = build("multirc")
    assert task.candidates == ["No", "Yes"]
    example = by_id(task)["train-1"]
    assert task.prompt(example) == ("While this process moved along, diplomacy continued its rounds. Direct "
                                    "pressure on the Taliban had proved unsuccessful.\nQuestion: What did the "
                                    "high-level effort to persuade Pakistan include?\nI found this answer "
                                    '"Direct pressure on the Taliban". Is that correct? Yes or No?\n')
    assert example.label == 1 and [e.label for e in task.train_pool] == [0, 1, 1, 0]


def test_copa_joins_premise_and_choice_with_so_or_because(hub):
    task = build("copa")
    examples = by_id(task)
    cause = examples["train-0"]
    assert task.prompt(cause) == "My body cast a shadow over the grass because"  # final period dropped
    assert cause.candidates == ("the sun was rising.", "the grass was cut.") and cause.label == 0
    effect = examples["validation-1"]
    assert task.prompt(effect) == "I tipped the bottle so"
    # The first word is lower-cased, except "I".
    assert effect.candidates == ("the liquid in the bottle froze.", "I spilled the liquid in the bottle")
    assert effect.label == 1


def test_record_fills_the_placeholder_with_each_entity(hub):
    task = build("record")
    examples = by_id(task)
    first = examples["train-0"]
    assert task.prompt(first) == ("The harrowing stories of women and children locked up for so-called 'moral "
                                  "crimes' in Afghanistan.\n- The film focuses on the women held in Afghanistan's "
                                  "prisons\n- CNN's Nima Elbagir reports\n-")
    assert first.candidates == ("Elbagir says the women of Afghanistan are often victims themselves",
                                "Elbagir says the women of CNN are often victims themselves",
                                "Elbagir says the women of Nima Elbagir are often victims themselves")
    assert first.label == 0
    # Several correct entities: the label is the first of the (sorted) answers.
    assert examples["validation-0"].candidates[examples["validation-0"].label] == \
        "Shares of Apple climbed after the event"
    assert examples["validation-2"].candidates[examples["validation-2"].label] == \
        "Residents of Oklahoma were told to stay indoors"
    # The other gold entities count as right when scoring.
    apple = examples["validation-0"]
    assert [apple.candidates[i] for i in apple.also_right] == ["Shares of Apple Inc. climbed after the event"]
    assert examples["validation-2"].is_right(examples["validation-2"].candidates.index(
        "Residents of Texas were told to stay indoors"))
    assert examples["validation-1"].also_right == ()
    assert "validation-3" not in examples  # its answer is no entity: nothing to score


def test_squad_prompt_and_all_gold_answers(hub):
    task = build("squad")
    examples = by_id(task)
    first = examples["train-0"]
    assert task.prompt(first) == ("Title: University_of_Notre_Dame\nContext: Architecturally, the school has a "
                                  "Catholic character. Atop the Main Building's gold dome is a golden statue of the "
                                  "Virgin Mary.\nQuestion: What sits on top of the Main Building at Notre Dame?"
                                  "\nAnswer:")
    assert first.answers == ("a golden statue of the Virgin Mary",)
    assert task.prompt(examples["train-3"]).endswith("\nQuestion: In what year was Beyoncé born?\nAnswer:")
    assert examples["validation-0"].answers == ("Denver Broncos",)  # repeats of one answer kept once
    assert examples["validation-1"].answers == ("Levi's Stadium", "Levi's Stadium in Santa Clara, California",
                                                "Santa Clara, California")


def test_drop_prompt_and_answers(hub):
    task = build("drop")
    examples = by_id(task)
    first = examples["train-0"]
    assert task.prompt(first) == ("Passage: Hoping to rebound from their loss, the Chargers flew to Arrowhead. "
                                  "Kicker Nate Kaeding got a 23-yard field goal and a 37-yard field goal.\n"
                                  "Question: How many field goals did Kaeding kick?\nAnswer:")
    assert first.answers == ("2",) and first.label == -1
    assert examples["validation-1"].answers == ("Chargers", "the Chargers")


# -- overrides and errors -------------------------------------------------------------------------

def test_classification_takes_template_and_candidate_overrides(hub):
    task = build("rte", template="{text}Answer:", candidates="entailment=True,not_entailment=False")
    assert task.candidates == ["True", "False"]
    assert task.prompt(by_id(task)["train-0"]).endswith("Yes or No?\nAnswer:")


@pytest.mark.parametrize("extra, says", [
    (dict(task="cb", candidates="a=Yes,b=No"), "3 classes"),
    (dict(task="rte", template="Premise: Yes or No?"), "{text}"),
    (dict(task="copa", candidates="a=x,b=y"), "drop --candidates"),
    (dict(task="squad", candidates="a=x,b=y"), "drop --candidates"),
])
def test_bad_overrides_are_one_line_errors_before_any_download(hub, extra, says):
    with pytest.raises(UserError) as error:
        tasks.build_task(TrainConfig(**extra))
    assert says in str(error.value) and "\n" not in str(error.value)
    assert hub == []


def test_missing_datasets_package_is_one_user_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError) as error:
        build("boolq")
    message = str(error.value)
    assert "task boolq needs the datasets package" in message and "pip install" in message
    assert "\n" not in message


@pytest.mark.parametrize("failure", [
    ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)\nTraceback (most recent "
                    "call last):\n  ..."),
    OSError(""),  # no message at all: the type name stands in
])
def test_unreachable_hub_is_one_user_error_line(monkeypatch, failure):
    def load_dataset(path, name=None, **kwargs):
        raise failure

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError) as error:
        build("wic")
    message = str(error.value)
    assert message.startswith("could not load aps/super_glue (wic) from the hub for task wic (")
    assert ("Couldn't reach 'aps/super_glue'" in message) or ("(OSError)" in message)
    assert "\n" not in message
