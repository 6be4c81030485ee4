"""Launching a study from a command: check, join Ray, claim, run, release; stop cleanly on SIGTERM.

``avn-study sweep`` and ``avn-study demo`` share this order. It matters: everything that can be refused
(a bad ``--resume``, a live driver, a broken cohort, an unreachable cluster) is refused before the study
writes a file, and a scheduler's SIGTERM ends the study the way Ctrl-C does, with the ``--resume`` command.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avn_study.study.driver import Study
    from avn_study.study.results import StudyResult


def run_study(study: Study, resume: bool, address: str | None, num_cpus: int | None, resume_hint: str,
              connect_timeout: float | None = None) -> StudyResult | None:  # fmt: skip
    """What ``sweep`` and ``demo`` share: check everything before Ray starts, start (or join) Ray, then
    take the study's lock and write its files, stop cleanly on SIGTERM, run the stages, release the study.
    Returns the result, or None when interrupted (having said how to continue)."""
    from avn_study.study.driver import init_ray

    cases = study.check(resume=resume)  # bad --resume/--name, a live driver, broken cohorts: nothing written
    try:
        init_ray(address, num_cpus, connect_timeout_s=connect_timeout)  # unreachable, refused: no study files
    except KeyboardInterrupt:
        print(f"interrupted while waiting for Ray{f' at {address}' if address else ''}; nothing was written",
              file=sys.stderr)  # fmt: skip
        return None
    study.claim(resume=resume, cases=cases)  # only now the lock and study.json (a racing driver: refused)
    space = study.space
    try:
        _stop_on_sigterm(study)  # after ray.init, which installs its own SIGTERM handler
        print(f"{'resuming' if resume else 'running'} study {study.location} ({space.protocol}, rows: "
              f"{', '.join(space.arms)}; split {study.split_hash[:12]})", file=sys.stderr)  # fmt: skip
        return study.run(resume=resume)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: {resume_hint}", file=sys.stderr)
        return None
    finally:
        study.close()


def _stop_on_sigterm(study: Study) -> None:
    """Let SIGTERM (a scheduler preempting the driver) stop a sweep the way Ctrl-C does.

    It takes Ray Tune's graceful Ctrl-C path and also marks the study, so a stop that Tune does not see
    (its trials had just finished, or it was still setting up) still ends the study with exit 130.
    """

    def handler(*_: object) -> None:
        study.stop_requested.set()
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)
