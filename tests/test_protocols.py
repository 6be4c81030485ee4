"""What a reported number rests on: the disjointness audit on real smoke studies of both ablation protocols.

docs/architecture.md ("Protocol rules"): a patient whose metrics enter an ablation table must not have been in
any validation set
used to choose that row's configuration. Each stage-2 trial records the search its configuration was
selected in (``_selected_in``, ``_selected_trial``: a reference, not a patient list); these tests check the
patients the analysis resolves it to against the study's own files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from avn_study.analysis import analyze, load_experiment
from avn_study.cli.commands import main
from avn_study.data.splits import read_nested, read_splits
from avn_study.study.folder import merge_grid, stage_folders


def _patients(path: Path) -> set[str]:
    return {str(case["patient"]) for case in json.loads(path.read_text())}


def _trials(root: Path) -> list[tuple[Path, dict]]:
    """Every trial folder of a study with its parameters (stage 2's grid entry merged in)."""
    return [(p.parent, merge_grid(json.loads(p.read_text()))) for d in stage_folders(root)
            for p in sorted(d.glob("*/params.json"))]  # fmt: skip


def _search_files(root: Path, experiment: str, pattern: str) -> list[Path]:
    """Files of one stage-1 search's trials: its own experiment folder, or (concurrent_rows) its trials
    in the shared one, told apart by ``_run``."""
    if (root / experiment).is_dir():
        return sorted((root / experiment).glob(f"*/{pattern}"))
    trials = [t for t, params in _trials(root) if params.get("_run") == experiment]
    return sorted(f for t in trials for f in t.glob(pattern))


def _stage2(root: Path) -> list[tuple[Path, dict]]:
    return [(t, params) for t, params in _trials(root) if params.get("_stage") == 2]


def _trial_id(trial_dir: Path) -> str:
    return str(json.loads((trial_dir / "result.json").read_text().splitlines()[-1])["trial_id"])


def audit(root: Path) -> int:
    """Every stage-2 trial: the patients the analysis finds its configuration was selected on are exactly
    the validation patients of the stage-1 search it records, and none of them is among those it reports.
    Returns the number of trials audited."""
    trials = _stage2(root)
    assert trials
    experiment = load_experiment(root)
    for trial_dir, grid in trials:
        assert "_selected_on" not in grid  # a reference to the search, not a patient list
        selected = set(experiment.selection[_trial_id(trial_dir)])
        searched = grid["_selected_in"]  # the search (its own experiment, or its trials in the shared one)
        validated = set().union(*(_patients(f) for f in _search_files(root, searched, "per_case/epoch_*.json")))
        assert selected == validated and selected, trial_dir  # the record is what the search looked at
        assert grid["_selected_trial"] in {json.loads(p.read_text().splitlines()[-1])["trial_id"]
                                           for p in _search_files(root, searched, "result.json")}  # fmt: skip
        files = [f for f in (trial_dir / "per_case").glob("*epoch_*.json") if not f.name.startswith("calibration")]
        reported = set().union(*(_patients(f) for f in files))
        assert reported and not reported & selected, (trial_dir, reported & selected)
    # and the analysis reports exactly those trials' cases, none of a selection patient
    for frame in (experiment.evaluation_cases(), experiment.evaluation_test_cases()):
        for t, p in zip(frame.get("trial_id", []), frame.get("patient", []), strict=True):
            assert str(p) not in experiment.selection[str(t)]
    assert experiment.excluded().empty
    return len(trials)


def test_fair_ablation_reports_no_patient_of_the_tuning_fold(smoke_experiment: Path) -> None:
    assert audit(smoke_experiment) == 8
    manifest = json.loads((smoke_experiment / "study.json").read_text())
    splits = read_splits(smoke_experiment / "splits.json")  # the study's frozen copy
    assert splits.hash == manifest["split_hash"]
    assert not (Path(manifest["data"]) / "splits.json").exists()  # the cohort's folder was never written
    tuning = {c.split("_")[0] for c in splits.fold(0).val}
    cases = load_experiment(smoke_experiment).evaluation_cases()
    assert set(cases["fold"]) == {1, 2} and not {str(c) for c in cases["case"]} & set(splits.fold(0).val)
    assert tuning  # fold 0 exists and is simply never reported


def test_nested_ablation_reports_every_patient_by_models_tuned_without_them(nested_experiment: Path) -> None:
    root = nested_experiment
    assert audit(root) == 2 * 3 * 2  # rows x outer folds x seeds
    manifest = json.loads((root / "study.json").read_text())
    splits = read_splits(Path(manifest["data"]) / "splits.json")  # frozen by `avn-study split` (a test set)
    assert read_splits(root / "splits.json") == splits  # and copied into the study
    assert splits.test and manifest["test_cases"] == len(splits.test)
    for outer in range(3):
        inner = read_nested(root / "nested_splits.json", splits, outer)  # frozen, hashed, checked
        outer_val = set(splits.fold(outer).val)
        for row in ("unet", "seg-recon-loc"):
            for per_case in _search_files(root, f"stage1-{row}-outer{outer}", "per_case/epoch_*.json"):
                cases = {str(c["case"]) for c in json.loads(per_case.read_text())}
                assert cases <= set(inner.fold(0).val) and not cases & outer_val  # tuned inside the outer fold
                assert not cases & set(splits.test)
    cases = load_experiment(root).evaluation_cases()
    in_folds = {c for f in splits.folds for c in f.val}
    for row in ("unet", "seg+recon+loc"):  # every non-test case, once per seed, for every row
        mine = cases[cases["row"] == row]
        assert set(mine["case"]) == in_folds and mine.groupby("case").size().eq(2).all()
    # the held-out test set: scored once by every stage-2 model, never validated on
    tests = load_experiment(root).evaluation_test_cases()
    assert set(tests["case"]) == set(splits.test) and tests["trial_id"].nunique() == 12


def test_asha_stopped_trials_are_pruned_in_optuna(nested_experiment: Path) -> None:
    root = nested_experiment
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    manifest = json.loads((root / "study.json").read_text())
    stopped = complete = 0
    for search in manifest["stage1"]:
        study = optuna.load_study(study_name=search["optuna_study"], storage=storage)
        epochs = [len(p.read_text().splitlines()) for p in _search_files(root, search["experiment"], "result.json")]
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.COMPLETE) == epochs.count(2)  # ran every epoch
        assert states.count(optuna.trial.TrialState.PRUNED) == epochs.count(1)  # stopped by ASHA after 1
        pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
        assert all(t.intermediate_values[1] == t.value for t in pruned)  # its value at the stopping epoch
        stopped, complete = stopped + epochs.count(1), complete + epochs.count(2)
    assert complete > 0


def test_nested_report_says_what_it_is_and_scores_the_test_set(nested_experiment: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert main(["analyze", str(nested_experiment), "--out", str(tmp_path / "a")]) == 0
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "**Protocol: nested cross-validation**" in summary and "inner fold 0 of 2" in summary
    assert "## Held-out test set" in summary and "**Held-out test set:** 2 patients" in summary
    assert "both must reject" in summary and "## Questions" in summary  # the method, the questions
    assert "seg+recon+loc vs unet:" in summary  # the question's contrast, in words
    assert (tmp_path / "a" / "test_cases.csv").is_file() and (tmp_path / "a" / "test_comparison.csv").is_file()
    analysis = analyze(nested_experiment, n_boot=200)
    # a search per row, outer fold and seed: 6 replicates per row, C(4, 2)^3 labellings within the outer folds
    assert analysis.comparison["n_replicates_row"].iloc[0] == 6 and analysis.comparison["p_replicates"].notna().all()
    assert analysis.comparison["p_replicates_min"].iloc[0] == pytest.approx(2 / 6**3)
    stage2 = analysis.experiment.trials.query("stage == 2")
    assert stage2.groupby(["row", "fold"])["unit"].nunique().eq(2).all()  # each seed its own search
    # export: a row is scored over all its outer folds; the bundle says why
    assert main(["export", str(nested_experiment), "--out", str(tmp_path / "bundle")]) == 0
    metrics = json.loads((tmp_path / "bundle" / "metrics.json").read_text())
    assert metrics["configuration"]["n"] == 6 and any("nested_ablation" in n for n in metrics["notes"])


def test_a_study_from_before_the_rule_has_its_tuning_patients_excluded(smoke_experiment: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """An older fair ablation re-trained on the tuning fold too and recorded no selection: analysis
    derives the selection from stage 1 and leaves those patients out, saying so."""
    root = Path(shutil.copytree(smoke_experiment, tmp_path / "old"))
    tuning_patients = set().union(*(_patients(f) for f in root.glob("stage1-unet/*/per_case/epoch_*.json")))
    for trial_dir, _ in _stage2(root):
        params = json.loads((trial_dir / "params.json").read_text())
        for key in ("_selected_in", "_selected_trial"):
            params["grid"].pop(key)
        (trial_dir / "params.json").write_text(json.dumps(params))
    # as if the trial had also evaluated a tuning-fold patient
    trial_dir = next(t for t, g in _stage2(root) if g["_row"] == "unet")
    final = sorted((trial_dir / "per_case").glob("epoch_*.json"))[-1]
    leaked = json.loads(next(root.glob("stage1-unet/*/per_case/epoch_*.json")).read_text())[0]
    final.write_text(json.dumps([*json.loads(final.read_text()), leaked]))
    analysis = analyze(root, n_boot=100)
    excluded = analysis.experiment.excluded().set_index("row")
    assert excluded.loc["unet", "n_patients"] == 1 and leaked["patient"] in tuning_patients
    assert leaked["patient"] not in set(analysis.experiment.evaluation_cases()["patient"])
    assert any("patients excluded from the statistics" in w for w in analysis.warnings)


def test_a_nested_study_freezes_its_inner_folds_and_resume_checks_them(sweep_cohort: Path, tmp_path: Path) -> None:
    from conftest import small_space

    from avn_study.errors import AvnError
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    space = load_space(small_space(tmp_path, protocol="nested_ablation", folds=[0, 2], inner_folds=2))
    study = Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False)
    study.prepare(resume=False)
    frozen = json.loads((study.root / "nested_splits.json").read_text())
    assert sorted(frozen["inner"]) == ["0", "2"] and frozen["outer_hash"] == study.split_hash
    manifest = json.loads((study.root / "study.json").read_text())
    assert [(s["row"], s["outer"]) for s in manifest["stage1"]] == [
        ("unet", 0), ("seg+recon+loc", 0), ("unet", 2), ("seg+recon+loc", 2)]  # fmt: skip
    names = {s["optuna_study"] for s in manifest["stage1"]}
    assert names == {f"smoke-{r}-outer{k}" for r in ("unet", "seg-recon-loc") for k in (0, 2)}
    before = (study.root / "nested_splits.json").read_bytes()
    Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False).prepare(resume=True)
    assert (study.root / "nested_splits.json").read_bytes() == before  # checked, not re-made
    frozen["inner"]["2"]["folds"][0]["val"].pop()
    (study.root / "nested_splits.json").write_text(json.dumps(frozen))
    with pytest.raises(AvnError, match="inner folds of outer fold 2 were edited"):
        Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False).prepare(resume=True)


def test_a_tuning_set_without_necrosis_is_refused_before_ray_starts(tmp_path: Path) -> None:
    from conftest import small_space, write_toy_case

    from avn_study.data.layout import write_dataset_json
    from avn_study.errors import UsageError
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    cohort = tmp_path / "toy"
    for i in range(6):  # one patient with necrosis: some tuning set must lack it
        write_toy_case(cohort, f"toy_{i:03d}", i, necrosis=i == 0)
    write_dataset_json(cohort, {f"toy_{i:03d}": f"P{i}" for i in range(6)})
    cases = {  # the seeded split puts toy_000 in fold 0: outer fold 0 trains on no necrosis at all
        "nested_ablation": ({"inner_folds": 2, "folds": [0, 1, 2]}, "inner fold 0 of outer fold 0"),
        "fair_ablation": ({"tuning_fold": 1, "folds": [0, 2]}, "tuning fold 1"),
    }
    for protocol, (extra, where) in cases.items():
        space = load_space(small_space(tmp_path, protocol=protocol, **extra))
        study = Study(space, cohort, str(tmp_path / protocol), progress=False)
        with pytest.raises(UsageError, match=f"{where} has no case with necrosis, so val_dice"):
            study.prepare(resume=False)
        assert not (tmp_path / protocol).exists()  # nothing written
    assert not (cohort / "splits.json").exists()  # the cohort's folder is never written


def test_an_older_sweeps_patient_list_is_read_as_it_is(smoke_experiment: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(smoke_experiment, tmp_path / "old"))
    trial_dir = next(t for t, g in _stage2(root) if g["_row"] == "unet")
    reported = sorted(_patients(sorted((trial_dir / "per_case").glob("epoch_*.json"))[-1]))
    params = json.loads((trial_dir / "params.json").read_text())
    params["grid"]["_selected_on"] = ["P-elsewhere", reported[0]]  # the list wins over the search's reference
    (trial_dir / "params.json").write_text(json.dumps(params))
    experiment = load_experiment(root)
    assert experiment.selection[_trial_id(trial_dir)] == frozenset({"P-elsewhere", reported[0]})
    cases = experiment.evaluation_cases()
    assert reported[0] not in set(cases[cases["trial_id"].astype(str) == _trial_id(trial_dir)]["patient"])
