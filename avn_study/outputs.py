"""The rule every command that writes follows: it never deletes or replaces what it did not create.

A command writes a *new* folder or file; an existing one is refused with a message saying what is
there, unless the user passes ``--overwrite`` **and** the existing thing is recognisably the command's
own kind (a bundle, a run folder, a phantom cohort, a splits file), and it is neither an input of the
command, nor a folder holding an input, nor the current directory or one above it. Replacing goes
through a temporary sibling and renames, so an interrupted command leaves the old output or the new
one, never half of each.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from avn_study.errors import UsageError


def _holds(outer: Path, inner: Path) -> bool:
    """``outer`` is ``inner`` or one of its parents (both resolved)."""
    return outer == inner or outer in inner.parents


def check_target(out: Path, *, flag: str, kind: str, is_own: Callable[[Path], bool], overwrite: bool,
                 inputs: Iterable[Path] = (), folder: bool = True) -> None:  # fmt: skip
    """Refuse an output path the command may not write (see the module docstring).

    Args:
        out: the folder (``folder=True``) or file the command will write.
        flag: how the user named it (``--out``, ``OUTPUT``), for messages.
        kind: what the command writes (``a bundle``), for messages.
        is_own: whether an existing ``out`` is of that kind.
        overwrite: the user passed ``--overwrite``.
        inputs: paths the command reads; ``out`` may not be one of them or hold one.

    Raises:
        UsageError: naming ``out``, what is wrong and what to do.
    """
    resolved = out.resolve()  # a literal "~" is a folder name here: the shell expands the user's own
    cwd = Path.cwd().resolve()
    if _holds(resolved, cwd):
        raise UsageError(f"{flag} {out}: is the current directory or holds it; name a new {kind} folder instead")
    for given in inputs:
        if _holds(resolved, Path(given).resolve()):
            raise UsageError(f"{flag} {out}: is the input {given} or a folder holding it; choose another place")
    if not (out.exists() or out.is_symlink()):
        return
    if folder and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file; expected a folder for {kind}")
    if not folder and out.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; expected a file path for {kind}")
    if folder and not any(out.iterdir()):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise UsageError(f"{flag} {out}: already exists; choose another path or pass --overwrite to replace {kind}")
    if not is_own(out):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4]) if out.is_dir() else "a file"
        raise UsageError(
            f"{flag} {out}: --overwrite replaces only {kind}, and this is not one (it holds {held}); nothing was "
            "changed: choose another path"
        )


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill; on success it replaces ``out`` (renames), else vanishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_marker(path: Path, key: str, value: object | None = None) -> bool:
    """Whether ``path`` is a JSON object holding ``key`` (equal to ``value`` when given)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and key in data and (value is None or data[key] == value)
