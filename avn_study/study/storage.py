"""Where a study lives: a local (or shared) folder, or an object store, behind one interface.

:class:`LocalStudy` and :class:`RemoteStudy` give :class:`~avn_study.study.driver.Study` the same operations
(``exists``, ``lock``, ``push``/``pull``, ``saved``, ``abandon``, ``check_writable``), so the protocol code
never asks which one it has. For a local study most of them are no-ops: its folder is the record.

A study on an object store (any pyarrow filesystem URI: ``s3://``, ``gs://``, ``file://``...):

Ray Tune writes trials straight to the URI (checkpoints, results, the trials' per-case files). The
study's own files (``study.json``, ``space.yaml``, the Optuna journal, ``stage2_plan.json``) live in a
local *mirror* folder, where the driver writes them (Optuna's journal needs a local file), and are
uploaded after every change. After each stage the JSON and text files of its Ray experiment
(statuses, parameters, results, per-case metrics, errors; not checkpoints) are downloaded into the
mirror, so that the driver's bookkeeping and ``avn-study analyze MIRROR`` read local files. The
mirror is ``$AVN_STUDY_CACHE/studies/NAME-<hash of the URI>`` (default ``~/.cache/avn-study``); it can
be deleted at any time: ``--resume`` downloads what it needs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
from pathlib import Path

from avn_study.errors import AvnError, UsageError
from avn_study.study.folder import (
    ERROR_FILE,
    EXPERIMENT_STATE,
    LOCK_FILE,
    MIRROR_MARKER,
    STUDY_FILES,
    LockFile,
    storage_error,
)


def _wanted(relative: str) -> bool:
    """Files of a Ray experiment that the mirror keeps: JSON and error text, never checkpoints or pickles."""
    parts = relative.split("/")
    if any(p.startswith("checkpoint_") for p in parts[:-1]):
        return False
    return parts[-1].endswith(".json") or parts[-1] == ERROR_FILE


class LocalStudy:
    """The study folder ``STORAGE/NAME`` on a local or shared file system: Ray and the driver write there."""

    def __init__(self, storage: str, name: str) -> None:
        local = Path(storage).expanduser()
        if local.exists() and not local.is_dir():
            raise UsageError(f"--storage {storage}: is a file; expected a folder (it is created if missing)")
        self.storage = str(local.resolve())  # what Ray's storage_path is built from
        self.mirror = Path(self.storage) / name  # the study's own files (here: the folder itself)
        self.uri = str(self.mirror)

    def exists(self, relative: str) -> bool:
        return (self.mirror / relative).exists()

    def push(self, *names: str) -> None:
        """(Nothing to upload: the folder is the record.)"""

    def pull_study(self) -> None:
        """(Nothing to download.)"""

    def start_fresh(self) -> None:
        """(Nothing to clear.)"""

    def pull(self, experiment: str) -> Path:
        return self.mirror / experiment

    def saved(self, experiment: str) -> bool:
        """Whether Ray saved the experiment's state (it snapshots after trials start)."""
        return any((self.mirror / experiment).glob(EXPERIMENT_STATE))

    def abandon(self, experiment: str, new_name: str) -> None:
        (self.mirror / experiment).rename(self.mirror / new_name)

    def abandoned_count(self) -> int:
        return len(list(self.mirror.glob("*.abandoned-*")))

    def lock(self, resume: bool) -> tuple[LockFile, bool]:
        """The lock file beside ``study.json``, and whether the folder was created for it. A folder that
        holds anything but a study is refused (``--name`` must not take over someone's folder)."""
        created = not self.mirror.exists()
        try:
            self.mirror.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(self.storage, err) from None
        others = [p.name for p in self.mirror.iterdir() if p.name != LOCK_FILE]
        if not resume and others:
            held = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UsageError(f"{self.mirror} exists and is not an avn-study study (it holds {held}); choose "
                             "another --name or --storage")  # fmt: skip
        return LockFile(self.mirror / LOCK_FILE), created

    def check_writable(self) -> None:
        """Raise the storage error (exit 1) if the study folder no longer takes writes."""
        import os

        probe = self.mirror / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"ok" * 2048)
        except OSError as err:
            raise storage_error(self.storage, err) from None
        finally:
            probe.unlink(missing_ok=True)


def open_study_storage(storage: str, name: str) -> LocalStudy | RemoteStudy:
    """The storage of study ``name``: an object store for a URI (``s3://...``), else a folder."""
    return RemoteStudy(storage, name) if "://" in storage else LocalStudy(storage, name)


class RemoteStudy:
    """The study folder ``URI/NAME`` on a pyarrow filesystem, and its local mirror."""

    def __init__(self, uri: str, name: str, mirror_root: Path | None = None) -> None:
        from pyarrow import fs

        from avn_study.data.cache import default_cache_dir

        try:
            self.fs, base = fs.FileSystem.from_uri(uri)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for unknown schemes or bad URIs
            raise UsageError(f"--storage {uri}: not a storage URI pyarrow can open ({err})") from None
        self.storage = uri.rstrip("/")
        self.uri = f"{uri.rstrip('/')}/{name}"
        self.base = f"{base.rstrip('/')}/{name}"
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
        self.mirror = (mirror_root or default_cache_dir() / "studies") / f"{name}-{digest}"

    # ---------------------------------------------------------------------------------- primitives
    def _info(self, relative: str):
        try:
            return self.fs.get_file_info(f"{self.base}/{relative}")
        except OSError as err:
            raise AvnError(f"{self.uri}/{relative}: the storage cannot be read ({err})") from None

    def exists(self, relative: str) -> bool:
        from pyarrow import fs

        return self._info(relative).type != fs.FileType.NotFound

    def _download(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(remote, compression=None) as stream:
            local.write_bytes(stream.read())

    def _listing(self, relative: str, recursive: bool = True) -> list:
        from pyarrow import fs

        path = f"{self.base}/{relative}".rstrip("/")
        selector = fs.FileSelector(path, allow_not_found=True, recursive=recursive)
        try:
            return self.fs.get_file_info(selector)
        except OSError as err:
            raise AvnError(f"{self.uri}/{relative}: the storage cannot be listed ({err})") from None

    # ---------------------------------------------------------------------------------- study files
    def push(self, *names: str) -> None:
        """Upload study files from the mirror (those that exist there)."""
        try:
            self.fs.create_dir(self.base, recursive=True)
            for name in names:
                local = self.mirror / name
                if local.is_file():
                    with self.fs.open_output_stream(f"{self.base}/{name}", compression=None) as stream:
                        stream.write(local.read_bytes())
        except OSError as err:
            raise AvnError(f"{self.uri}: cannot write the study's files ({err})") from None

    def pull_study(self) -> None:
        """Download the study files into a fresh mirror (``--resume``)."""
        self.start_fresh()
        for name in STUDY_FILES:
            if self.exists(name):
                self._download(f"{self.base}/{name}", self.mirror / name)

    def start_fresh(self) -> None:
        shutil.rmtree(self.mirror, ignore_errors=True)
        self.mirror.mkdir(parents=True, exist_ok=True)
        (self.mirror / MIRROR_MARKER).write_text(self.uri + "\n")

    # ---------------------------------------------------------------------------------- experiments
    def saved(self, experiment: str) -> bool:
        """Whether Ray saved the experiment's state (so ``Tuner.restore`` can continue it)."""
        names = [info.base_name for info in self._listing(experiment, recursive=False)]
        return any(fnmatch.fnmatch(n, EXPERIMENT_STATE) for n in names)

    def _relative(self, info, experiment: str) -> str:
        return info.path.removeprefix(f"{self.base}/{experiment}/")

    def pull(self, experiment: str) -> Path:
        """Mirror the experiment's JSON and error files; returns the mirrored folder."""
        from pyarrow import fs

        target = self.mirror / experiment
        shutil.rmtree(target, ignore_errors=True)
        for info in self._listing(experiment):
            relative = self._relative(info, experiment)
            if info.type == fs.FileType.File and _wanted(relative):
                self._download(info.path, target / relative)
        return target

    def abandon(self, experiment: str, new_name: str) -> None:
        """Move an experiment that never saved its state aside (in the store and the mirror)."""
        try:
            self.fs.move(f"{self.base}/{experiment}", f"{self.base}/{new_name}")
        except OSError as err:
            raise AvnError(f"{self.uri}/{experiment}: cannot move it aside ({err})") from None
        shutil.rmtree(self.mirror / experiment, ignore_errors=True)

    def abandoned_count(self) -> int:
        return sum(".abandoned-" in info.base_name for info in self._listing("", recursive=False))

    # ---------------------------------------------------------------------------------- lock and probe
    def lock(self, resume: bool) -> tuple[RemoteLockFile, bool]:
        """The study's lock (:class:`avn_study.study.folder.StudyLock`) in the store, beside ``study.json``."""
        return RemoteLockFile(self.fs, f"{self.base}/{LOCK_FILE}"), False

    def check_writable(self) -> None:
        """Raise (exit 1, naming the store) if the store no longer takes writes."""
        probe = f"{self.base}/.write-probe"
        try:
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as err:
            raise AvnError(f"cannot write to {self.uri}: {err}") from None


class RemoteLockFile:
    """A lock file in an object store. Stores have no create-if-absent, so ``create`` checks, writes and
    reads back: two drivers starting within the same second could both succeed (documented limit)."""

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> bytes | None:
        from pyarrow import fs

        if self.fs.get_file_info(self.path).type == fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path, compression=None) as stream:
            return stream.read()

    def create(self, payload: bytes) -> bool:
        if self.read() is not None:
            return False
        self.replace(payload)
        return self.read() == payload

    def replace(self, payload: bytes) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path, compression=None) as stream:
            stream.write(payload)

    def delete(self) -> None:
        from pyarrow import fs

        if self.fs.get_file_info(self.path).type != fs.FileType.NotFound:
            self.fs.delete_file(self.path)
