"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data): say what and how to fix it."""


def reason(error: Exception) -> str:
    """An exception's first line, for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def unknown(kind: str, value, choices) -> str:
    """``unknown task 'sst3'; did you mean 'sst2'?``, or the choices when nothing is close."""
    choices = [str(choice) for choice in choices]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    if close:
        return f"unknown {kind} {value!r}; did you mean {close[0]!r}?"
    return f"unknown {kind} {value!r}: choose one of {', '.join(choices)}"
