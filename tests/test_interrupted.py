"""--resume after a driver killed during Ray's upload of its snapshot: the files the copy cut short are
completed from the killed driver's staging folder, and nothing else is touched."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from avn_study.study.check import check_searcher_state
from avn_study.study.interrupted import finish_upload

SESSION = "2026-12-02_10-00-00"


def _snapshot(folder: Path, lr: float = 0.01) -> None:
    """An experiment folder as Ray's driver stages it: state, searcher, one trial's params and results."""
    (folder / "trial_a").mkdir(parents=True)
    (folder / f"experiment_state-{SESSION}.json").write_text(json.dumps({"trial_data": [], "runner_data": {}}))
    (folder / f"searcher-state-{SESSION}.pkl").write_bytes(pickle.dumps({"trials": list(range(500))}))
    (folder / "trial_a" / "params.json").write_text(json.dumps({"lr": lr}))
    lines = [{"training_iteration": i, "epoch": i - 1, "val_dice": 0.1 * i} for i in (1, 2)]
    (folder / "trial_a" / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _layout(tmp_path: Path, lr: float = 0.01) -> tuple[Path, Path, Path]:
    temp_root = tmp_path / "ray"
    staged = temp_root / "session_x" / "artifacts" / SESSION / "stage1-unet" / "driver_artifacts"
    experiment = tmp_path / "study" / "stage1-unet"
    _snapshot(staged)
    _snapshot(experiment, lr)
    return temp_root, staged, experiment


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_copy_cut_short_is_finished_from_the_staging_folder(tmp_path: Path) -> None:
    temp_root, staged, experiment = _layout(tmp_path)
    searcher, results = experiment / f"searcher-state-{SESSION}.pkl", experiment / "trial_a" / "result.json"
    state = experiment / f"experiment_state-{SESSION}.json"
    state.write_text(json.dumps({"trial_data": [], "runner_data": {"older": True}}))  # the previous snapshot
    _cut(searcher)  # the file the kill cut
    _cut(results, 0.8)
    assert sorted(finish_upload(experiment, temp_root)) == sorted([searcher, results, state])
    for path in (searcher, results, state):  # one snapshot again: the staged one
        assert path.read_bytes() == (staged / path.relative_to(experiment)).read_bytes()
    check_searcher_state(searcher)  # whole again
    assert finish_upload(experiment, temp_root) == []  # nothing left to do
    assert not list(experiment.glob(".*"))  # no temporary file left behind


def test_nothing_is_taken_from_a_staging_folder_it_cannot_trust(tmp_path: Path) -> None:
    temp_root, staged, experiment = _layout(tmp_path / "a", lr=0.02)  # another experiment's staging folder
    _cut(experiment / f"searcher-state-{SESSION}.pkl")
    assert finish_upload(experiment, temp_root) == []
    temp_root, staged, experiment = _layout(tmp_path / "b")
    searcher = experiment / f"searcher-state-{SESSION}.pkl"
    searcher.write_bytes(b"garbage, not a prefix")  # damaged some other way: still refused by --resume
    assert finish_upload(experiment, temp_root) == []
    assert searcher.read_bytes() == b"garbage, not a prefix"
    temp_root, staged, experiment = _layout(tmp_path / "c")
    _cut(staged / f"experiment_state-{SESSION}.json")  # the staged snapshot itself cut by the kill
    _cut(experiment / f"experiment_state-{SESSION}.json", 0.2)
    _cut(experiment / f"searcher-state-{SESSION}.pkl")
    assert finish_upload(experiment, temp_root) == []


def test_a_live_or_foreign_lock_holder_is_not_a_dead_driver_here(tmp_path: Path) -> None:
    import os
    import socket

    from avn_study.study.folder import LockFile, StudyLock

    where = LockFile(tmp_path / ".lock")
    where.create(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17, "heartbeat": 0}).encode())
    lock = StudyLock(where, str(tmp_path))
    lock.acquire(takeover_stale=True)
    try:
        assert lock.took_over_a_dead_driver_here()
    finally:
        lock.release()
    where.create(json.dumps({"host": "another-host", "pid": os.getpid(), "heartbeat": 0}).encode())
    lock = StudyLock(where, str(tmp_path))
    lock.acquire(takeover_stale=True)
    try:
        assert not lock.took_over_a_dead_driver_here()  # its staging folders are on its own host
    finally:
        lock.release()
