"""A run's fold data: the cohort verified and cached, its frozen split, and the cases of one fold.

:func:`prepare_data` is where a run starts: it returns the :class:`RunData` (training, validation, test and
unlabelled cases, and the split and cohort identities every result records) that
:class:`~avn_study.training.run.TrainingRun` trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avn_study.config import TrainConfig
from avn_study.data.cache import CachedCase, build_cache, cohort_fingerprint
from avn_study.data.layout import DATASET_JSON, open_cohort
from avn_study.data.preprocess import PreprocessConfig
from avn_study.data.splits import NESTED_FILE, Splits, check_inner, inner_splits, resolve_splits
from avn_study.errors import AvnError, DataError
from avn_study.models.runtime import arm_branches
from avn_study.vocabulary import ARMS


@dataclass(frozen=True)
class RunData:
    """The cases of one fold and the identities every result records."""

    train: list[CachedCase]
    val: list[CachedCase]
    split_hash: str
    data_fingerprint: str
    test: list[CachedCase] = field(default_factory=list)  # the split's held-out test set (in no fold)
    inner_split_hash: str = ""  # nested CV: the hash of the inner folds ``val`` comes from
    unlabelled: list[CachedCase] = field(default_factory=list)  # scans without labels: reconstruction only

    @property
    def channels(self) -> list[str]:
        """The cohort's input channel names (``channel_names`` of its dataset.json)."""
        return list(self.train[0].meta.get("channel_names", ["T1"] * self.train[0].n_channels))

    @property
    def val_patients(self) -> list[str]:
        return sorted({c.patient_id for c in self.val})


def cohort_split(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None = None,
    splits_path: str | Path | None = None,
    frozen: dict[str, Any] | None = None,
) -> tuple[list[CachedCase], Splits]:
    """Verify and cache the cohort, and find its patient-level split (see
    :func:`~avn_study.data.splits.resolve_splits`: never written into the cohort's folder unasked)."""
    cohort = open_cohort(data_root)
    cases = build_cache(cohort, PreprocessConfig(inplane_spacing_mm=config.data.inplane_spacing_mm), cache_dir)
    splits = resolve_splits(
        data_root,
        {c.case_id: c.patient_id for c in cases},
        {c.case_id: c.has_necrosis for c in cases},
        config.data.n_folds,
        config.data.split_seed,
        splits_path=splits_path,
        frozen=frozen,
        cache_dir=cache_dir,
    )
    return cases, splits


def require_head_labels(arm: str, cases: Sequence[CachedCase], where: str) -> None:
    """Refuse an arm with a localisation branch on a cohort without femoral head labels.

    Raises:
        DataError: names the arm, the missing label role and how to declare it.
    """
    if "loc" in ARMS[arm].branches and not all(c.has_head_labels for c in cases):
        raise DataError(
            f"{where}: arm '{arm}' has a localisation branch, whose target is the femoral head, but the cohort "
            f"labels no femoral head ({DATASET_JSON} has no 'femoral_head' label and avn_roles.femoral_head is not "
            "set); run the arms without 'loc' (unet, seg, seg+recon) or add head labels"
        )


def prepare_data(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None = None,
    splits_path: str | Path | None = None,
    inner: dict[str, Any] | None = None,
    frozen: dict[str, Any] | None = None,
) -> RunData:
    """Cache the cohort, freeze (or read) the split, pick the fold (see :func:`cohort_split`).

    With ``config.data.inner_fold >= 0`` (nested cross-validation) the run trains and validates
    inside the outer fold's training patients: on the frozen inner splits ``inner`` (a study passes
    its ``nested_splits.json`` entry for the outer fold), else on
    :func:`~avn_study.data.splits.inner_splits` made now, which gives the same folds.
    """
    cases, splits = cohort_split(data_root, config, cache_dir, splits_path, frozen)
    require_head_labels(config.model.arm, cases, str(data_root))
    fold, inner_hash = splits.fold(config.data.fold), ""
    if config.data.inner_fold >= 0:
        if inner is not None:
            folds = check_inner(inner, splits, config.data.fold, f"the study's {NESTED_FILE}")
        else:
            patients = {c.case_id: c.patient_id for c in cases}
            necrosis = {c.case_id: c.has_necrosis for c in cases}
            try:
                folds = inner_splits(splits, config.data.fold, patients, necrosis, k=config.data.n_inner_folds)
            except ValueError as err:
                raise DataError(f"n_inner_folds={config.data.n_inner_folds}: {err}") from None
        if folds.k != config.data.n_inner_folds:
            raise AvnError(f"the frozen inner split has {folds.k} folds, but n_inner_folds={config.data.n_inner_folds}")
        fold, inner_hash = folds.fold(config.data.inner_fold), folds.hash
    by_id = {c.case_id: c for c in cases}
    train = [by_id[c] for c in fold.train]
    unlabelled = []
    if "recon" in arm_branches(config) and config.data.unlabelled_ratio > 0:
        unlabelled = usable_unlabelled(data_root, config, cache_dir, train, cases)
    return RunData(
        train,
        [by_id[c] for c in fold.val],
        splits.hash,
        cohort_fingerprint(cases),
        [by_id[c] for c in splits.test],
        inner_hash,
        unlabelled,
    )


def usable_unlabelled(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None,
    train: list[CachedCase],
    labelled: list[CachedCase],
) -> list[CachedCase]:
    """The cohort's unlabelled scans a run may train its reconstruction on: those of its training
    patients and of patients with no labelled scan, never one of a patient it validates or tests on."""
    from avn_study.data.cache import build_unlabelled_cache
    from avn_study.data.layout import UNLABELLED_DIR

    if not (Path(data_root) / UNLABELLED_DIR).is_dir():
        return []
    cohort = open_cohort(data_root)
    scans = build_unlabelled_cache(
        cohort, PreprocessConfig(inplane_spacing_mm=config.data.inplane_spacing_mm), cache_dir
    )
    held_out = {c.patient_id for c in labelled} - {c.patient_id for c in train}
    return [c for c in scans if c.patient_id not in held_out]
