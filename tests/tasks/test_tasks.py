import pytest

from zotune import tasks
from zotune.recipe.config import TrainConfig
from zotune.errors import UserError

from ..conftest import DATA


def csv_config(**extra):
    values = dict(task="csv", data=str(DATA / "reviews.csv"), template="{text} It was",
                  candidates="neg=terrible,pos=great")
    values.update(extra)
    return TrainConfig(**values)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_user_files_load_with_labels_mapped_to_candidates(kind):
    task = tasks.build_task(csv_config(task=kind, data=str(DATA / f"reviews.{kind}")))
    assert task.candidates == ["terrible", "great"]
    examples = task.train_pool + task.test_pool
    assert len(examples) == 80 and len(task.test_pool) == 16
    first = next(e for e in examples if e.text == "weak actors quite boring the story")
    assert first.label == 0 and task.prompt(first) == "weak actors quite boring the story It was"
    assert {e.id for e in task.train_pool}.isdisjoint(e.id for e in task.test_pool)


def test_rt_sst2_drops_neutral_sentences_and_labels_by_sign(monkeypatch):
    monkeypatch.setattr("zotune.assets.packages.rt_sentences_file", lambda: DATA / "rt_sample.txt")
    task = tasks.build_task(TrainConfig(task="rt-sst2"))
    examples = task.train_pool + task.test_pool
    assert len(examples) == 80  # the 0.2-rated sentence is gone
    by_id = {e.id: e for e in examples}
    assert by_id["1"].label == 0 and by_id["1"].text == "weak actors quite boring the story"
    assert by_id["2"].label == 1
    assert task.prompt(by_id["2"]).endswith(" It was") and task.candidates == ["terrible", "great"]


def test_sampling_is_seeded_disjoint_and_test_pool_is_fixed():
    task = tasks.build_task(csv_config())
    a = tasks.sample(task, 20, 10, 8, seed=0)
    b = tasks.sample(task, 20, 10, 8, seed=0)
    c = tasks.sample(task, 20, 10, 8, seed=1)
    assert a.ids() == b.ids() and a.ids()["train"] != c.ids()["train"]
    assert not set(a.ids()["train"]) & set(a.ids()["dev"])
    assert not (set(a.ids()["train"]) | set(a.ids()["dev"])) & set(c.ids()["test"])
    with pytest.raises(UserError, match="fewer than"):
        tasks.sample(task, 60, 10, 8, seed=0)


def test_separate_test_file_is_the_test_pool(tmp_path):
    test_file = tmp_path / "test.csv"
    test_file.write_text("text,label\ngood fun,pos\ndull weak,neg\n")
    task = tasks.build_task(csv_config(test_data=str(test_file)))
    assert len(task.train_pool) == 80 and [e.label for e in task.test_pool] == [1, 0]


@pytest.mark.parametrize("content, message", [
    ("text,label\ngood,pos\nbad,neg,extra\n", "bad.csv:3: expected 2 fields"),
    ("words,label\ngood,pos\n", "bad.csv:2: no column 'text'"),
    ("text,label\ngood,positive\n", "bad.csv:2: label 'positive' is not among the candidates"),
    ("", "empty file"),
])
def test_malformed_csv_names_the_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        tasks.build_task(csv_config(data=str(path)))


def test_candidates_and_template_are_checked():
    with pytest.raises(UserError, match="label=word"):
        tasks.parse_candidates("terrible,great")
    with pytest.raises(UserError, match="must contain"):
        tasks.build_task(csv_config(template="It was"))
    with pytest.raises(UserError, match="needs --data"):
        tasks.build_task(csv_config(data=None))
    assert tasks.parse_candidates({0: "bad", 1: "good"}) == {"0": "bad", "1": "good"}


def test_glue_sst2_through_datasets(monkeypatch):
    import types

    rows = {"train": [{"idx": i, "sentence": f"good film {i} ", "label": i % 2} for i in range(6)],
            "validation": [{"idx": 0, "sentence": "dull", "label": 0}]}
    fake = types.SimpleNamespace(load_dataset=lambda path, name: rows if (path, name) == ("glue", "sst2") else None)
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    task = tasks.build_task(TrainConfig(task="sst2"))
    assert [e.label for e in task.train_pool] == [0, 1, 0, 1, 0, 1] and task.train_pool[1].text == "good film 1"
    assert task.test_pool == [tasks.Example("validation-0", "dull", 0)]
    assert task.candidates == ["terrible", "great"]


def test_sst2_without_the_hub_says_what_to_do(monkeypatch):
    import types

    def offline(path, name):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="offline, use --task rt-sst2"):
        tasks.build_task(TrainConfig(task="sst2"))


@pytest.mark.parametrize("spec", ["pos=great,neg=terrible", "1=great,0=terrible", "negative=terrible,positive=great",
                                  "terrible=terrible,great=great"])
def test_sentiment_candidates_keep_their_classes_whatever_the_order(spec):
    from zotune.tasks.catalogue import SST2_ALIASES, SST2_CLASSES
    from zotune.tasks.examples import class_words

    class Given:
        candidates, task = spec, "rt-sst2"

    assert class_words(Given, SST2_CLASSES, ("bad", "good"), SST2_ALIASES) == ["terrible", "great"]
