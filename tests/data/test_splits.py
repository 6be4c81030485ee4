"""Patient-level folds: no leakage, determinism, stratification, frozen file with a hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avn_study.data.splits import load_or_create_splits, make_splits, read_splits, write_splits
from avn_study.errors import DataError


def _cohort(n_patients: int = 12) -> tuple[dict[str, str], dict[str, bool]]:
    patients, necrosis = {}, {}
    for p in range(n_patients):
        for scan in range(1 + p % 3):  # some patients have 2 or 3 cases
            case = f"c{p:02d}_{scan}"
            patients[case] = f"P{p:02d}"
            necrosis[case] = p % 4 == 0 and scan == 0
    return patients, necrosis


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("stratify", [True, False])
def test_no_patient_in_train_and_val(k: int, stratify: bool) -> None:
    patients, necrosis = _cohort()
    splits = make_splits(patients, k=k, seed=1, has_necrosis=necrosis if stratify else None)
    all_val = [c for f in splits.folds for c in f.val]
    assert sorted(all_val) == sorted(patients)  # every case validated exactly once
    for fold in splits.folds:
        train_patients = {patients[c] for c in fold.train}
        val_patients = {patients[c] for c in fold.val}
        assert not train_patients & val_patients
        assert set(fold.train) | set(fold.val) == set(patients)


def test_deterministic_and_seed_dependent() -> None:
    patients, necrosis = _cohort()
    assert make_splits(patients, 5, 7, necrosis).hash == make_splits(patients, 5, 7, necrosis).hash
    assert make_splits(patients, 5, 7, necrosis).hash != make_splits(patients, 5, 8, necrosis).hash


def test_stratification_spreads_positive_patients() -> None:
    patients, necrosis = _cohort(20)  # 5 positive patients
    splits = make_splits(patients, k=5, seed=0, has_necrosis=necrosis)
    positives_per_fold = [len({patients[c] for c in f.val if necrosis[c]}) for f in splits.folds]
    assert positives_per_fold == [1, 1, 1, 1, 1]
    sizes = [len({patients[c] for c in f.val}) for f in splits.folds]
    assert max(sizes) - min(sizes) <= 1


def test_bad_k() -> None:
    with pytest.raises(ValueError, match=r"k must be between 2 and the number of patients \(3\), got k=4"):
        make_splits({"a": "1", "b": "2", "c": "3"}, k=4)


def test_frozen_file_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    patients, necrosis = _cohort()
    path = tmp_path / "splits.json"
    splits = load_or_create_splits(path, patients, necrosis, k=3, seed=0)
    assert read_splits(path, set(patients)) == splits
    # a second call reuses the frozen file even with another seed
    assert load_or_create_splits(path, patients, necrosis, k=3, seed=99).hash == splits.hash
    with pytest.raises(DataError, match="holds 3 folds but 5 were asked for"):
        load_or_create_splits(path, patients, necrosis, k=5)
    with pytest.raises(DataError, match="does not match the cohort"):
        read_splits(path, set(patients) | {"new_case"})
    raw = json.loads(path.read_text())
    raw["folds"][0]["val"].append(raw["folds"][1]["val"].pop())
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="the file was edited"):
        read_splits(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not a valid splits file"):
        read_splits(path)


def test_write_splits_is_atomic(tmp_path: Path) -> None:
    patients, _ = _cohort()
    write_splits(make_splits(patients, 3), tmp_path / "splits.json")
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]


def test_test_set_is_held_out_by_patient_and_stratified() -> None:
    patients, necrosis = _cohort(20)  # 5 positive patients
    plain = make_splits(patients, k=3, seed=4, has_necrosis=necrosis)
    held = make_splits(patients, k=3, seed=4, has_necrosis=necrosis, test_fraction=0.2)
    test_patients = {patients[c] for c in held.test}
    assert len(test_patients) == 4  # round(0.2 * 5) positive + round(0.2 * 15) negative
    assert sum(any(necrosis[c] for c in held.test if patients[c] == p) for p in test_patients) == 1
    assert set(held.test) == {c for c, p in patients.items() if p in test_patients}  # whole patients
    in_folds = {c for f in held.folds for c in f.val}
    assert not in_folds & set(held.test) and in_folds | set(held.test) == set(patients)
    for fold in held.folds:
        assert not set(fold.train) & set(held.test)
    assert plain.test == () and held.hash != plain.hash
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\), got fraction=1.0"):
        make_splits(patients, k=3, test_fraction=1.0)


def test_a_split_without_test_set_keeps_its_old_hash(tmp_path: Path) -> None:
    patients, necrosis = _cohort()
    splits = make_splits(patients, 3, 0, necrosis)
    legacy = json.dumps([[list(f.train), list(f.val)] for f in splits.folds])  # the hash before test sets existed
    import hashlib

    assert splits.hash == hashlib.sha256(legacy.encode()).hexdigest()
    raw = splits.to_dict()
    raw.pop("test")  # a file written before test sets existed
    (tmp_path / "splits.json").write_text(json.dumps(raw))
    assert read_splits(tmp_path / "splits.json", set(patients)) == splits


def test_frozen_test_set_must_not_overlap_the_folds(tmp_path: Path) -> None:
    patients, necrosis = _cohort()
    splits = make_splits(patients, 3, 0, necrosis, test_fraction=0.25)
    path = write_splits(splits, tmp_path / "splits.json")
    assert read_splits(path, set(patients)).test == splits.test
    raw = json.loads(path.read_text())
    raw["test"].append(raw["folds"][0]["val"][0])
    raw["hash"] = type(splits)(splits.k, splits.seed, splits.stratified, splits.folds, tuple(raw["test"])).hash
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="are also in a fold"):
        read_splits(path)


def test_inner_splits_divide_only_the_outer_training_patients(tmp_path: Path) -> None:
    from avn_study.data.splits import inner_splits, read_nested, write_nested

    patients, necrosis = _cohort(15)
    outer = make_splits(patients, 3, 2, necrosis, test_fraction=0.2)
    inner = {k: inner_splits(outer, k, patients, necrosis, k=2) for k in range(3)}
    for k, folds in inner.items():
        assert {c for f in folds.folds for c in f.val} == set(outer.fold(k).train)
        for fold in folds.folds:  # patient-level inside too
            assert not {patients[c] for c in fold.train} & {patients[c] for c in fold.val}
    assert inner_splits(outer, 1, patients, necrosis, k=2) == inner[1]  # reproducible from the outer split
    path = write_nested(outer, inner, tmp_path / "nested_splits.json")
    assert read_nested(path, outer, 2) == inner[2]
    raw = json.loads(path.read_text())
    raw["inner"]["0"]["folds"][0]["val"].append(raw["inner"]["0"]["folds"][1]["val"].pop())
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="inner folds of outer fold 0 were edited"):
        read_nested(path, outer, 0)
    other = make_splits(patients, 3, 9, necrosis)
    with pytest.raises(DataError, match="made from another outer split"):
        read_nested(path, other, 1)
    with pytest.raises(ValueError, match="inner folds of outer fold 0: k must be between 2"):
        inner_splits(outer, 0, patients, necrosis, k=50)


def test_runs_never_write_a_split_into_the_cohort(tmp_path: Path) -> None:
    from avn_study.data.splits import resolve_splits
    from avn_study.errors import DataError

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    patients = {f"c{i}": f"P{i // 2}" for i in range(12)}
    necrosis = {c: i % 3 == 0 for i, c in enumerate(patients)}
    five = resolve_splits(data, patients, necrosis, 5, 0, cache_dir=cache)
    three = resolve_splits(data, patients, necrosis, 3, 0, cache_dir=cache)  # another fold count: another split
    assert (five.k, three.k) == (5, 3) and not any(data.iterdir())
    assert len(list((cache / "splits").glob("*.json"))) == 2
    assert resolve_splits(data, patients, necrosis, 5, 0, cache_dir=cache) == five  # frozen: read back
    mine = write_splits(make_splits(patients, 4, seed=9), data / "splits.json")  # the user froze 4 folds
    assert resolve_splits(data, patients, necrosis, 4, 0, cache_dir=cache).seed == 9
    with pytest.raises(DataError, match="the split you froze has 4 folds but n_folds=3 was asked for"):
        resolve_splits(data, patients, necrosis, 3, 0, cache_dir=cache)
    frozen = json.loads(mine.read_text())
    assert resolve_splits(data, patients, necrosis, 4, 0, frozen=frozen).hash == frozen["hash"]
    frozen["folds"][0]["val"].pop()
    with pytest.raises(DataError, match=r"the study's splits\.json: hash"):
        resolve_splits(data, patients, necrosis, 4, 0, frozen=frozen)
