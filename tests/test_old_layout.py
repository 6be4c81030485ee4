"""A study folder written before the package was split into stage subpackages (tests/fixtures/old_layout_study:
a finished smoke fair ablation with concurrent rows, made by commit 'Issue 24 (third part)') still resumes and
analyses: Ray pickled our searcher, scheduler and trial-name function by their old import paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from avn_study.analysis import analyze

FIXTURE = Path(__file__).parent / "fixtures" / "old_layout_study"


def test_an_old_layout_study_resumes_and_analyses(tmp_path: Path) -> None:
    from avn_study.data.phantom import PhantomConfig, write_cohort

    storage = tmp_path / "storage"
    shutil.copytree(FIXTURE, storage / "old-layout")
    cohort = write_cohort(tmp_path / "cohort", cases=6, seed=3, config=PhantomConfig.tiny())  # the same split
    pickled = (storage / "old-layout" / "stages" / "tuner.pkl").read_bytes()
    assert b"avn_study.search" in pickled or b"avn_study.sweep" in pickled  # the old import paths
    command = [sys.executable, "-m", "avn_study", "sweep", str(storage / "old-layout" / "space.yaml"), "--data",
               str(cohort), "--storage", str(storage), "--name", "old-layout", "--resume", "--num-cpus", "2",
               "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    analysis = analyze(storage / "old-layout", n_boot=100)
    assert set(analysis.ablation["row"]) == {"unet", "seg+recon+loc"}
    assert len(analysis.experiment.trials) == 8 and (analysis.experiment.trials["status"] == "TERMINATED").all()
    plan = json.loads((storage / "old-layout" / "stage2_plan.json").read_text())
    assert len(plan) == 4
