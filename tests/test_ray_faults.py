"""Ray that cannot be joined or started: an unreachable --address, token authentication, an unusable TMPDIR.

Each case asserts the exit code, the message, and that the failed start left no study files (the lock and
``study.json`` are written only once Ray is up).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import small_space

from avn_study.cli.commands import main

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def no_ray():
    """In-process tests need a driver without Ray (``init_ray`` returns at once when Ray is up)."""
    import ray

    ray.shutdown()
    yield


def _argv(tmp_path: Path, cohort: Path, *extra: str) -> list[str]:
    space = small_space(tmp_path, name="faults", protocol="sweep", trials=1,
                        arms={"unet": {"schedule": "constant", "schedule_params": {}}})  # fmt: skip
    return ["sweep", str(space), "--data", str(cohort), "--storage", str(tmp_path / "st"), "--quiet", *extra]


def _no_study(tmp_path: Path) -> None:
    assert not (tmp_path / "st" / "faults").exists(), sorted(p.name for p in (tmp_path / "st").rglob("*"))


def _client_env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def test_an_unreachable_address_exits_1_naming_it(no_ray, sweep_cohort: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    started = time.monotonic()
    assert main(_argv(tmp_path, sweep_cohort, "--address", "127.0.0.1:1", "--connect-timeout", "1")) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "--address 127.0.0.1:1" in err and "no Ray cluster could be reached within 1 s" in err, err
    assert "--connect-timeout" in err and "AVN_STUDY_CONNECT_TIMEOUT" in err
    _no_study(tmp_path)


def test_the_connect_timeout_variable_is_read_and_checked(no_ray, sweep_cohort: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("AVN_STUDY_CONNECT_TIMEOUT", "0.5")
    assert main(_argv(tmp_path, sweep_cohort, "--address", "127.0.0.1:1")) == 1
    assert "within 0.5 s" in capsys.readouterr().err
    monkeypatch.setenv("AVN_STUDY_CONNECT_TIMEOUT", "soon")
    assert main(_argv(tmp_path, sweep_cohort, "--address", "127.0.0.1:1")) == 2
    assert "AVN_STUDY_CONNECT_TIMEOUT='soon': expected a positive number of seconds" in capsys.readouterr().err
    monkeypatch.delenv("AVN_STUDY_CONNECT_TIMEOUT")
    assert main(_argv(tmp_path, sweep_cohort, "--address", "nonsense")) == 2
    assert "--address nonsense: expected auto or HOST:PORT" in capsys.readouterr().err
    _no_study(tmp_path)


def test_sigterm_while_waiting_for_the_cluster_stops_at_once(sweep_cohort: Path, tmp_path: Path) -> None:
    argv = _argv(tmp_path, sweep_cohort, "--address", "127.0.0.1:1", "--connect-timeout", "120")
    driver = subprocess.Popen([sys.executable, "-m", "avn_study", *argv], stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in driver.stderr:  # the wait has begun
            seen.append(line)
            if "joining the Ray cluster at 127.0.0.1:1" in line:
                break
        time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        _, rest = driver.communicate(timeout=20)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, "".join(seen) + rest
    assert "interrupted while waiting for Ray at 127.0.0.1:1; nothing was written" in rest
    _no_study(tmp_path)


@pytest.fixture(scope="module")
def auth_head():
    """A one-CPU Ray head with token authentication on (RAY_AUTH_MODE=token), its own temp dir."""
    temp = tempfile.mkdtemp(prefix="avnauth", dir="/tmp")  # short: Ray's socket paths are limited
    script = ("import sys, time, ray\n"
              "ray.init(address='local', num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])\n"
              "print(ray.get_runtime_context().gcs_address, flush=True)\n"
              "time.sleep(600)\n")  # fmt: skip
    head = subprocess.Popen([sys.executable, "-c", script, temp], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN))  # fmt: skip
    address = head.stdout.readline().strip()
    try:
        if not address:
            pytest.skip("a Ray head with token authentication did not start here")
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_address_joins_a_cluster_with_token_auth_when_the_token_is_at_hand(auth_head: str, tmp_path: Path) -> None:
    """RAY_AUTH_MODE unset, the token in a file named by RAY_AUTH_TOKEN_PATH: Ray 2.60 alone refuses an explicit
    address after 20 s ("Failed to connect to Ray cluster"); init_ray turns token mode on and joins."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    code = (f"from avn_study.study.driver import init_ray; init_ray({auth_head!r}, connect_timeout_s=20); import ray; "
            "print('CPU', ray.cluster_resources().get('CPU'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_client_env(RAY_AUTH_TOKEN_PATH=str(token)))  # fmt: skip
    assert done.returncode == 0 and "CPU 1.0" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("token", ["wrong", "missing-file"])
def test_a_refused_token_is_exit_2_naming_the_address_and_the_variables(
    auth_head: str, token: str, sweep_cohort: Path, tmp_path: Path
) -> None:
    env = (_client_env(RAY_AUTH_TOKEN="f" * 32) if token == "wrong" else
           _client_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "nothing-here")))  # fmt: skip
    argv = _argv(tmp_path, sweep_cohort, "--address", auth_head)
    done = subprocess.run([sys.executable, "-m", "avn_study", *argv], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    expected = "refused this client's authentication token" if token == "wrong" else "RAY_AUTH_TOKEN_PATH is set"
    assert f"--address {auth_head}" in done.stderr and expected in done.stderr, done.stderr[-3000:]
    assert "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token" in done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    _no_study(tmp_path)


def test_a_tmpdir_that_cannot_hold_ray_is_exit_2_naming_it(no_ray, sweep_cohort: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    (tmp_path / "a-file").write_text("")
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "a-file" / "tmp"))  # we run as root: chmod would not stop us
    assert main(_argv(tmp_path, sweep_cohort, "--num-cpus", "1")) == 2
    err = capsys.readouterr().err
    assert f"TMPDIR={tmp_path / 'a-file' / 'tmp'}: is not a folder" in err and "set RAY_TMPDIR (or TMPDIR)" in err
    _no_study(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # RAY_TMPDIR wins over TMPDIR, as in Ray

    def full(path: object) -> shutil._ntuple_diskusage:
        return shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20)

    monkeypatch.setattr(shutil, "disk_usage", full)
    assert main(_argv(tmp_path, sweep_cohort, "--num-cpus", "1")) == 2
    err = capsys.readouterr().err
    assert f"RAY_TMPDIR={tmp_path}: only 1 MB free, a local Ray needs at least 100 MB" in err, err
    _no_study(tmp_path)


def test_a_cache_on_a_path_through_a_file_is_exit_2_naming_the_variable(
    sweep_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("AVN_STUDY_CACHE", str(tmp_path / "a-file" / "cache"))
    assert main(_argv(tmp_path, sweep_cohort)) == 2
    err = capsys.readouterr().err
    assert "the preprocessing cache cannot be written" in err and "AVN_STUDY_CACHE" in err, err
    _no_study(tmp_path)


def test_plan_prints_each_trials_resources(capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "ablation", "--data", "unused", "--storage", "unused", "--plan", "--allow-no-verdict"]) == 0
    assert "each trial: 4 CPU, 0.25 GPU\n" in capsys.readouterr().out
    assert main(["sweep", "ablation", "--data", "unused", "--storage", "unused", "--plan", "--allow-no-verdict",
                 "--gpus-per-trial", "0.5"]) == 0  # fmt: skip
    assert "each trial: 4 CPU, 0.5 GPU (--gpus-per-trial)" in capsys.readouterr().out
