"""Errors that the command line turns into exit codes and one-paragraph messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class AvnError(Exception):
    """Base class of errors meant for the user; the CLI prints the message without a traceback."""

    exit_code = 1


class UsageError(AvnError):
    """Bad command-line usage or a bad argument value (exit code 2)."""

    exit_code = 2


class DataError(AvnError):
    """The input data is broken: the message lists every problem with its file (exit code 2)."""

    exit_code = 2


def look_up(name: str, options: Mapping[str, T] | Iterable[str], *, what: str) -> str:
    """Return ``name`` if it is one of ``options``, else raise with a suggestion.

    Args:
        name: the name a user gave.
        options: the valid names (a registry mapping or any iterable of names).
        what: what the name is for, used in the message ("schedule", "model", ...).

    Returns:
        ``name`` unchanged.

    Raises:
        UsageError: ``Unknown schedule 'linaer'; did you mean 'linear'? Available: ...``.
    """
    names = sorted(options)
    if name in names:
        return name
    prefixed = [n for n in names if n.startswith(name) or name.startswith(n)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5) or sorted(prefixed, key=len)[:1]
    hint = f"; did you mean '{close[0]}'?" if close else "."
    raise UsageError(f"Unknown {what} '{name}'{hint} Available: {', '.join(names)}")
