"""The fair-ablation protocol as plain functions of the search space, the split and read trial records.

What a study runs and what each run rests on, without Ray, Optuna or the study folder: the stage-1
searches (:func:`stage1_runs`) and the configuration each one's trials share (:func:`stage1_config`);
the one rule by which a search's trials choose a configuration (:func:`select`) and the record a
stage-2 trial keeps of it (:func:`selection_record`); the stage-2 runs trained from a choice (:func:`replicate_of`,
:func:`stage2_entries`, :func:`stage2_grid`); and the tuning sets on which the tuning metric must be
defined (:func:`check_tuning_sets`). :class:`~avn_study.study.driver.Study` feeds them what it read and
runs what they return.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avn_study.errors import AvnError, UsageError
from avn_study.study.folder import TERMINATED, Stage1
from avn_study.study.results import Selected, TrialOutcome, best_trial
from avn_study.study.space import ABLATIONS, SearchSpace

if TYPE_CHECKING:
    from avn_study.data.splits import Splits

# tuning metrics undefined on a validation set without a case with necrosis (val_dice_all is defined on all)
NEEDS_NECROSIS = ("val_dice", "lesion_sensitivity")
REPEAT_SEED_STEP = 10_007  # repeat r of seed s trains with seed s + r * this: repeats add seeds beyond the listed


# ----------------------------------------------------------------------------------------------- stage 1
def stage1_runs(space: SearchSpace) -> list[Stage1]:
    """The stage-1 searches in the order they run: per row, per outer fold for nested_ablation, and
    with ``search_per_seed`` per seed (and, in a fair ablation, per reported fold)."""
    rows = space.searched_rows  # nnU-Net rows configure themselves: stage 2 only
    per_seed = space.search_per_seed and space.protocol in ABLATIONS
    seeds: list[int | None] = list(space.seeds) if per_seed else [None]
    if space.protocol == "nested_ablation":
        return [Stage1(row, outer, seed) for outer in space.folds for row in rows for seed in seeds]
    if per_seed:
        return [Stage1(row, None, seed, fold) for fold in space.folds for row in rows for seed in seeds]
    return [Stage1(row) for row in rows]


def stage1_config(space: SearchSpace, run: Stage1) -> dict[str, Any]:
    """What every trial of the search ``run`` shares: its row's flat config on its validation fold (the
    tuning fold, or for nested_ablation the tuning inner fold of its outer fold), and its row and stage."""
    seed = run.replicate_seed(space.sampler_seed, "stage1")
    if run.outer is None:
        flat = space.trial_config(run.row, fold=space.tuning_fold, seed=seed)
    else:  # nested: validate on an inner fold of the outer fold's training patients
        inner = {"inner_fold": space.tuning_fold, "n_inner_folds": space.inner_folds}
        flat = space.trial_config(run.row, fold=run.outer, seed=seed, **inner)
    return {**flat, "_row": run.row, "_stage": 1}


def select(run: Stage1, trials: list[TrialOutcome], mode: str, metric: str, where: Path | str) -> Selected:
    """The configuration the search ``run`` chose among ``trials`` (the rule of
    :func:`~avn_study.study.results.best_trial`).

    Args:
        run: the search.
        trials: the trials of its experiment folder (a shared folder also holds other searches' and
            stage 2's: only stage-1 trials of ``run`` count).
        mode: ``max`` or ``min``.
        metric: the tuning metric (for the message).
        where: the experiment folder (for the message).

    Raises:
        AvnError: no trial of ``run`` finished with a value of ``metric``.
    """
    mine = [o for o in trials if o.stage == 1 and o.config.get("_run", run.experiment) == run.experiment]
    best = best_trial([(o.trial_id, o.metric, o.epochs, o.order) for o in mine if o.status == TERMINATED], mode)
    if best is None:
        raise AvnError(f"stage 1 of row '{run.row}' has no finished trial with a {metric}; see {where}")
    chosen = next(o for o in mine if o.trial_id == best)
    config = {k: v for k, v in chosen.config.items() if not k.startswith("_")}
    return Selected(config, best, run.experiment)


def unchosen(space: SearchSpace, row: str) -> Selected:
    """A row that chooses nothing (nnU-Net configures itself): its one configuration, from no search."""
    return Selected(space.trial_config(row), None, None)


# ----------------------------------------------------------------------------------------------- stage 2
def selection_record(trial_id: str | None, search: str | None) -> dict[str, Any]:
    """What a stage-2 trial records of the choice it trains: the search (``_selected_in``: its stage-1
    experiment, or its ``_run`` in a shared one) and the trial chosen there (``_selected_trial``). A
    reference, not a patient list: the patients it was selected on are those the search's trials validated
    on, which the analysis reads from their per-case records (``Experiment.selection``), so a trial's
    parameters stay the same size whatever the cohort. Trials of older studies carry the list
    (``_selected_on``); the analysis reads it as it is."""
    return {"_selected_trial": trial_id, "_selected_in": search}


def replicate_of(space: SearchSpace, run: Stage1) -> tuple[list[int], list[int]]:
    """(folds, seeds) of the stage-2 runs trained from ``run``'s choice."""
    if run.outer is not None:
        folds = [run.outer]
    elif run.fold is not None:
        folds = [run.fold]
    else:
        folds = list(space.folds)
    return folds, list(space.seeds) if run.seed is None else [run.seed]


def stage2_entries(space: SearchSpace, row: str, folds: list[int], chosen: Selected | None = None,
                   seeds: list[int] | None = None, run: Stage1 | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Stage 2 of ``row`` on ``folds``: every seed and repeat of ``chosen`` (None: the parameters and
    the record of what they rest on are added once the row's search has chosen). ``run``: the search
    whose choice it is; with ``search_per_seed`` it seeds its runs itself (:meth:`Stage1.replicate_seed`)."""
    config = chosen.config if chosen is not None else {}
    record = {} if chosen is None else selection_record(chosen.trial_id, chosen.experiment)
    entries = []
    for fold in folds:
        for seed in space.seeds if seeds is None else seeds:
            for repeat in range(space.repeats):
                run_seed = seed + REPEAT_SEED_STEP * repeat
                if run is not None and run.seed is not None:
                    run_seed = run.replicate_seed(run_seed, "stage2")
                entries.append({**config, "fold": fold, "inner_fold": -1, "seed": run_seed, "_row": row,
                                "_stage": 2, "_repeat": repeat, "_replicate": seed, **record})  # fmt: skip
    return entries


def run_entries(space: SearchSpace, run: Stage1, chosen: Selected | None = None) -> list[dict[str, Any]]:
    """The stage-2 entries trained from the search ``run``'s choice (on its :func:`replicate_of`)."""
    folds, seeds = replicate_of(space, run)
    return stage2_entries(space, run.row, folds, chosen, seeds=seeds, run=run)


def stage2_grid(space: SearchSpace, choose: Callable[[Stage1], Selected]) -> list[dict[str, Any]]:
    """Every stage-2 trial, row by row: each search's choice (``choose``: the search -> its
    :class:`Selected`) on its folds x seeds x repeats; a row that searches nothing on every fold."""
    grid: list[dict[str, Any]] = []
    runs = stage1_runs(space)
    for row in space.arms:
        if row not in space.searched_rows:
            grid += stage2_entries(space, row, space.folds, unchosen(space, row))
            continue
        for run in (r for r in runs if r.row == row):
            grid += run_entries(space, run, choose(run))
    return grid


# ----------------------------------------------------------------------------------------------- tuning sets
def inner_folds(space: SearchSpace, splits: Splits, cases: list[Any]) -> dict[int, Splits]:
    """nested_ablation: the inner split of every outer fold's training patients.

    Raises:
        UsageError: an outer fold has fewer training patients than ``inner_folds`` (naming the space file).
    """
    from avn_study.data.splits import inner_splits

    patients = {c.case_id: c.patient_id for c in cases}
    necrosis = {c.case_id: c.has_necrosis for c in cases}
    try:
        return {k: inner_splits(splits, k, patients, necrosis, space.inner_folds) for k in space.folds}
    except ValueError as err:
        raise UsageError(f"{space.path}: inner_folds: {err}") from None


def tuning_sets(space: SearchSpace, splits: Splits, cases: list[Any]) -> dict[str, tuple[str, ...]]:
    """The validation sets stage 1 tunes on, by name (``tuning fold K``, or per outer fold for nested_ablation)."""
    if space.protocol == "nested_ablation":
        return {f"inner fold {space.tuning_fold} of outer fold {k}": inner.fold(space.tuning_fold).val
                for k, inner in inner_folds(space, splits, cases).items()}  # fmt: skip
    return {f"tuning fold {space.tuning_fold}": splits.fold(space.tuning_fold).val}


def check_tuning_sets(space: SearchSpace, splits: Splits, cases: list[Any]) -> None:
    """Refuse, before Ray starts, a tuning validation set on which the tuning metric is undefined.

    Raises:
        UsageError: a tuning set without a case with necrosis, for a metric that needs one.
    """
    if space.metric not in NEEDS_NECROSIS:
        return  # defined on every validation set
    necrotic = {c.case_id for c in cases if c.has_necrosis}
    for name, val in tuning_sets(space, splits, cases).items():
        if not necrotic & set(val):
            raise UsageError(
                f"{space.path}: {name} has no case with necrosis, so {space.metric} (the tuning "
                f"metric) is undefined on it: the cohort has {len(necrotic)} case(s) with necrosis; use fewer "
                "folds, another split seed, or a metric defined on every case (val_dice_all)"
            )
