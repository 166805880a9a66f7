"""Rewards: what evolution strategies (and MeZO's ``--objective reward``) maximise.

A reward is a function ``(prompt, completion, example) -> float`` of a prompt, the model's
completion and the task's example (its gold ``answers`` and text). Built in:
``exact-match`` and ``f1`` (SQuAD's, against the example's answers) and each verifiable
task's own (``arith``, ``countdown``); ``--reward module:function`` names a user's own
(a module on the path, or a ``.py`` file). A reward that raises, or returns something that
is not a finite number, stops the run with one line naming the function and the example.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from pathlib import Path
from typing import Callable

from zotune.errors import UserError, reason, unknown
from zotune.tasks.examples import Example
from zotune.tasks.metrics import exact_match, token_f1
from zotune.tasks.verifiable import REWARDS as TASK_REWARDS

Reward = Callable[[str, str, Example], float]

BUILT_IN: dict[str, Reward] = {
    "exact-match": lambda prompt, completion, example: exact_match(completion, example.answers),
    "f1": lambda prompt, completion, example: token_f1(completion, example.answers),
    **TASK_REWARDS,
}


def default_name(task_name: str) -> str:
    """The reward of a task when none is given: its own, or exact match against its answers."""
    return task_name if task_name in TASK_REWARDS else "exact-match"


def load(spec: str) -> Reward:
    """A built-in reward by name, or ``module:function`` / ``path/to/file.py:function``."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise UserError(unknown("reward", spec, [*BUILT_IN, "module:function"]))
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward {spec}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:  # the user's module: any failure is theirs to fix
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(error).__name__}: {reason(error)})") \
            from None
    found = getattr(module, function, None)
    if not callable(found):
        raise UserError(f"--reward {spec}: {module_name} has no function {function!r}")
    return found


def score(reward: Reward, name: str, prompt: str, completion: str, example: Example) -> float:
    """``reward(prompt, completion, example)`` as a float, or a one-line error naming the reward and example."""
    try:
        value = reward(prompt, completion, example)
    except Exception as error:
        raise UserError(f"reward {name} raised {type(error).__name__} on example {example.id}: {reason(error)}") \
            from None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UserError(f"reward {name} returned {value!r} on example {example.id}: it must return a finite number")
    return float(value)
