"""A trial finds its split in the study folder by hash (avn_study.study.trial_split), without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avn_study.data.splits import inner_splits, make_splits, write_nested
from avn_study.errors import DataError
from avn_study.study import trial_split
from avn_study.study.folder import NESTED_SPLITS, SPLITS_COPY


@pytest.fixture
def study(tmp_path: Path):
    """A study folder with a frozen 3-fold split of 12 patients and the inner folds of outer folds 0 and 1."""
    trial_split.forget()
    patients = {f"c{i:02d}": f"P{i:02d}" for i in range(12)}
    splits = make_splits(patients, k=3, seed=1)
    (tmp_path / SPLITS_COPY).write_text(json.dumps(splits.to_dict()))
    write_nested(splits, {k: inner_splits(splits, k, patients, k=2) for k in (0, 1)}, tmp_path / NESTED_SPLITS)
    reads: list[str] = []

    def read(name: str) -> bytes:
        reads.append(name)
        return (tmp_path / name).read_bytes()

    yield tmp_path, splits, read, reads
    trial_split.forget()


def test_a_reference_reads_the_split_the_trial_was_planned_on(study) -> None:
    root, splits, read, _ = study
    split, inner = trial_split.trial_split(trial_split.split_reference(splits.hash), str(root), read)
    assert split == splits.to_dict() and inner is None


def test_the_inner_folds_of_the_outer_fold(study) -> None:
    root, splits, read, _ = study
    _, inner = trial_split.trial_split(trial_split.split_reference(splits.hash, outer=1), str(root), read)
    nested = json.loads((root / NESTED_SPLITS).read_text())
    assert inner == nested["inner"]["1"] and inner != nested["inner"]["0"]


def test_a_worker_reads_each_file_once(study) -> None:
    root, splits, read, reads = study
    for outer in (0, 1, 0):
        trial_split.trial_split(trial_split.split_reference(splits.hash, outer), str(root), read)
    assert reads == [SPLITS_COPY, NESTED_SPLITS]


def test_a_replaced_split_is_refused_naming_the_file(study) -> None:
    root, splits, read, _ = study
    other = make_splits({f"c{i:02d}": f"P{i:02d}" for i in range(12)}, k=3, seed=2)
    (root / SPLITS_COPY).write_text(json.dumps(other.to_dict()))
    with pytest.raises(DataError, match=rf"{SPLITS_COPY}: holds split {other.hash[:12]}.*{splits.hash[:12]}"):
        trial_split.trial_split(trial_split.split_reference(splits.hash), str(root), read)


def test_a_study_folder_made_anew_at_the_same_place_is_read_again(study) -> None:
    root, splits, read, _ = study
    trial_split.trial_split(trial_split.split_reference(splits.hash), str(root), read)
    other = make_splits({f"c{i:02d}": f"P{i:02d}" for i in range(12)}, k=3, seed=2)
    (root / SPLITS_COPY).write_text(json.dumps(other.to_dict()))
    split, _ = trial_split.trial_split(trial_split.split_reference(other.hash), str(root), read)
    assert split == other.to_dict()


def test_a_missing_or_damaged_file_is_a_data_error_naming_it(study) -> None:
    root, splits, read, _ = study
    (root / NESTED_SPLITS).write_text('{"outer_hash": ')
    with pytest.raises(DataError, match=rf"{NESTED_SPLITS}: cannot be read"):
        trial_split.trial_split(trial_split.split_reference(splits.hash, outer=0), str(root), read)
    (root / SPLITS_COPY).unlink()
    trial_split.forget()
    with pytest.raises(DataError, match=rf"{SPLITS_COPY}: cannot be read.*every node must reach"):
        trial_split.trial_split(trial_split.split_reference(splits.hash), str(root), read)


def test_an_outer_fold_without_inner_folds_is_refused(study) -> None:
    root, splits, read, _ = study
    with pytest.raises(DataError, match=rf"{NESTED_SPLITS}: no inner folds of outer fold 2"):
        trial_split.trial_split(trial_split.split_reference(splits.hash, outer=2), str(root), read)


def test_an_inline_split_of_an_older_study_folder_is_used_as_it_is(study) -> None:
    root, _, read, reads = study
    meta = {"split": {"hash": "old"}, "inner": {"k": 2}}
    assert trial_split.trial_split(meta, str(root), read) == ({"hash": "old"}, {"k": 2})
    assert trial_split.trial_split({}, str(root), read) == (None, None)
    assert reads == []


def test_a_trials_files_are_written_whole_or_not_at_all(tmp_path) -> None:
    from pyarrow import fs

    from avn_study.study.trainable import write_whole

    local = fs.LocalFileSystem()
    target = tmp_path / "trial" / "epochs" / "epoch_000.json"
    write_whole(local, str(target), b'{"epoch": 0}')
    write_whole(local, str(target), b'{"epoch": 0, "again": true}')  # a retried epoch replaces its record
    assert target.read_bytes() == b'{"epoch": 0, "again": true}'

    class Full(fs.LocalFileSystem):  # a disk that fills up while the record is written
        def move(self, src, dest):
            raise OSError(28, "No space left on device")

    try:
        write_whole(Full(), str(target), b'{"epoch": 0, "torn')
    except OSError:
        pass
    else:
        raise AssertionError("the failed write was not reported")
    assert target.read_bytes() == b'{"epoch": 0, "again": true}'  # the old record, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_000.json"]  # no temporary left
