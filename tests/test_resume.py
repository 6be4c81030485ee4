"""Interrupting the sweep driver and resuming: finished trials are kept, not re-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_space

from avn_study.analysis import analyze
from avn_study.study.results import read_trials


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.glob("stage1-unet/*/result.json")}


def test_interrupted_driver_resumes_without_rerunning(sweep_cohort: Path, tmp_path: Path) -> None:
    """SIGTERM between two searches: the driver stops gracefully, the study is analysable as it stands, and
    ``--resume`` finishes it. (A SIGKILLed driver, which releases nothing and saves nothing more, is
    resumed in tests/test_concurrent_rows.py.)"""
    how = signal.SIGTERM
    space = small_space(tmp_path, trials=1)  # one trial per search: the interrupt and resume are what is tested
    storage, root = tmp_path / "storage", tmp_path / "storage" / "smoke"
    cmd = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(sweep_cohort),
           "--storage", str(storage), "--num-cpus", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (root / "stage1-seg-recon-loc").exists():  # stage 1 of the first row has finished
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the sweep did not reach its second row in time"
        time.sleep(0.2)
    proc.send_signal(how)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130 and "--resume" in output, output
    finished = _snapshot(root)
    assert len(finished) == 1
    partial = analyze(root, n_boot=100)  # the interrupted study is analysable as it stands
    assert "unet" in set(partial.ablation["row"]) and any("did not finish" in w or "stage 2" in w
                                                          for w in partial.warnings)  # fmt: skip

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _snapshot(root) == finished  # neither re-run nor lost
    assert len(read_trials(root / "stage1-seg-recon-loc")) == 1
    stage2 = read_trials(root / "stage2")
    assert len(stage2) == 4 and all(o.status == "TERMINATED" and o.epochs == 2 for o in stage2)


def test_resume_needs_an_existing_study(sweep_cohort: Path, tmp_path: Path) -> None:
    from avn_study.cli.commands import main

    space = small_space(tmp_path)
    assert main(["sweep", str(space), "--data", str(sweep_cohort), "--storage", str(tmp_path), "--resume"]) == 2


def test_a_storage_uri_pyarrow_cannot_open_is_a_usage_error(sweep_cohort: Path, tmp_path: Path, capsys) -> None:
    from avn_study.cli.commands import main

    space = small_space(tmp_path)
    assert main(["sweep", str(space), "--data", str(sweep_cohort), "--storage", "nosuch://bucket/studies"]) == 2
    err = capsys.readouterr().err
    assert "nosuch://bucket/studies" in err and "pyarrow" in err


def test_a_stop_request_ends_the_study_before_the_next_run(sweep_cohort: Path, tmp_path: Path) -> None:
    """SIGTERM marks the study; a run that Ray Tune finished anyway must not be followed by another."""
    from avn_study.study.driver import Study, StudyInterrupted
    from avn_study.study.space import load_space

    study = Study(load_space(small_space(tmp_path)), sweep_cohort, str(tmp_path / "storage"), progress=False)
    study.stop_requested.set()
    started = []
    with pytest.raises(StudyInterrupted, match="asked to stop"):
        study._fit("stage1-unet", lambda: started.append(1), {}, resume=False)
    assert not started and not (study.root / "stage1-unet").exists()
