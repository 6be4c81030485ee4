"""Patient-level K-fold splits, frozen in ``splits.json`` with a hash that every trial records.

All cases of a patient land in the same fold, so no patient is ever in both the training and the
validation set of a fold. Stratification (on by default) deals patients with and without necrosis
round-robin over the folds so every fold validates on both kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avn_study.errors import DataError

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class Fold:
    train: tuple[str, ...]  # case ids, sorted
    val: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    k: int
    seed: int
    stratified: bool
    folds: tuple[Fold, ...]

    @property
    def hash(self) -> str:
        """sha256 of the fold assignment (not of k/seed: equal splits hash equally however made)."""
        payload = json.dumps([[list(f.train), list(f.val)] for f in self.folds])
        return hashlib.sha256(payload.encode()).hexdigest()

    def fold(self, index: int) -> Fold:
        if not 0 <= index < self.k:
            raise ValueError(f"fold must be in [0, {self.k - 1}], got {index=}")
        return self.folds[index]

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "seed": self.seed,
            "stratified": self.stratified,
            "hash": self.hash,
            "folds": [{"train": list(f.train), "val": list(f.val)} for f in self.folds],
        }


def make_splits(
    patients: dict[str, str],
    k: int = 5,
    seed: int = 0,
    has_necrosis: dict[str, bool] | None = None,
) -> Splits:
    """Assign patients to ``k`` folds.

    Args:
        patients: case id -> patient id.
        k: number of folds, 2 <= k <= number of patients.
        seed: permutation seed; equal inputs give equal splits.
        has_necrosis: case id -> whether the case contains necrosis; when given, a patient counts as
            positive if any of their cases is, and folds are stratified on that.

    Raises:
        ValueError: bad ``k`` for the number of patients.
    """
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case, patient in patients.items():
        by_patient[patient].append(case)
    n = len(by_patient)
    if not 2 <= k <= n:
        raise ValueError(f"k must be between 2 and the number of patients ({n}), got {k=}")
    rng = np.random.default_rng(seed)
    names = sorted(by_patient)
    if has_necrosis is None:
        groups = [names]
    else:
        positive = {p for p in names if any(has_necrosis.get(c, False) for c in by_patient[p])}
        groups = [[p for p in names if p in positive], [p for p in names if p not in positive]]
    fold_of: dict[str, int] = {}
    offset = 0
    for group in groups:
        for i, idx in enumerate(rng.permutation(len(group))):
            fold_of[group[idx]] = (offset + i) % k
        offset += len(group)  # continue round-robin so fold sizes stay balanced across groups
    folds = []
    for f in range(k):
        val = sorted(c for p in names if fold_of[p] == f for c in by_patient[p])
        train = sorted(c for p in names if fold_of[p] != f for c in by_patient[p])
        folds.append(Fold(tuple(train), tuple(val)))
    return Splits(k, seed, has_necrosis is not None, tuple(folds))


def write_splits(splits: Splits, path: str | Path) -> Path:
    """Write ``splits.json`` atomically (a concurrent reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(splits.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_splits(path: str | Path, cases: set[str] | None = None) -> Splits:
    """Read and check a ``splits.json``; with ``cases``, also check it covers exactly those cases.

    Raises:
        DataError: unreadable file, a hash that does not match the folds (edited by hand), overlapping
            folds or cases that differ from the cohort.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        folds = tuple(Fold(tuple(f["train"]), tuple(f["val"])) for f in raw["folds"])
        splits = Splits(int(raw["k"]), int(raw["seed"]), bool(raw["stratified"]), folds)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid splits file ({err})") from None
    if raw.get("hash") != splits.hash:
        raise DataError(
            f"{path}: hash {raw.get('hash')} does not match its folds ({splits.hash}); "
            "the file was edited: delete it to make a new split"
        )
    vals = [c for f in folds for c in f.val]
    if len(vals) != len(set(vals)) or len(folds) != splits.k:
        raise DataError(f"{path}: folds overlap or their number differs from k={splits.k}")
    if cases is not None and set(vals) != cases:
        missing, extra = sorted(cases - set(vals)), sorted(set(vals) - cases)
        raise DataError(
            f"{path}: does not match the cohort: missing cases {missing[:5]}, unknown cases {extra[:5]}; "
            "delete it to make a new split"
        )
    return splits


def load_or_create_splits(
    path: str | Path,
    patients: dict[str, str],
    has_necrosis: dict[str, bool] | None = None,
    k: int = 5,
    seed: int = 0,
) -> Splits:
    """Use the frozen ``splits.json`` at ``path`` if there is one, else make it and freeze it.

    Racing creators (trials starting together) compute the same split from the same inputs, so the
    atomic write makes whichever lands last harmless.

    Raises:
        DataError: an existing file that does not fit the cohort, or has another number of folds.
    """
    path = Path(path)
    if path.is_file():
        splits = read_splits(path, set(patients))
        if splits.k != k:
            raise DataError(
                f"{path}: holds {splits.k} folds but {k} were asked for; "
                "use the same number of folds or delete the file to re-split"
            )
        return splits
    splits = make_splits(patients, k, seed, has_necrosis)
    write_splits(splits, path)
    return splits
