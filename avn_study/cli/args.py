"""Argument types and the progress line shared by the commands.

The types keep their underscored names: argparse names a type in its refusals ("invalid _positive_int
value: 'x'"), and the messages stay what they were.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _path(text: str) -> Path:
    """A path argument; a NUL byte (which no file system accepts) is refused here, not deep in pathlib."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte, which no path can hold")
    return Path(text)


def _text(text: str) -> str:
    """A URI or path argument kept as text (``--storage``): no NUL byte either."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte")
    return text


def _positive_int(text: str) -> int:
    """A count (``--cases``, ``--batch-size``): an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """A duration in seconds: finite and above 0 (``nan`` and ``inf`` are refused too)."""
    value = float(text)
    if not (value > 0.0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _fraction(text: str) -> float:
    """A share in [0, 1) (``--test-fraction``): 1 would leave no patient for the folds."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _progress(done: int, total: int, name: str) -> None:
    """One progress line on stderr, rewritten in place until the last item."""
    end = "\n" if done == total else "\r"
    print(f"  [{done}/{total}] {name}", end=end, file=sys.stderr, flush=True)
