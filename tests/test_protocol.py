"""The fair-ablation protocol as plain functions (avn_study.study.protocol), tested without Ray or a study folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import small_space

from avn_study.data.splits import Fold, Splits, make_splits
from avn_study.errors import AvnError, UsageError
from avn_study.study import protocol
from avn_study.study.folder import ERROR, TERMINATED, Stage1
from avn_study.study.results import Selected, TrialOutcome
from avn_study.study.space import SearchSpace, load_space
from avn_study.vocabulary import DAMAGED

ROWS = ["unet", "seg+recon+loc"]  # the rows of search_spaces/smoke.yaml


def _space(tmp_path: Path, **changes: object) -> SearchSpace:
    return load_space(small_space(tmp_path, **changes))


def _trial(trial_id: str, metric: float | None, epochs: int = 2, status: str = TERMINATED, stage: int = 1,
           **config: object) -> TrialOutcome:  # fmt: skip
    return TrialOutcome(trial_id, "unet", stage, status, f"/nowhere/{trial_id}", metric, epochs,
                        {"lr": 1e-3, "_row": "unet", "_stage": stage, **config})  # fmt: skip


def _splits() -> Splits:
    """Three folds of six cases, two per patient (P0..P2), by hand."""
    folds = (Fold(("c2", "c3", "c4", "c5"), ("c0", "c1")), Fold(("c0", "c1", "c4", "c5"), ("c2", "c3")),
             Fold(("c0", "c1", "c2", "c3"), ("c4", "c5")))  # fmt: skip
    return Splits(3, 0, False, folds)


PATIENTS = {f"c{i}": f"P{i // 2}" for i in range(6)}


# ----------------------------------------------------------------------------------------------- stage 1
STAGE1_CASES = [  # (space changes, the searches as (row, outer, seed, fold))
    ({}, [(r, None, None, None) for r in ROWS]),
    ({"protocol": "sweep"}, [(r, None, None, None) for r in ROWS]),
    ({"protocol": "sweep", "search_per_seed": True, "seeds": [0, 1]}, [(r, None, None, None) for r in ROWS]),
    ({"protocol": "nested_ablation", "folds": [0, 2], "inner_folds": 2},
     [("unet", 0, None, None), ("seg+recon+loc", 0, None, None), ("unet", 2, None, None),
      ("seg+recon+loc", 2, None, None)]),
    ({"search_per_seed": True, "seeds": [0, 1]},
     [(r, None, s, f) for f in (1, 2) for r in ROWS for s in (0, 1)]),
    ({"protocol": "nested_ablation", "folds": [0, 2], "inner_folds": 2, "search_per_seed": True, "seeds": [5]},
     [(r, k, 5, None) for k in (0, 2) for r in ROWS]),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "expected"), STAGE1_CASES)
def test_stage1_runs_per_protocol(tmp_path: Path, changes: dict, expected: list[tuple]) -> None:
    runs = protocol.stage1_runs(_space(tmp_path, **changes))
    assert [(r.row, r.outer, r.seed, r.fold) for r in runs] == expected


def test_stage1_config_validates_on_the_tuning_fold(tmp_path: Path) -> None:
    space = _space(tmp_path, tuning_fold=0, sampler_seed=7)
    config = protocol.stage1_config(space, Stage1("seg+recon+loc"))
    assert (config["fold"], config["seed"], config["_row"], config["_stage"]) == (0, 7, "seg+recon+loc", 1)
    assert config["arm"] == "seg+recon+loc" and config["epochs"] == 2
    assert "inner_fold" not in config


def test_stage1_config_of_a_nested_search_validates_inside_its_outer_fold(tmp_path: Path) -> None:
    space = _space(tmp_path, protocol="nested_ablation", folds=[0, 2], inner_folds=2, tuning_fold=1)
    config = protocol.stage1_config(space, Stage1("unet", outer=2))
    assert (config["fold"], config["inner_fold"], config["n_inner_folds"]) == (2, 1, 2)


def test_stage1_config_of_a_search_per_seed_has_a_seed_of_its_own(tmp_path: Path) -> None:
    space = _space(tmp_path, search_per_seed=True, seeds=[0, 1])
    seeds = {protocol.stage1_config(space, run)["seed"] for run in protocol.stage1_runs(space)}
    assert len(seeds) == len(protocol.stage1_runs(space)) == 8  # rows x folds x seeds, none shared


# ----------------------------------------------------------------------------------------------- select
def test_select_takes_the_best_trial_of_its_own_search_that_ran_to_the_end() -> None:
    run = Stage1("unet")
    trials = [
        _trial("t0", 0.6, lr=1e-3),
        _trial("t1", 0.7, lr=2e-3, _sample=1),
        _trial("t2", 0.9, epochs=1, lr=3e-3),  # stopped by ASHA: competes only if none ran to the end
        _trial("t3", 0.95, status=ERROR, lr=4e-3),
        _trial("t4", 0.99, status=DAMAGED, lr=5e-3),
        _trial("t5", 0.99, stage=2),
        _trial("t6", 0.99, _run="stage1-other"),  # another search's trial in a shared folder
    ]
    chosen = protocol.select(run, trials, "max", "val_dice", "stage1-unet")
    assert chosen == Selected({"lr": 2e-3}, "t1", "stage1-unet")


def test_select_in_min_mode_and_among_stopped_trials_when_none_finished() -> None:
    trials = [_trial("t0", 0.3, epochs=1), _trial("t1", 0.1, epochs=1), _trial("t2", 0.2, epochs=1)]
    assert protocol.select(Stage1("unet"), trials, "min", "loss", "x").trial_id == "t1"


def test_select_without_a_finished_trial_names_the_row_and_the_folder() -> None:
    trials = [_trial("t0", None), _trial("t1", 0.9, status=ERROR)]
    with pytest.raises(AvnError, match="stage 1 of row 'unet' has no finished trial with a val_dice; see STUDY/x"):
        protocol.select(Stage1("unet"), trials, "max", "val_dice", "STUDY/x")


def test_an_unchosen_row_keeps_its_one_configuration_from_no_search(tmp_path: Path) -> None:
    space = _space(tmp_path)
    assert protocol.unchosen(space, "unet") == Selected(space.trial_config("unet"), None, None)


# ----------------------------------------------------------------------------------------------- stage 2
REPLICATE_CASES = [  # (the search, (folds, seeds) it chooses for, with folds [1, 2] and seeds [0, 1])
    (Stage1("unet"), ([1, 2], [0, 1])),
    (Stage1("unet", outer=2), ([2], [0, 1])),
    (Stage1("unet", seed=1, fold=2), ([2], [1])),
    (Stage1("unet", outer=1, seed=0), ([1], [0])),
]


@pytest.mark.parametrize(("run", "expected"), REPLICATE_CASES)
def test_replicate_of(tmp_path: Path, run: Stage1, expected: tuple) -> None:
    assert protocol.replicate_of(_space(tmp_path, seeds=[0, 1]), run) == expected


def test_stage2_entries_cover_folds_seeds_and_repeats_and_record_the_choice(tmp_path: Path) -> None:
    space = _space(tmp_path, seeds=[0, 1], repeats=2)
    chosen = Selected({"lr": 2e-3}, "t1", "stage1-unet")
    entries = protocol.stage2_entries(space, "unet", [1, 2], chosen)
    assert [(e["fold"], e["seed"], e["_repeat"], e["_replicate"]) for e in entries] == [
        (f, s + 10_007 * r, r, s) for f in (1, 2) for s in (0, 1) for r in (0, 1)]  # fmt: skip
    # the record is a reference to the search, never a patient list (the same size whatever the cohort)
    assert {(e["lr"], e["_selected_trial"], e["_selected_in"]) for e in entries} == {(2e-3, "t1", "stage1-unet")}
    assert not any("_selected_on" in e for e in entries)
    assert {(e["_row"], e["_stage"], e["inner_fold"]) for e in entries} == {("unet", 2, -1)}


def test_stage2_entries_before_the_choice_carry_no_parameters_and_no_record(tmp_path: Path) -> None:
    (entry,) = protocol.stage2_entries(_space(tmp_path), "unet", [1], seeds=[3])
    assert entry == {"fold": 1, "inner_fold": -1, "seed": 3, "_row": "unet", "_stage": 2, "_repeat": 0,
                     "_replicate": 3}  # fmt: skip


def test_a_search_per_seed_seeds_its_stage2_runs_itself(tmp_path: Path) -> None:
    space = _space(tmp_path, search_per_seed=True, seeds=[0, 1])
    run = Stage1("unet", seed=1, fold=2)
    (entry,) = protocol.run_entries(space, run)
    assert (entry["fold"], entry["_replicate"]) == (2, 1)
    assert entry["seed"] == run.replicate_seed(1, "stage2") != 1


def test_stage2_grid_trains_each_searchs_choice_on_its_folds_row_by_row(tmp_path: Path) -> None:
    space = _space(tmp_path, search_per_seed=True, seeds=[0, 1])
    asked: list[str] = []

    def choose(run: Stage1) -> Selected:
        asked.append(run.experiment)
        return Selected({"lr": float(len(asked))}, f"t{len(asked)}", run.experiment)

    grid = protocol.stage2_grid(space, choose)
    assert sorted(asked) == sorted(r.experiment for r in protocol.stage1_runs(space))
    assert [e["_row"] for e in grid] == ["unet"] * 4 + ["seg+recon+loc"] * 4  # row by row
    for entry in grid:  # each entry trains the choice of the search of its own fold and seed
        run = Stage1(entry["_row"], seed=entry["_replicate"], fold=entry["fold"])
        assert entry["_selected_in"] == run.experiment


def test_stage2_grid_runs_a_row_without_a_search_on_every_fold_and_chooses_nothing_for_it(tmp_path: Path) -> None:
    space = _space(tmp_path)
    space = dataclasses.replace(space, arms={**space.arms, "nnunet_2d": {"arm": "nnunet_2d"}})
    grid = protocol.stage2_grid(space, lambda run: Selected({"lr": 1e-3}, "t", run.experiment))
    nnunet = [e for e in grid if e["_row"] == "nnunet_2d"]
    assert [e["fold"] for e in nnunet] == [1, 2]
    assert {(e["arm"], e["_selected_trial"], e["_selected_in"]) for e in nnunet} == {("nnunet_2d", None, None)}


# ----------------------------------------------------------------------------------------------- tuning sets
def _cases(necrotic: set[int], n: int = 6) -> list[SimpleNamespace]:
    return [SimpleNamespace(case_id=f"c{i}", patient_id=f"P{i}", has_necrosis=i in necrotic) for i in range(n)]


def test_a_tuning_fold_without_necrosis_is_refused_for_val_dice(tmp_path: Path) -> None:
    space = _space(tmp_path, tuning_fold=1, folds=[0, 2])  # fold 1 validates on c2, c3
    with pytest.raises(UsageError, match=r"tuning fold 1 has no case with necrosis, so val_dice .* has 1 case"):
        protocol.check_tuning_sets(space, _splits(), _cases({0}))
    protocol.check_tuning_sets(space, _splits(), _cases({3}))  # one necrotic case on it is enough


def test_a_metric_defined_on_every_case_needs_no_necrosis(tmp_path: Path) -> None:
    space = _space(tmp_path, tuning_fold=1, folds=[0, 2], metric="val_dice_all")
    protocol.check_tuning_sets(space, _splits(), _cases(set()))


def test_nested_tuning_sets_are_the_inner_folds_of_each_outer_fold(tmp_path: Path) -> None:
    space = _space(tmp_path, protocol="nested_ablation", folds=[0, 2], inner_folds=2, tuning_fold=0)
    cases = _cases({0, 1, 2, 3, 4, 5}, n=9)
    splits = make_splits({c.case_id: c.patient_id for c in cases}, k=3, seed=0)
    sets = protocol.tuning_sets(space, splits, cases)
    assert list(sets) == ["inner fold 0 of outer fold 0", "inner fold 0 of outer fold 2"]
    for k, val in zip((0, 2), sets.values(), strict=True):
        assert val and set(val) <= set(splits.fold(k).train)  # never the outer fold's reported patients
    inner = protocol.inner_folds(space, splits, cases)
    assert [inner[k].fold(0).val for k in (0, 2)] == list(sets.values())


def test_too_many_inner_folds_for_the_cohort_is_a_usage_error_naming_the_space(tmp_path: Path) -> None:
    # checked before Ray starts, through the tuning sets of a metric that needs necrosis
    space = _space(tmp_path, protocol="nested_ablation", folds=[0, 2], inner_folds=5, tuning_fold=0)
    with pytest.raises(UsageError, match=rf"{space.path}: inner_folds: "):
        protocol.check_tuning_sets(space, _splits(), _cases({0, 1, 2, 3, 4, 5}))
