"""Answer metrics of generation tasks (SQuAD's): exact match and token-level F1 after
normalisation (lower case, no punctuation, no articles, single spaces), each the best
over the gold answers."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answers) -> float:
    return float(any(normalize(prediction) == normalize(answer) for answer in answers))


def token_f1(prediction: str, answers) -> float:
    return max((_f1(normalize(prediction).split(), normalize(answer).split()) for answer in answers), default=0.0)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:  # an empty answer matches only an empty answer
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def shown(metric: str, value: float) -> str:
    """A score as people read it: accuracy, F1 and exact match in percent; a reward, whose scale is its
    function's, as a number."""
    return f"{value:.3f}" if metric == "reward" else f"{value:.1%}"
