"""concurrent_rows: every row's stage 1 in one Ray experiment, each with its own Optuna study and ASHA."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import small_space
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from avn_study.analysis import analyze
from avn_study.search import FinalValueOptunaSearch, RowScheduler, RowSearch, RowSearchRun
from avn_study.study_results import read_trials


def _trial(trial_id: str, run: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"_run": run})


def _asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="training_iteration", max_t=8, grace_period=1, reduction_factor=2)


def _rung_one(scheduler, trials_and_values) -> list[str]:
    scheduler.set_search_properties("val_dice", "max")
    decisions = []
    for trial, _ in trials_and_values:
        scheduler.on_trial_add(None, trial)
    for trial, value in trials_and_values:
        decisions.append(scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_dice": value}))
    return decisions


def test_asha_never_compares_trials_of_two_rows() -> None:
    """The weak row's first trial is stopped by the strong row's trials under one ASHA, not under one per row."""
    trials = [(_trial("a1", "stage1-seg"), 0.9), (_trial("a2", "stage1-seg"), 0.8), (_trial("b1", "stage1-unet"), 0.1)]
    shared = _rung_one(_asha(), trials)
    assert shared[-1] == TrialScheduler.STOP  # the comparison RowScheduler exists to prevent
    per_row = _rung_one(RowScheduler(_asha), trials)
    assert per_row[-1] == TrialScheduler.CONTINUE  # alone in its row's rung


def _row_search(budget: int = 2) -> tuple[RowSearch, dict[str, FinalValueOptunaSearch]]:
    lr = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    subs = {key: FinalValueOptunaSearch(lr, metric="val_dice", mode="max", epochs=2, study_name=key,
                                        sampler=optuna.samplers.RandomSampler(seed=0))
            for key in ("stage1-unet", "stage1-seg-loc")}  # fmt: skip
    runs = {
        key: RowSearchRun({"arm": key.removeprefix("stage1-"), "fold": 0}, sub, budget) for key, sub in subs.items()
    }
    return RowSearch(runs, metric="val_dice", mode="max"), subs


def test_row_search_hands_out_trials_round_robin_and_routes_results(tmp_path: Path) -> None:
    search, subs = _row_search()
    configs = [search.suggest(f"t{i}") for i in range(4)]
    assert [c["_run"] for c in configs] == ["stage1-unet", "stage1-seg-loc"] * 2  # every row starts at once
    assert [c["arm"] for c in configs] == ["unet", "seg-loc"] * 2 and all("lr" in c for c in configs)
    assert search.suggest("t4") == Searcher.FINISHED
    search.on_trial_complete("t1", {"val_dice": 0.5, "training_iteration": 2})
    done = {key: [t.state.name for t in sub._ot_study.trials] for key, sub in subs.items()}
    assert done == {"stage1-unet": ["RUNNING", "RUNNING"], "stage1-seg-loc": ["COMPLETE", "RUNNING"]}

    search.save(str(tmp_path / "state.pkl"))
    restored, _ = _row_search()
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t5") == Searcher.FINISHED  # the budgets were spent before the save


def test_optuna_search_skips_epochs_without_the_metric() -> None:
    """eval_every > 1: epochs without an evaluation report no val_dice; Optuna sees only evaluated epochs."""
    search, subs = _row_search()
    search.suggest("t0")
    search.on_trial_result("t0", {"loss": 0.3, "training_iteration": 1})  # used to raise KeyError
    search.on_trial_result("t0", {"val_dice": 0.4, "training_iteration": 2})
    search.on_trial_complete("t0", {"val_dice": 0.4, "training_iteration": 2})
    trial = subs["stage1-unet"]._ot_study.trials[0]
    assert trial.intermediate_values == {2: 0.4} and trial.value == 0.4


def test_concurrent_rows_choose_what_sequential_rows_choose(
    sweep_cohort: Path, smoke_experiment: Path, tmp_path: Path
) -> None:
    """Same Optuna studies, same sampler seeds: the same configurations per row, in one experiment. The
    sequential reference is the session's smoke study (the same space, run row after row; its seeds only
    change stage 2)."""
    cmd = [sys.executable, "-m", "avn_study", "sweep", "--data", str(sweep_cohort), "--num-cpus", "2", "--quiet"]

    def lrs(root: Path, folder: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for trial in read_trials(root / folder):
            out.setdefault(trial.config["_row"], []).append(trial.config["lr"])
        return {row: sorted(v) for row, v in out.items()}

    studies = {False: smoke_experiment}
    space = small_space(tmp_path, concurrent_rows=True)
    storage = tmp_path / "storage"
    done = subprocess.run([*cmd[:4], str(space), *cmd[4:], "--storage", str(storage)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    studies[True] = storage / "smoke"
    sequential = {row: v for folder in ("stage1-unet", "stage1-seg-recon-loc")
                  for row, v in lrs(studies[False], folder).items()}  # fmt: skip
    assert lrs(studies[True], "stage1") == sequential
    assert not list(studies[True].glob("stage1-*"))  # one experiment
    stage2 = read_trials(studies[True] / "stage2")
    assert len(stage2) == 4 and all(t.status == "TERMINATED" for t in stage2)
    plans = [json.loads((s / "stage2_plan.json").read_text()) for s in studies.values()]
    chosen = [{(g["_row"], g["fold"]): g["lr"] for g in plan} for plan in plans]
    assert chosen[0].keys() == chosen[1].keys()
    result = analyze(studies[True], n_boot=100)
    assert set(result.ablation["row"]) == {"unet", "seg+recon+loc"}


def test_a_killed_concurrent_stage1_resumes_without_rerunning(sweep_cohort: Path, tmp_path: Path) -> None:
    space = small_space(tmp_path, concurrent_rows=True)
    root = tmp_path / "storage" / "smoke" / "stage1"
    cmd = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(sweep_cohort),
           "--storage", str(tmp_path / "storage"), "--num-cpus", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300

    def finished() -> dict[str, str]:  # trials with both epochs reported
        return {f.parent.name: f.read_text() for f in root.glob("trial_*/result.json")
                if len(f.read_text().splitlines()) >= 2}  # fmt: skip

    while not finished():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no stage-1 trial finished in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = finished()
    assert all(after[name] == text for name, text in before.items())  # neither re-run nor lost
    stage1 = read_trials(root)
    assert len(stage1) == 4 and sorted(t.config["_run"] for t in stage1) == sorted(
        ["stage1-unet", "stage1-seg-recon-loc"] * 2
    )


def test_concurrent_rows_must_be_a_boolean(tmp_path: Path) -> None:
    from avn_study.errors import UsageError
    from avn_study.space import load_space

    with pytest.raises(UsageError, match="concurrent_rows: must be true or false, got 'yes please'"):
        load_space(small_space(tmp_path, concurrent_rows="yes please"))
