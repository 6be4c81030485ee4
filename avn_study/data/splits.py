"""Patient-level K-fold splits, frozen in ``splits.json`` with a hash that every trial records.

All cases of a patient land in the same fold, so no patient is ever in both the training and the
validation set of a fold. Stratification (on by default) deals patients with and without necrosis
round-robin over the folds so every fold validates on both kinds.

An optional held-out **test set** (``avn-study split --test-fraction F``) is drawn first, by patient
and stratified by necrosis; its cases are in no fold, so they never enter tuning or cross-validation.
**Inner splits** (nested cross-validation) divide the training patients of one outer fold the same
way (:func:`inner_splits`); a study freezes them in its own folder (:func:`write_nested`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avn_study.errors import DataError

SPLITS_FILE = "splits.json"  # a frozen split: in a data folder (DATA/splits.json) and in a study folder
NESTED_FILE = "nested_splits.json"  # a nested study's frozen inner splits (in the study folder)


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
    test: tuple[str, ...] = ()  # held-out case ids, sorted; in no fold

    @property
    def hash(self) -> str:
        """sha256 of the fold assignment and the test set (not of k/seed: equal splits hash equally
        however made; a split without a test set hashes as it did before test sets existed)."""
        folds: list = [[list(f.train), list(f.val)] for f in self.folds]
        payload = json.dumps([*folds, ["test", list(self.test)]] if self.test else folds)
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
            "test": list(self.test),
        }


def _by_patient(patients: dict[str, str]) -> dict[str, list[str]]:
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case, patient in patients.items():
        by_patient[patient].append(case)
    return by_patient


def _strata(
    names: list[str], by_patient: dict[str, list[str]], has_necrosis: dict[str, bool] | None
) -> list[list[str]]:
    """Patients grouped for stratification: [with necrosis, without] (one group when not stratified)."""
    if has_necrosis is None:
        return [names]
    positive = {p for p in names if any(has_necrosis.get(c, False) for c in by_patient[p])}
    return [[p for p in names if p in positive], [p for p in names if p not in positive]]


def _test_patients(names: list[str], by_patient: dict[str, list[str]], has_necrosis: dict[str, bool] | None,
                   fraction: float, seed: int) -> set[str]:  # fmt: skip
    """``fraction`` of the patients (rounded, per stratum), drawn with their own random stream."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {fraction=}")
    if fraction == 0:
        return set()
    import numpy as np  # (here: the study folder's format imports this module's file names, standard library only)

    rng = np.random.default_rng([seed, 1])  # not the folds' stream: the folds of the rest stay reproducible
    chosen: set[str] = set()
    for group in _strata(names, by_patient, has_necrosis):
        take = round(fraction * len(group))
        chosen.update(group[i] for i in rng.permutation(len(group))[:take])
    if not chosen:
        raise ValueError(f"test_fraction={fraction} of {len(names)} patients selects none; use a larger fraction")
    return chosen


def make_splits(
    patients: dict[str, str],
    k: int = 5,
    seed: int = 0,
    has_necrosis: dict[str, bool] | None = None,
    test_fraction: float = 0.0,
) -> Splits:
    """Assign patients to a held-out test set (optional) and ``k`` folds.

    Args:
        patients: case id -> patient id.
        k: number of folds, 2 <= k <= number of patients outside the test set.
        seed: permutation seed; equal inputs give equal splits.
        has_necrosis: case id -> whether the case contains necrosis; when given, a patient counts as
            positive if any of their cases is, and the test set and the folds are stratified on that.
        test_fraction: share of patients held out as the test set (0: none), per stratum.

    Raises:
        ValueError: bad ``k`` for the number of patients, a test fraction outside [0, 1).
    """
    by_patient = _by_patient(patients)
    names = sorted(by_patient)
    test = _test_patients(names, by_patient, has_necrosis, test_fraction, seed)
    names = [p for p in names if p not in test]
    n = len(names)
    if not 2 <= k <= n:
        held = " outside the test set" if test else ""
        raise ValueError(f"k must be between 2 and the number of patients{held} ({n}), got {k=}")
    import numpy as np

    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for group in _strata(names, by_patient, has_necrosis):
        for i, idx in enumerate(rng.permutation(len(group))):
            fold_of[group[idx]] = (offset + i) % k
        offset += len(group)  # continue round-robin so fold sizes stay balanced across groups
    folds = []
    for f in range(k):
        val = sorted(c for p in names if fold_of[p] == f for c in by_patient[p])
        train = sorted(c for p in names if fold_of[p] != f for c in by_patient[p])
        folds.append(Fold(tuple(train), tuple(val)))
    held_out = tuple(sorted(c for p in test for c in by_patient[p]))
    return Splits(k, seed, has_necrosis is not None, tuple(folds), held_out)


def inner_splits(
    splits: Splits,
    outer_fold: int,
    patients: dict[str, str],
    has_necrosis: dict[str, bool] | None = None,
    k: int = 3,
) -> Splits:
    """The ``k`` inner folds of one outer fold's *training* patients (nested cross-validation).

    Made with the outer split's seed and stratification, so they are reproducible from the outer
    split alone; the outer fold's validation patients and the test set are in none of them.

    Raises:
        ValueError: ``k`` larger than the outer fold's training patients.
    """
    train = set(splits.fold(outer_fold).train)
    inner = {c: p for c, p in patients.items() if c in train}
    necrosis = {c: v for c, v in has_necrosis.items() if c in train} if has_necrosis is not None else None
    try:
        return make_splits(inner, k=k, seed=splits.seed, has_necrosis=necrosis)
    except ValueError as err:
        raise ValueError(f"inner folds of outer fold {outer_fold}: {err}") from None


def _always(path: Path) -> bool:
    return True


def write_splits(splits: Splits, path: str | Path, replace: Callable[[Path], bool] | None = _always) -> Path:
    """Write ``splits.json`` atomically (a concurrent reader never sees half a file).

    ``replace``: whether an existing file may be replaced, checked right before the rename (default: yes,
    for racing trials that compute the same split; ``avn-study split`` passes its ``--overwrite`` rule).

    Raises:
        UsageError: the file appeared meanwhile and may not be replaced.
    """
    from avn_study.outputs import write_text_atomic

    return write_text_atomic(Path(path), json.dumps(splits.to_dict(), indent=1) + "\n", replace)


def read_splits(path: str | Path, cases: set[str] | None = None) -> Splits:
    """Read and check a ``splits.json``; with ``cases``, also check it covers exactly those cases.

    Raises:
        DataError: unreadable file, a hash that does not match the folds (edited by hand), overlapping
            folds or cases that differ from the cohort.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a valid splits file ({err})") from None
    return check_splits(raw, cases, str(path))


def check_splits(raw: dict, cases: set[str] | None, path: str) -> Splits:
    """:func:`read_splits` on a parsed file (``path`` names where it came from in messages)."""
    try:
        splits = splits_from_dict(raw)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid splits file ({err})") from None
    if raw.get("hash") != splits.hash:
        raise DataError(
            f"{path}: hash {raw.get('hash')} does not match its folds ({splits.hash}); "
            "the file was edited: delete it to make a new split"
        )
    vals = [c for f in splits.folds for c in f.val]
    if len(vals) != len(set(vals)) or len(splits.folds) != splits.k:
        raise DataError(f"{path}: folds overlap or their number differs from k={splits.k}")
    if set(vals) & set(splits.test):
        raise DataError(f"{path}: test cases {sorted(set(vals) & set(splits.test))[:5]} are also in a fold")
    listed = set(vals) | set(splits.test)
    if cases is not None and listed != cases:
        missing, extra = sorted(cases - listed), sorted(listed - cases)
        raise DataError(
            f"{path}: does not match the cohort: missing cases {missing[:5]}, unknown cases {extra[:5]}; "
            "delete it to make a new split"
        )
    return splits


def is_splits_file(path: Path) -> bool:
    """Whether ``path`` is a splits file (what ``split --overwrite`` may replace)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(raw, dict) and {"k", "folds", "hash"} <= set(raw)


def splits_from_dict(raw: dict) -> Splits:
    """The inverse of :meth:`Splits.to_dict` (no checks beyond the structure; see :func:`read_splits`)."""
    folds = tuple(Fold(tuple(f["train"]), tuple(f["val"])) for f in raw["folds"])
    return Splits(int(raw["k"]), int(raw["seed"]), bool(raw["stratified"]), folds, tuple(raw.get("test", ())))


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
    try:
        splits = make_splits(patients, k, seed, has_necrosis)
    except ValueError as err:
        raise DataError(f"n_folds={k}: {err}") from None
    write_splits(splits, path)
    return splits


def resolve_splits(
    data_root: str | Path,
    patients: dict[str, str],
    has_necrosis: dict[str, bool],
    k: int,
    seed: int,
    *,
    splits_path: str | Path | None = None,
    frozen: dict | None = None,
    cache_dir: str | Path | None = None,
) -> Splits:
    """The split a run uses, never written into the cohort's folder unasked:

    1. ``frozen`` (a study's own ``splits.json``, passed inline to its trials), checked against the cohort;
    2. ``splits_path`` (``--splits``): read, or made and frozen there when it does not exist yet;
    3. ``DATA/splits.json`` when the user froze one (``avn-study split``): read, and its fold count must
       be the one asked for;
    4. otherwise the cohort's split for ``(k, seed)``, made once and kept in the node's cache
       (``CACHE/splits/``, keyed by the cohort's cases, patients, k and seed): a data folder may be
       read-only, and another fold count is simply another split.

    Raises:
        DataError: a file that does not fit the cohort or the fold count.
    """
    cases = set(patients)
    if frozen is not None:
        splits = check_splits(frozen, cases, "the study's splits.json")
    elif splits_path is not None:
        return load_or_create_splits(splits_path, patients, has_necrosis, k=k, seed=seed)
    elif (Path(data_root) / SPLITS_FILE).is_file():
        path = Path(data_root) / SPLITS_FILE
        splits = read_splits(path, cases)
        if splits.k != k:
            raise DataError(f"{path}: the split you froze has {splits.k} folds but n_folds={k} was asked for; use "
                            f"n_folds={splits.k}, or pass --splits FILE for another split")  # fmt: skip
        return splits
    else:
        from avn_study.data.cache import default_cache_dir

        identity = json.dumps([sorted(patients.items()), sorted(has_necrosis.items()), k, seed])
        key = hashlib.sha256(identity.encode()).hexdigest()[:20]
        from avn_study.data.cache import unwritable_cache

        root = Path(cache_dir or default_cache_dir())
        path = root / "splits" / f"{key}-k{k}-seed{seed}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return load_or_create_splits(path, patients, has_necrosis, k=k, seed=seed)
        except OSError as err:
            explained = unwritable_cache(root, err)
            if explained is None:
                raise
            raise explained from None
    if splits.k != k:
        raise DataError(f"the study's splits.json has {splits.k} folds but n_folds={k} was asked for")
    return splits


def write_nested(outer: Splits, inner: dict[int, Splits], path: str | Path) -> Path:
    """Freeze the inner splits of a nested study (outer fold -> inner splits), keyed to the outer split."""
    payload = {"outer_hash": outer.hash, "inner": {str(k): v.to_dict() for k, v in sorted(inner.items())}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_nested(path: str | Path, outer: Splits, outer_fold: int) -> Splits:
    """The frozen inner splits of ``outer_fold`` in a study's ``nested_splits.json`` (see :func:`check_inner`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if raw.get("outer_hash") != outer.hash:
            made_from = str(raw.get("outer_hash"))[:12]
            raise DataError(f"{path}: made from another outer split ({made_from} vs {outer.hash[:12]})")
        entry = raw["inner"][str(outer_fold)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: no valid inner splits for outer fold {outer_fold} ({err})") from None
    return check_inner(entry, outer, outer_fold, str(path))


def check_inner(entry: dict, outer: Splits, outer_fold: int, source: str) -> Splits:
    """Inner splits from their :meth:`Splits.to_dict` form, checked against the outer fold they divide.

    Raises:
        DataError: a malformed entry, folds edited by hand (hash mismatch), or inner folds that are not
            exactly the outer fold's training cases.
    """
    try:
        inner = splits_from_dict(entry)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{source}: the inner splits of outer fold {outer_fold} are malformed ({err})") from None
    if entry.get("hash") != inner.hash:
        raise DataError(f"{source}: the inner folds of outer fold {outer_fold} were edited (hash mismatch)")
    if {c for f in inner.folds for c in f.val} != set(outer.fold(outer_fold).train):
        raise DataError(f"{source}: the inner folds of outer fold {outer_fold} are not its training cases")
    return inner
