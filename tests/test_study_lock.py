"""A live study has one driver; a stale lock can be taken over; a storage that stops taking writes is named."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_space

from avn_study.cli.commands import main
from avn_study.errors import UsageError
from avn_study.study.driver import Study
from avn_study.study.folder import LOCK_FILE, LockFile, StudyLock
from avn_study.study.space import parse_space


def _copy_study(smoke_experiment: Path, tmp_path: Path) -> tuple[Path, Study]:
    """A copy of the shared smoke study and a Study object for it (same space, same cohort)."""
    root = Path(shutil.copytree(smoke_experiment, tmp_path / "storage" / smoke_experiment.name))
    manifest = json.loads((root / "study.json").read_text())
    space = parse_space(manifest["space"], root / "space.yaml")
    return root, Study(space, Path(manifest["data"]), str(root.parent), progress=False)


def _plant(root: Path, **holder: object) -> None:
    payload = {"host": socket.gethostname(), "pid": 1, "started": time.time(), "heartbeat": time.time(), **holder}
    (root / LOCK_FILE).write_text(json.dumps(payload))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_stale_lock_is_taken_over_by_resume(smoke_experiment: Path, tmp_path: Path) -> None:
    root, study = _copy_study(smoke_experiment, tmp_path)
    _plant(root, pid=_dead_pid())  # its driver was killed on this host
    study.prepare(resume=True)
    assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    study.close()
    assert not (root / LOCK_FILE).exists()
    _plant(root, host="gone-node", heartbeat=time.time() - 3600)  # another host, silent for an hour
    study.prepare(resume=True)
    study.close()


def test_a_live_lock_is_refused_naming_its_holder_unless_forced(smoke_experiment: Path, tmp_path: Path) -> None:
    root, study = _copy_study(smoke_experiment, tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(root, pid=sleeper.pid)
        with pytest.raises(UsageError, match=rf"being run by another driver: pid {sleeper.pid} on "
                                             rf"{socket.gethostname()}.*--force-unlock"):  # fmt: skip
            study.prepare(resume=True)
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == sleeper.pid  # untouched
        _plant(root, host="other-node", pid=4242)  # another host, heartbeat fresh: alive as far as we know
        with pytest.raises(UsageError, match="pid 4242 on other-node"):
            study.prepare(resume=True)
        forced = Study(study.space, study.data, str(root.parent), progress=False, force_unlock=True)
        forced.prepare(resume=True)
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
        forced.close()
    finally:
        sleeper.kill()


def test_the_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(tmp_path: Path) -> None:
    lock = StudyLock(LockFile(tmp_path / LOCK_FILE), str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    _plant(tmp_path, host="thief", pid=7)  # --force-unlock elsewhere
    time.sleep(0.3)
    assert lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "thief"  # not ours to delete


def test_a_second_driver_is_refused_while_the_first_runs(sweep_cohort: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    space = small_space(
        tmp_path, name="one", protocol="sweep", trials=1, arms={"unet": {"schedule": "constant", "schedule_params": {}}}
    )  # short: the lock is tested
    argv = ["sweep", str(space), "--data", str(sweep_cohort), "--storage", str(tmp_path / "st"), "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "avn_study", *argv, "--num-cpus", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = tmp_path / "st" / "one" / LOCK_FILE
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert lock.exists(), first.communicate()[1][-2000:]
        assert main([*argv, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"being run by another driver: pid {first.pid}" in err
        assert main(argv) == 2  # a fresh start is refused too
        _, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr[-3000:]  # the first driver was not disturbed
        assert not lock.exists()  # released at the end
    finally:
        if first.poll() is None:
            first.kill()


@pytest.fixture
def small_mount(tmp_path: Path):
    """A 64 MiB tmpfs for storage that a test can fill mid-sweep (needs root and mount)."""
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]}); needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte."""
    filler = folder / "filler.bin"
    chunk = b"\0" * 2**20
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
    return filler


def test_storage_that_fills_up_is_named_not_called_an_interrupt(sweep_cohort: Path, tmp_path: Path,
                                                                small_mount: Path) -> None:  # fmt: skip
    import yaml

    fixed = {**yaml.safe_load(small_space(tmp_path).read_text())["fixed"], "epochs": 6}
    space = small_space(tmp_path, name="full", fixed=fixed, scheduler={"type": "none"})
    argv = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(sweep_cohort), "--storage",
            str(small_mount), "--num-cpus", "2", "--quiet"]  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(small_mount.glob("full/stage1-*/trial_*/result.json")) and time.time() < deadline:
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        time.sleep(0.2)
    filler = _fill(small_mount)
    try:
        _, stderr = driver.communicate(timeout=600)
    finally:
        filler.unlink()
    assert driver.returncode == 1, stderr[-3000:]
    assert f"cannot write to {small_mount}: No space left on device" in stderr, stderr[-3000:]
    assert "interrupted" not in stderr and "Traceback" not in stderr
