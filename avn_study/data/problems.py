"""A check's findings, each with the file it concerns, and how a list of them is told to the user.

The lowest module of ``data/``: layout, labels, NIfTI reading, verification, the cache and the DICOM
import all report :class:`Problem` objects, and :func:`format_problems` turns them into one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Problem:
    """One finding of a check, with the file it concerns."""

    path: Path
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.path}: {self.message}"


def format_problems(root: str | Path, problems: list[Problem]) -> str:
    n_err = sum(p.severity == "error" for p in problems)
    import shlex

    head = f"{root}: {n_err} problem(s) found; fix them (see `avn-study verify {shlex.quote(str(root))}`):"
    return "\n".join([head, *(f"  - {p}" for p in problems)])
