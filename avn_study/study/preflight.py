"""Checks the driver makes before Ray starts, on the space, the cohort and (resuming) the study's manifest.

Each names what is wrong and where (the space file's key, the cohort's file), so a bad design or cohort
fails at once instead of inside a trial. They write nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avn_study.errors import DataError, UsageError
from avn_study.study.folder import (
    EXPERIMENT_STATE,
    MANIFEST,
    SEARCH_GEN_STATE,
    SEARCHER_STATE,
    SPACE_COPY,
    Stage1,
    trial_folders,
)
from avn_study.study.space import SearchSpace


def check_nnunet_rows(space: SearchSpace, cases: list[Any]) -> None:
    """nnU-Net rows: nnU-Net installed, and the labels they train on present, before Ray starts.

    Raises:
        UsageError: nnU-Net is not installed (:func:`~avn_study.baselines.nnunet.run.require_nnunet`).
        DataError: a row trains on femoral head labels the cohort does not have.
    """
    from avn_study.baselines.nnunet.run import NnUNetConfig, require_nnunet

    for row in (r for r in space.arms if r not in space.searched_rows):  # (in the declared order)
        where = f"{space.path}: arms.{row}"
        require_nnunet(where)
        cfg = NnUNetConfig.from_flat(space.trial_config(row), source=where)
        if cfg.labels == "with_head" and not all(c.has_head_labels for c in cases):
            raise DataError(f"{where}: nnunet_labels: with_head needs femoral head labels, which the cohort "
                            "does not have; use nnunet_labels: necrosis")  # fmt: skip


def check_head_labels(space: SearchSpace, cases: list[Any]) -> None:
    """A +loc row on a cohort without head labels: refused before Ray starts."""
    from avn_study.config import TrainConfig
    from avn_study.training.fold import require_head_labels

    for row in space.searched_rows:
        require_head_labels(TrainConfig.from_flat(space.trial_config(row)).model.arm, cases,
                            f"{space.path}: arms.{row}")  # fmt: skip


def check_unlabelled(space: SearchSpace, data: Path, cases: list[Any]) -> None:
    """Verify and cache imagesUnlabelled/ on the driver when a row will use it (a broken scan fails here,
    naming its file, not inside a trial)."""
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import arm_branches
    from avn_study.training.fold import usable_unlabelled

    for row in space.searched_rows:
        row_config = TrainConfig.from_flat(space.trial_config(row))
        if "recon" in arm_branches(row_config) and row_config.data.unlabelled_ratio > 0:
            usable_unlabelled(data, row_config, None, cases, cases)
            return


def check_manifest(root: Path, space: SearchSpace, split_hash: str) -> None:
    """Resuming: the study's manifest is whole and was written for this space and this split.

    Raises:
        DamagedFile: the manifest is not the study's (exit 2).
        UsageError: the space file or the cohort's split changed since the study started.
    """
    from avn_study.study.check import DamagedFile, read_json

    stored = read_json(root / MANIFEST, "the study's manifest")
    if not isinstance(stored, dict) or not {"space", "split_hash"} <= set(stored):
        raise DamagedFile(root / MANIFEST, "expected the study's manifest (a JSON object with space and "
                                           "split_hash)")  # fmt: skip
    if stored["space"] != space.raw:
        raise UsageError(f"--resume: {space.path} differs from the space this study was started with "
                         f"({root / SPACE_COPY}); resume with that file")  # fmt: skip
    if stored["split_hash"] != split_hash:
        raise UsageError(f"--resume: the cohort's split changed (hash {split_hash[:12]} vs "
                         f"{stored['split_hash'][:12]}); a resumed study must use the same split")  # fmt: skip


def check_search_files(space: SearchSpace, name: str, journal: Path, searches: list[tuple[Stage1, Path]],
                       pickles: bool = True) -> None:  # fmt: skip
    """Before a resume: every searcher state Ray would restore and Optuna's journal are whole, and the
    journal holds the Optuna study of every search that has trials (a garbage or missing one would
    make Ray or Optuna silently start that search again, past its budget).

    Args:
        space: the study's search space.
        name: the study's name (its searches' Optuna studies are named after it).
        journal: the study's Optuna journal.
        searches: every stage-1 search and the experiment folder holding its trials.
        pickles: whether Ray's pickled searcher states are at hand (an object store's mirror holds JSON only:
            they stay in the store, unchecked).

    Raises:
        DamagedFile: naming the file, what was expected and a way out (exit 2).
    """
    from avn_study.study.check import DamagedFile, check_journal, check_searcher_state

    if not space.search:
        return  # no searcher, no journal
    expected: list[str] = []
    for run, folder in searches:
        if not any(folder.glob(EXPERIMENT_STATE)):
            continue  # never saved: the search starts afresh (and its abandoned trials are set aside)
        if space.concurrent_rows or trial_folders(folder):
            expected.append(run.optuna_study(name))
    folders = {folder for _, folder in searches} if pickles else set()
    for folder in sorted(f for f in folders if any(f.glob(EXPERIMENT_STATE))):
        states = sorted(folder.glob(SEARCHER_STATE))
        if not states:
            raise DamagedFile(folder, f"has no {SEARCHER_STATE}, expected Ray's saved searcher next to its "
                                      "experiment state. Restore it from a copy, or start the study again "
                                      "under another --name")  # fmt: skip
        check_searcher_state(states[-1])
        for state in sorted(folder.glob(SEARCH_GEN_STATE))[-1:]:
            check_searcher_state(state)
    check_journal(journal, expected)
