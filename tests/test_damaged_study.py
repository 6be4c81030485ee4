"""A damaged study folder (issue 23): every file read back is checked, and what the toolkit then does.

Each case damages files of a COPY of a shared study (``smoke_experiment``: a finished fair ablation;
``nested_experiment``: a finished nested ablation with concurrent rows), asserts on the exit code and
the message, and checks that every other file of the copy is unchanged (by SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avn_study.cli.commands import main
from avn_study.study.check import (
    DamagedFile,
    check_journal,
    check_searcher_state,
    read_per_case,
    read_plan,
    read_results,
)


def _copy(study: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(study copy, its space file, its cohort): the copy lives in ``tmp_path/storage/NAME``."""
    copy = tmp_path / "storage" / study.name
    shutil.copytree(study, copy)
    return copy, study.parents[1] / "space.yaml", study.parents[1] / "cohort"


def _sums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _stage2_trials(experiment: Path) -> list[Path]:
    from avn_study.study.folder import merge_grid

    return [p.parent for p in sorted(experiment.glob("trial_*/params.json"))
            if merge_grid(json.loads(p.read_text())).get("_stage") == 2]  # fmt: skip


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a last line cut short (a full disk, a killed copy)


def _analyze(copy: Path, tmp_path: Path, capsys) -> tuple[int, str, str]:
    out = tmp_path / "analysis"  # outside the copy: analysing writes nothing into the study
    code = main(["analyze", str(copy), "--out", str(out)])
    return code, capsys.readouterr().err, (out / "summary.md").read_text()


def _sweep_resume(copy: Path, space: Path, cohort: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(cohort), "--storage",
           str(copy.parent), "--name", copy.name, "--resume", "--num-cpus", "2", "--quiet"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ analyze
def test_analyze_names_a_truncated_stage2_result(smoke_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, _, _ = _copy(smoke_experiment, tmp_path)
    trial = _stage2_trials(copy / "stage2")[1]
    _truncate(trial / "result.json")
    before = _sums(copy)
    code, err, summary = _analyze(copy, tmp_path, capsys)
    assert code == 0  # the rest is still readable: excluded, loudly
    assert f"stage2/{trial.name}" in err and "result.json: the last line is truncated" in err, err
    assert "1 damaged or missing trial(s) excluded" in summary.splitlines()[2]
    assert f"stage2/{trial.name}" in summary
    assert _sums(copy) == before


def test_analyze_names_a_deleted_stage2_trial(nested_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, _, _ = _copy(nested_experiment, tmp_path)
    trial = _stage2_trials(copy / "stages")[0]
    shutil.rmtree(trial)
    before = _sums(copy)
    code, err, summary = _analyze(copy, tmp_path, capsys)
    assert code == 0
    assert "no trial folder holds it" in err and f"stages/{trial.name}" in err and "stage2_plan.json" in err, err
    assert "1 damaged or missing trial(s) excluded" in summary.splitlines()[2]
    assert _sums(copy) == before


def test_analyze_names_a_damaged_per_case_file_and_plan(smoke_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, _, _ = _copy(smoke_experiment, tmp_path)
    trial = _stage2_trials(copy / "stage2")[0]
    last = sorted((trial / "per_case").glob("epoch_*.json"))[-1]
    last.write_text(json.dumps([{"dice": 0.5}]))  # records without their case and patient
    (copy / "stage2_plan.json").write_text('{"not": "a grid"}')
    before = _sums(copy)
    code, err, summary = _analyze(copy, tmp_path, capsys)
    assert code == 0
    assert f"{last.name}: record 0 lacks case, patient" in err, err
    assert "stage2_plan.json: a JSON dict, expected the stage-2 grid" in err
    assert "2 damaged or missing trial(s) excluded" in summary.splitlines()[2]
    assert _sums(copy) == before


# ------------------------------------------------------------------------------------------- resume
def _resume_repairs(copy: Path, space: Path, cohort: Path, holder: str) -> None:
    trials = _stage2_trials(copy / holder)
    damaged, deleted = trials[0], trials[1]
    _truncate(damaged / "result.json")
    shutil.rmtree(deleted)
    before = _sums(copy)
    done = _sweep_resume(copy, space, cohort)
    assert done.returncode == 0, done.stdout + done.stderr
    aside = damaged.with_name(f"{damaged.name}.damaged-0")
    assert f"set aside as {aside}" in done.stderr and "2 trial(s) of stage2_plan.json missing or damaged" in done.stderr
    after = _sums(copy)
    for name, digest in before.items():
        if name == "driver.log":
            continue  # appended to
        moved = name.replace(f"{holder}/{damaged.name}/", f"{holder}/{aside.name}/", 1)
        assert after.get(moved) == digest, f"{name} changed or went missing"
    repaired = _stage2_trials(copy / "stage2-repair-1")
    assert len(repaired) == 2
    from avn_study.analysis import load_experiment

    experiment = load_experiment(copy)
    assert experiment.damaged == []
    stage2 = experiment.trials[experiment.trials["stage"] == 2]
    assert (stage2["status"] == "TERMINATED").all() and len(stage2) == len(json.loads((copy / "stage2_plan.json")
                                                                                       .read_text()))  # fmt: skip
    assert sorted(set(stage2[stage2["experiment"] == "stage2-repair-1"]["trial_id"])) == sorted(
        t.name.removeprefix("trial_") for t in repaired
    )


def test_resume_reruns_a_damaged_and_a_deleted_stage2_trial(smoke_experiment: Path, tmp_path: Path) -> None:
    _resume_repairs(*_copy(smoke_experiment, tmp_path), holder="stage2")


def test_resume_reruns_them_in_the_concurrent_layout(nested_experiment: Path, tmp_path: Path) -> None:
    _resume_repairs(*_copy(nested_experiment, tmp_path), holder="stages")


def _refused(copy: Path, space: Path, cohort: Path, capsys) -> str:
    before = _sums(copy)
    code = main(["sweep", str(space), "--data", str(cohort), "--storage", str(copy.parent), "--name", copy.name,
                 "--resume", "--num-cpus", "2", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert _sums(copy) == before  # refused before Ray starts: nothing written, the lock released
    return err


def test_resume_refuses_a_garbage_searcher_state(smoke_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, space, cohort = _copy(smoke_experiment, tmp_path)
    state = sorted((copy / "stage1-unet").glob("searcher-state-*.pkl"))[-1]
    state.write_bytes(b"\x80\x04garbage" * 10)
    err = _refused(copy, space, cohort, capsys)
    assert f"{state}: not a complete pickle" in err and "--name" in err, err


def test_resume_refuses_a_garbage_or_incomplete_journal(nested_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, space, cohort = _copy(nested_experiment, tmp_path)
    journal = copy / "optuna.journal"
    good = journal.read_text()
    journal.write_text("garbage{{\n")
    err = _refused(copy, space, cohort, capsys)
    assert f"{journal}: line 1 is not an Optuna journal operation" in err and "--name" in err, err
    ops = [json.loads(line) for line in good.splitlines()]  # the journal of every search but the first
    first = next(op["study_name"] for op in ops if op["op_code"] == 0)
    journal.write_text("".join(json.dumps(op) + "\n" for op in ops if op.get("study_name") != first))
    err = _refused(copy, space, cohort, capsys)
    assert f"has no Optuna study {first}" in err, err
    state = sorted((copy / "stages").glob("searcher-state-*.pkl"))[-1]
    journal.write_text(good)
    state.write_text('{"started": ')  # RowSearch's JSON state, cut short
    err = _refused(copy, space, cohort, capsys)
    assert f"{state}: neither a pickle nor RowSearch's JSON state" in err, err


def test_resume_refuses_a_damaged_manifest(smoke_experiment: Path, tmp_path: Path, capsys) -> None:
    copy, space, cohort = _copy(smoke_experiment, tmp_path)
    _truncate(copy / "study.json")
    err = _refused(copy, space, cohort, capsys)
    assert f"{copy / 'study.json'}: not valid JSON" in err and "the study's manifest" in err, err


# ------------------------------------------------------------------------------------------- units
def test_the_readers_refuse_what_the_sweep_did_not_write(tmp_path: Path) -> None:
    results = tmp_path / "result.json"
    results.write_text('{"a": 1}\n{"a": 2')
    with pytest.raises(DamagedFile, match="the last line is truncated"):
        read_results(results)
    results.write_text('{"a": 1}\nnope\n{"a": 2}\n')
    with pytest.raises(DamagedFile, match="line 2 is not valid JSON"):
        read_results(results)
    results.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DamagedFile, match="line 2 is a list"):
        read_results(results)
    cases = tmp_path / "epoch_001.json"
    cases.write_text('{"case": "x"}')
    with pytest.raises(DamagedFile, match="expected a list of per-case records"):
        read_per_case(cases)
    (tmp_path / "stage2_plan.json").write_text('[{"_row": "unet", "fold": 1, "seed": "0", "_repeat": 0}]')
    with pytest.raises(DamagedFile, match="entry 0 is not a stage-2 trial"):
        read_plan(tmp_path)
    pickled = tmp_path / "searcher-state-x.pkl"
    import pickle

    pickled.write_bytes(pickle.dumps({"state": list(range(100))})[:-5])
    with pytest.raises(DamagedFile, match="not a complete pickle"):
        check_searcher_state(pickled)
    pickled.write_bytes(pickle.dumps({"state": 1}))
    check_searcher_state(pickled)  # whole: accepted (and never unpickled)
    with pytest.raises(DamagedFile, match="missing; expected Optuna's journal of 1 search"):
        check_journal(tmp_path / "optuna.journal", ["s"])
