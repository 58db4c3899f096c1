"""The one error type the command line turns into a one-line message and exit code 2."""

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """Bad input from the user: a key, a value, a file or a name that cannot be used."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to `limit` characters: a message stays one line
    whatever the user passed."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text):,} characters)"
