"""Checks the driver makes before Ray starts, on the space, the cohort and (resuming) the study's manifest.

Each names what is wrong and where (the space file's key, the cohort's file), so a bad design or cohort
fails at once instead of inside a trial. They write nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avn_study.errors import DataError, UsageError
from avn_study.study.folder import MANIFEST, SPACE_COPY
from avn_study.study.space import SearchSpace


def check_nnunet_rows(space: SearchSpace, cases: list[Any]) -> None:
    """nnU-Net rows: nnU-Net installed, and the labels they train on present, before Ray starts.

    Raises:
        UsageError: nnU-Net is not installed (:func:`~avn_study.baselines.nnunet.run.require_nnunet`).
        DataError: a row trains on femoral head labels the cohort does not have.
    """
    from avn_study.baselines.nnunet.run import NnUNetConfig, require_nnunet

    for row in set(space.arms) - set(space.searched_rows):
        where = f"{space.path}: arms.{row}"
        require_nnunet(where)
        cfg = NnUNetConfig.from_flat(space.trial_config(row), source=where)
        if cfg.labels == "with_head" and not all(c.has_head_labels for c in cases):
            raise DataError(f"{where}: nnunet_labels: with_head needs femoral head labels, which the cohort "
                            "does not have; use nnunet_labels: necrosis")  # fmt: skip


def check_head_labels(space: SearchSpace, cases: list[Any]) -> None:
    """A +loc row on a cohort without head labels: refused before Ray starts."""
    from avn_study.config import TrainConfig
    from avn_study.training.engine import require_head_labels

    for row in space.searched_rows:
        require_head_labels(TrainConfig.from_flat(space.trial_config(row)).model.arm, cases,
                            f"{space.path}: arms.{row}")  # fmt: skip


def check_unlabelled(space: SearchSpace, data: Path, cases: list[Any]) -> None:
    """Verify and cache imagesUnlabelled/ on the driver when a row will use it (a broken scan fails here,
    naming its file, not inside a trial)."""
    from avn_study.config import TrainConfig
    from avn_study.training.engine import arm_branches, usable_unlabelled

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
