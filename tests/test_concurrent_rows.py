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
from avn_study.study.results import read_trials
from avn_study.study.search import FinalValueOptunaSearch, FollowUp, RowScheduler, RowSearch, RowSearchRun


def _trial(trial_id: str, run: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"_run": run})


def _span(trial_dir: Path) -> tuple[float, float]:
    """A trial's start and end, from Ray's result timestamps."""
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]
    return results[0]["timestamp"] - results[0]["time_this_iter_s"], results[-1]["timestamp"]


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
    # stage-2 trials in the same experiment run to the end, whatever their values
    stage2 = [(SimpleNamespace(trial_id=f"s{i}", config={"_stage": 2}), v) for i, v in enumerate([0.9, 0.8, 0.1])]
    assert _rung_one(RowScheduler(_asha), stage2) == [TrialScheduler.CONTINUE] * 3


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


def _study_search(budget: int = 2) -> RowSearch:
    """Two searches of 2 trials, each followed by 2 stage-2 trials; one nnU-Net-like trial ready at once."""
    search, subs = _row_search(budget)
    grid = [{"fold": f, "seed": 0, "_stage": 2} for f in (1, 2)]
    follow_ups = {key: FollowUp([{**g, "_row": key} for g in grid]) for key in subs}
    return RowSearch(search._runs, metric="val_dice", mode="max", follow_ups=follow_ups,
                     ready=[{"arm": "nnunet_2d", "_stage": 2}])  # fmt: skip


def test_a_search_hands_out_its_stage2_once_its_own_trials_have_ended(tmp_path: Path) -> None:
    search = _study_search()
    first = [search.suggest(f"t{i}") for i in range(4)]  # stage 1 first, every search at once
    assert [c["_run"] for c in first] == ["stage1-unet", "stage1-seg-loc"] * 2
    assert search.suggest("n0")["arm"] == "nnunet_2d"  # waits for nothing
    assert search.suggest("w0") is None  # nothing released yet: wait, do not finish
    search.on_trial_complete("t0", None, error=True)  # unet: an errored trial is never the choice
    search.save(str(tmp_path / "state.json"))
    restored = _study_search()
    restored.restore(str(tmp_path / "state.json"))
    for s in (search, restored):
        assert s.suggest("w1") is None  # both searches still run
        s.on_trial_complete("t1", {"val_dice": 0.3, "training_iteration": 2})
        # seg-loc: t3, stopped by ASHA at epoch 1, loses to t1, which ran every epoch, despite its value
        s.on_trial_complete("t3", {"val_dice": 0.9, "training_iteration": 1})
        s.on_trial_complete("t3", {"val_dice": 0.9, "training_iteration": 1})  # (a repeat changes nothing)
        released = [s.suggest(f"u{i}") for i in range(2)]
        assert [(c["_row"], c["fold"], c["_selected_trial"], c["_selected_in"]) for c in released] == [
            ("stage1-seg-loc", fold, "t1", "stage1-seg-loc") for fold in (1, 2)]  # fmt: skip
        assert released[0]["lr"] == first[1]["lr"] and released[0]["arm"] == "seg-loc" and "_run" not in released[0]
        assert s.suggest("w2") is None  # unet's stage 2 still waits for its search
        s.on_trial_complete("t2", {"val_dice": 0.2, "training_iteration": 2})
        assert [s.suggest(f"v{i}")["_selected_trial"] for i in range(2)] == ["t2", "t2"]
        assert s.suggest("end") == Searcher.FINISHED
    search.on_trial_complete("never-handed-out", {"val_dice": 1.0})  # ignored


def test_a_search_without_a_finished_trial_releases_nothing_and_the_study_ends() -> None:
    search = _study_search(budget=1)
    assert [search.suggest(f"t{i}")["_run"] for i in range(2)] == ["stage1-unet", "stage1-seg-loc"]
    assert search.suggest("n0")["_stage"] == 2
    search.on_trial_complete("t0", None, error=True)
    search.on_trial_complete("t1", {"val_dice": float("nan"), "training_iteration": 2})
    assert search.suggest("x") == Searcher.FINISHED  # the driver then names both rows (Study.select)


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
            if trial.stage == 1:
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
    assert lrs(studies[True], "stages") == sequential
    assert [p.name for p in studies[True].glob("stage*") if p.is_dir()] == ["stages"]  # one experiment
    trials = read_trials(studies[True] / "stages")
    stage2 = [t for t in trials if t.stage == 2]
    assert len(stage2) == 4 and all(t.status == "TERMINATED" for t in stage2)
    # a row's stage 2 started as soon as its own search had chosen, not when every search had
    times = {t.trial_id: _span(Path(t.path)) for t in trials}
    for row in ("unet", "seg+recon+loc"):
        searched = max(times[t.trial_id][1] for t in trials if t.stage == 1 and t.row == row)
        started = min(times[t.trial_id][0] for t in stage2 if t.row == row)
        assert started >= searched - 1.5  # (Ray's result timestamps are whole seconds)
    plans = [json.loads((s / "stage2_plan.json").read_text()) for s in studies.values()]

    # the plan, written in the study's folder after the run, is what stage 2 ran (trial for trial)
    def key(entry: dict) -> tuple:
        return entry["_row"], entry["fold"], entry["seed"], entry["_repeat"]

    ran = sorted(({k: v for k, v in t.config.items() if k != "_avn"} for t in stage2), key=key)
    assert sorted(plans[1], key=key) == ran
    chosen = [{(g["_row"], g["fold"]): g["lr"] for g in plan} for plan in plans]
    assert chosen[0].keys() == chosen[1].keys()
    result = analyze(studies[True], n_boot=100)
    assert set(result.ablation["row"]) == {"unet", "seg+recon+loc"}


def test_a_killed_concurrent_stage1_resumes_without_rerunning(sweep_cohort: Path, tmp_path: Path) -> None:
    space = small_space(tmp_path, concurrent_rows=True)
    root = tmp_path / "storage" / "smoke" / "stages"
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
    trials = read_trials(root)
    stage1 = [t for t in trials if t.stage == 1]
    assert len(stage1) == 4 and sorted(t.config["_run"] for t in stage1) == sorted(
        ["stage1-unet", "stage1-seg-recon-loc"] * 2
    )
    assert sorted(t.row for t in trials if t.stage == 2 and t.status == "TERMINATED") == sorted(
        ["unet", "seg+recon+loc"] * 2
    )


def test_concurrent_rows_must_be_a_boolean(tmp_path: Path) -> None:
    from avn_study.errors import UsageError
    from avn_study.study.space import load_space

    with pytest.raises(UsageError, match="concurrent_rows: must be true or false, got 'yes please'"):
        load_space(small_space(tmp_path, concurrent_rows="yes please"))


def test_a_study_from_before_both_stages_shared_one_experiment_resumes_in_its_layout(
    sweep_cohort: Path, tmp_path: Path, ray_2cpus
) -> None:
    """Concurrent studies used to run stage 1 in ``stage1/`` and stage 2 after it in ``stage2/``; one
    interrupted between the two finishes that way, without a ``stages/`` experiment."""
    from avn_study.study.driver import Study
    from avn_study.study.folder import STAGE1_ALL
    from avn_study.study.space import load_space

    space = load_space(small_space(tmp_path, concurrent_rows=True, trials=1, seeds=[0]))
    old = Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False)
    old.prepare(resume=False)
    old._run_shared(STAGE1_ALL, with_stage2=False, resume=False)  # what the driver used to run first
    old.close()
    resumed = Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False)
    resumed.prepare(resume=True)
    resumed.run(resume=True)
    root = tmp_path / "storage" / "smoke"
    assert sorted(p.name for p in root.glob("stage*") if p.is_dir()) == ["stage1", "stage2"]
    stage2 = read_trials(root / "stage2")
    assert len(stage2) == 4 and all(t.status == "TERMINATED" for t in stage2)
    chosen = {t.trial_id for t in read_trials(root / "stage1")}
    assert {t.config["_selected_trial"] for t in stage2} <= chosen
    assert set(analyze(root, n_boot=50).ablation["row"]) == {"unet", "seg+recon+loc"}


def test_sweep_plan_says_how_the_study_is_scheduled(tmp_path: Path) -> None:
    from avn_study.cli.commands import _plan_text
    from avn_study.study.space import load_space

    concurrent = _plan_text(load_space(small_space(tmp_path, concurrent_rows=True))).splitlines()
    assert "scheduling: one Ray experiment, every search at once, each row's stage 2 as soon as its search " \
           "has chosen" in concurrent  # fmt: skip
    sequential = _plan_text(load_space(small_space(tmp_path, protocol="sweep"))).splitlines()
    assert "scheduling: one search after another (concurrent_rows: true keeps a cluster fuller)" in sequential
