"""Finishing the upload a killed driver left half done.

Ray Tune's driver writes each snapshot of an experiment (its experiment state, its searcher's state, the
trials' ``params.json`` and ``result.json``) into a staging folder on its own node, then copies that folder
into the experiment's storage folder in a background thread, file by file and in place. A driver killed
during the copy leaves storage files cut short: a truncated ``searcher-state-*.pkl`` or a ``result.json``
whose last line is cut, which the checks of ``--resume`` rightly refuse as damage (:mod:`~avn_study.study.check`).

The whole file is still in the killed driver's staging folder, on the host it ran on (Ray keeps its session
folders until the host restarts): ``RAY_TEMP/session_*/artifacts/<session>/<experiment>/driver_artifacts``,
``<session>`` being the name of the experiment state it was writing. When ``--resume`` takes over the lock
of a driver that died on this host, :func:`finish_upload` completes from there every file that is a
*strict prefix* of its staged copy (what an interrupted copy leaves), when

- the staged copy is whole (it reads as what it is: JSON, a complete pickle, Ray's results),
- and the staged folder is this experiment's: the same session name, and the ``params.json`` of every trial
  found in both folders identical.

Each completed file is written beside the damaged one and renamed over it (atomic on one file system).
Nothing else is changed: a file damaged in any other way, or without a staged copy, is still refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from avn_study.study.folder import EXPERIMENT_STATE, PARAMS, RESULTS, SEARCH_GEN_STATE, SEARCHER_STATE

STAGED = "driver_artifacts"  # Ray's name for a driver's staging folder of one experiment


def ray_temp_root() -> Path:
    """Where Ray keeps its session folders on this host: the running session's parent, else Ray's default
    (``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then ``ray``)."""
    try:
        import ray._private.worker as worker

        node = worker._global_node
        if node is not None:
            return Path(node.get_session_dir_path()).parent
    except (ImportError, AttributeError):  # Ray moved its internals: its documented default
        pass
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()) / "ray"


def staged_folders(experiment: Path, temp_root: Path) -> list[Path]:
    """The staging folders of ``experiment``'s newest driver session on this host (usually one)."""
    states = sorted(experiment.glob(EXPERIMENT_STATE))
    if not states:
        return []
    session = states[-1].name.removeprefix("experiment_state-").removesuffix(".json")
    return sorted(p for p in temp_root.glob(f"session_*/artifacts/{session}/{experiment.name}/{STAGED}") if p.is_dir())


def _whole(path: Path) -> bool:
    """Whether a staged file reads as what it is (a staged copy can be cut too, by a kill while Ray wrote it)."""
    from avn_study.study.check import DamagedFile, check_searcher_state, read_json, read_results

    try:
        if path.match(SEARCHER_STATE) or path.match(SEARCH_GEN_STATE):
            check_searcher_state(path)
        elif path.name == RESULTS:
            read_results(path)
        else:
            read_json(path, "JSON")
    except (DamagedFile, OSError):
        return False
    return True


def _same_experiment(staged: Path, experiment: Path) -> bool:
    pairs = [(p, experiment / p.relative_to(staged)) for p in staged.glob(f"*/{PARAMS}")]
    shared = [(s, e) for s, e in pairs if e.is_file()]
    return bool(shared) and all(s.read_bytes() == e.read_bytes() for s, e in shared)


def _replace(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finish_upload(experiment: Path, temp_root: Path | None = None) -> list[Path]:
    """Finish the copy of ``experiment``'s last snapshot that a killed driver left half done (see the module
    docstring). A file cut short proves the copy was interrupted; the copy is then finished as Ray would
    have: every staged file of the snapshot that is whole and differs from the storage copy replaces it, so
    the experiment state, the searcher's state and the trials' results are one snapshot again.

    Returns:
        The storage files written (none when no copy was interrupted or no staged copy can be trusted).
    """
    experiment = Path(experiment)
    for staged in staged_folders(experiment, temp_root or ray_temp_root()):
        if not _same_experiment(staged, experiment):
            continue
        names = (EXPERIMENT_STATE, SEARCHER_STATE, SEARCH_GEN_STATE, f"*/{RESULTS}", f"*/{PARAMS}")
        pairs = [(source, experiment / source.relative_to(staged))
                 for source in sorted({p for name in names for p in staged.glob(name)})]  # fmt: skip
        pairs = [(source, target) for source, target in pairs if target.parent.is_dir()]
        if not any(_cut_short(target, source) for source, target in pairs):
            continue  # the last copy completed (or never started): nothing of it to finish
        if not all(_whole(source) for source, _ in pairs if source.parent == staged):
            continue  # the snapshot itself was being written when the driver died: not one to trust
        written = []
        for source, target in pairs:
            full = source.read_bytes()
            if _whole(source) and (not target.is_file() or target.read_bytes() != full):
                _replace(target, full)
                written.append(target)
        return written
    return []


def _cut_short(target: Path, source: Path) -> bool:
    """Whether the storage file is a strict prefix of its staged copy (what an interrupted copy leaves)."""
    if not target.is_file():
        return False
    have, full = target.read_bytes(), source.read_bytes()
    return len(have) < len(full) and full.startswith(have)
