"""Launching a study (``avn_study.study.launch.run_study``) without Ray: the order of check, Ray, claim and
run, and SIGTERM stopping the study as Ctrl-C does. (A real driver stopped by SIGTERM: tests/test_resume.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from avn_study.study import driver
from avn_study.study.launch import run_study

HINT = "avn-study sweep smoke.yaml --resume"


class FakeStudy:
    """The parts of :class:`~avn_study.study.driver.Study` that ``run_study`` uses, recording the calls."""

    def __init__(self, run) -> None:
        self.space = SimpleNamespace(protocol="sweep", arms=["unet"])
        self.location, self.split_hash = "storage/smoke", "0123456789abcdef"
        self.stop_requested = threading.Event()
        self.calls: list[str] = []
        self._run = run

    def check(self, resume: bool) -> list[str]:
        self.calls.append("check")
        return ["case_000"]

    def claim(self, resume: bool, cases: list[str]) -> None:
        self.calls.append("claim")

    def run(self, resume: bool) -> object:
        self.calls.append("run")
        return self._run()

    def close(self) -> None:
        self.calls.append("close")


def _finish() -> str:
    return "the result"


def _sigterm() -> str:
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler preempting the driver
    time.sleep(10)  # the handler's SIGINT interrupts this
    raise AssertionError("SIGTERM did not stop the study")


def _ray_unreachable(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt  # what init_ray raises on Ctrl-C or SIGTERM while it waits for the cluster


CASES = [  # (init_ray, the study's run, result, calls, stop requested, stderr fragment)
    (None, _finish, "the result", ["check", "claim", "run", "close"], False, "running study storage/smoke"),
    (None, _sigterm, None, ["check", "claim", "run", "close"], True, f"interrupted; continue with: {HINT}"),
    (_ray_unreachable, _finish, None, ["check"], False, "waiting for Ray at host:6379; nothing was written"),
]


@pytest.fixture
def restored_signals():
    """SIGINT as Python's default (KeyboardInterrupt); both handlers put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(("init_ray", "run", "result", "calls", "stopped", "fragment"), CASES)
def test_run_study_checks_joins_claims_runs_and_stops_on_sigterm(
    init_ray, run, result, calls, stopped, fragment, monkeypatch, capsys, restored_signals
) -> None:
    monkeypatch.setattr(driver, "init_ray", init_ray or (lambda *args, **kwargs: None))
    study = FakeStudy(run)
    assert run_study(study, False, "host:6379", None, HINT) == result
    assert study.calls == calls and study.stop_requested.is_set() == stopped
    assert fragment in capsys.readouterr().err
