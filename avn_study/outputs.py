"""The rule every command that writes follows: it never deletes or replaces what it did not create.

A command writes a *new* folder or file; an existing one is refused with a message saying what is
there, unless the user passes ``--overwrite`` **and** the existing thing is recognisably the command's
own kind (a bundle, a run folder, a phantom cohort, a splits file), and it is neither an input of the
command, nor a folder holding an input, nor the current directory or one above it.

How outputs are written (docs/safety.md):

- Every output folder or file is built under a temporary name in the same folder,
  ``.NAME.tmp-HOST-PID-TOKEN`` (:func:`temp_name`), and renamed into place at the end, so a killed
  command leaves no file under its final name. The next run of the same command removes temporaries
  of that name whose process is gone (:func:`clean_stale`).
- The final rename never removes something it did not stage: a new output is placed with a rename that
  fails if the target exists (``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere ``os.link`` for a
  file and an exclusive ``mkdir`` then rename-over-empty for a folder), so of two writers one succeeds
  and the other is refused. An existing output is replaced only when the caller's check of its kind
  holds *right before* the swap, and then with one atomic exchange (``RENAME_EXCHANGE``) where the
  file system has it, so an interrupted command leaves the old output or the new one.
- Folders get the mode the umask gives (``mkdtemp`` alone would make them 0700).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from avn_study.errors import UsageError

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
LEGACY_STALE_S = 3600.0  # an older version's temporary untouched this long is left by a killed command


def _holds(outer: Path, inner: Path) -> bool:
    """``outer`` is ``inner`` or one of its parents (both resolved)."""
    return outer == inner or outer in inner.parents


def check_target(out: Path, *, flag: str, kind: str, is_own: Callable[[Path], bool], overwrite: bool,
                 inputs: Iterable[Path] = (), folder: bool = True,
                 hint: str = "choose another place") -> None:  # fmt: skip
    """Refuse an output path the command may not write (see the module docstring).

    Args:
        out: the folder (``folder=True``) or file the command will write.
        flag: how the user named it (``--out``, ``OUTPUT``), for messages.
        kind: what the command writes (``a bundle``), for messages.
        is_own: whether an existing ``out`` is of that kind.
        overwrite: the user passed ``--overwrite``.
        inputs: paths the command reads; ``out`` may not be one of them or hold one.
        hint: what to do when the place of ``out`` cannot be written.

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
    check_writable(out, flag, hint)
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


def check_writable(out: Path, flag: str, hint: str) -> None:
    """The folder that will hold ``out`` (or its nearest existing parent) must take a new entry: probed with
    a temporary folder, so a read-only or immutable place fails before any work, not after it.

    Raises:
        UsageError: naming the folder and the reason.
    """
    where = out.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    probe = where / temp_name(out.name, "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise UsageError(f"{flag} {out}: {where} cannot be written ({err.strerror}); {hint}") from None


# ------------------------------------------------------------------------------------------ temporaries
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def temp_name(name: str, tag: str = "tmp") -> str:
    """``.NAME.tmp-HOST-PID-TOKEN``: a sibling name that says whose it is (see :func:`clean_stale`)."""
    return f".{name}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: object) -> bool:
    """Whether a process of this host with id ``pid`` is alive (a non-positive or non-integer id is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove our temporaries of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``) left by a killed process of this
    host; a set-aside old output whose swap was interrupted goes back to ``out`` when ``out`` is missing.

    Folders of the naming older versions used (``.NAME.tmp-`` and 8 random characters, from ``mkdtemp``, no
    owner in the name) are removed once nothing has written to them for :data:`LEGACY_STALE_S` (a command fills its
    temporary in minutes at most).

    Returns:
        What was removed or restored.
    """
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    legacy = re.compile(rf"\.{re.escape(out.name)}\.(tmp)-[a-z0-9_]{{8}}")  # ``mkdtemp``'s, before 2026-12
    done = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return done
    for path in siblings:
        match = pattern.match(path.name)
        if not match and legacy.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            with suppress(OSError):  # no owner in the name: only one no writer has touched for an hour
                if time.time() - path.stat().st_mtime > LEGACY_STALE_S:
                    shutil.rmtree(path)
                    done.append(path)
            continue
        if not match or match["host"] != _host() or pid_alive(int(match["pid"])):
            continue
        if match.group(1) == "old" and not (out.exists() or out.is_symlink()):
            with suppress(OSError):  # the swap was cut between its renames: the old output goes back
                rename_noreplace(path, out)
                done.append(path)
            continue  # (restored, or left where it is: never removed while it is the only copy)
        with suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            done.append(path)
    return done


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


# ------------------------------------------------------------------------------------------ renames
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the file system lacks it.

    Raises:
        OSError: the rename failed (``FileExistsError`` when ``dst`` exists under ``RENAME_NOREPLACE``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing (``FileExistsError``) if ``dst`` exists: never replaces anything.

    Linux: ``renameat2(RENAME_NOREPLACE)``. Elsewhere, a file is hard-linked (``link`` fails if the name
    exists) and its old name removed (on a file system without hard links, renamed after a check: the one
    case with a window); a folder first claims ``dst`` with an exclusive ``mkdir`` and is then renamed over
    that empty folder (which fails if anybody put something into it meanwhile).
    """
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if not src.is_dir() or src.is_symlink():
        try:
            os.link(src, dst)
        except OSError as err:
            if err.errno == errno.EEXIST or os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            if err.errno not in (*_UNSUPPORTED, errno.EPERM, errno.EMLINK):
                raise
            os.rename(src, dst)  # a file system without hard links: the name was free a moment ago
            return
        os.unlink(src)
        return
    os.mkdir(dst)  # FileExistsError when taken
    try:
        os.rename(src, dst)  # over our own empty folder; ENOTEMPTY if somebody wrote into it meanwhile
    except OSError as err:
        with suppress(OSError):
            os.rmdir(dst)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths, atomically where ``RENAME_EXCHANGE`` exists (else two renames, via a set-aside name)."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    aside = b.with_name(temp_name(b.name, "old"))
    os.rename(b, aside)
    try:
        rename_noreplace(a, b)
    except OSError:
        with suppress(OSError):
            rename_noreplace(aside, b)
        raise
    os.rename(aside, a)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def place(staged: Path, out: Path, replace: Callable[[Path], bool] | None = None) -> None:
    """Move the finished ``staged`` to ``out``: as a new name, or over an existing ``out`` only when
    ``replace(out)`` holds at that moment (and an empty folder, which holds nothing to lose).

    Raises:
        UsageError: ``out`` exists (it appeared while the command ran) and may not be replaced; ``staged``
            is left in place for the caller to keep or remove.
    """
    for _ in range(3):
        try:
            rename_noreplace(staged, out)
            return
        except FileExistsError:
            pass
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            with suppress(OSError):
                out.rmdir()  # fails if somebody writes into it right now: then it is theirs
            continue
        if replace is not None and replace(out):  # checked again right before the swap
            if out.is_dir() != staged.is_dir():
                break
            _exchange(staged, out)  # ``staged`` now holds the old output
            _remove(staged)
            return
        break
    raise UsageError(f"{out}: appeared while this command ran (another command, or you, wrote it); it was not "
                     "touched and this command's result was not put there")  # fmt: skip


@contextmanager
def staged_folder(out: Path, replace: Callable[[Path], bool] | None = None, *, keep_on_conflict: bool = False
                  ) -> Iterator[Path]:  # fmt: skip
    """A temporary sibling of ``out`` to fill; on success it becomes ``out`` (:func:`place`), else vanishes.

    ``replace``: whether an existing ``out`` may be replaced (the command's ``--overwrite`` and its check
    of the kind; None: never). ``keep_on_conflict``: when ``out`` appeared meanwhile, keep the result
    under a visible sibling name (``NAME.unplaced-PID``) and say so, rather than deleting it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.with_name(temp_name(out.name))
    tmp.mkdir(mode=0o777)  # the umask applies (mkdtemp would make it 0700)
    try:
        yield tmp
        try:
            place(tmp, out, replace)
        except UsageError as err:
            if not keep_on_conflict:
                raise
            kept = out.with_name(f"{out.name}.unplaced-{os.getpid()}")
            rename_noreplace(tmp, kept)
            raise UsageError(f"{err}; the result is kept in {kept}") from None
    finally:
        _remove(tmp)


@contextmanager
def staged_file(path: Path, replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling of the file ``path`` to write (it keeps ``path``'s ending, ``.nii.gz`` say);
    on success it is renamed to ``path`` (:func:`place`), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    ending = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(temp_name(path.name) + ending)
    try:
        yield tmp
        place(tmp, path, replace)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str, replace: Callable[[Path], bool] | None = None) -> Path:
    """Write a small text file through :func:`staged_file`."""
    with staged_file(path, replace) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_marker(path: Path, key: str, value: object | None = None) -> bool:
    """Whether ``path`` is a JSON object holding ``key`` (equal to ``value`` when given)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and key in data and (value is None or data[key] == value)


def shell(*parts: object) -> str:
    """A command line to print as a hint, every part shell-quoted (a pasted path with spaces works)."""
    import shlex

    return " ".join(shlex.quote(str(p)) for p in parts)
