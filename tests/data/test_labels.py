"""A cohort's own label map (``dataset.json`` labels, nnU-Net regions, ``avn_roles``) -> canonical labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from avn_study.data.cache import build_cache
from avn_study.data.labels import CANONICAL, parse_label_map
from avn_study.data.layout import open_cohort
from avn_study.data.nifti import write_nifti
from avn_study.data.verify import verify_dataset
from avn_study.errors import DataError


def _parse(**spec):
    return parse_label_map(spec, Path("dataset.json"))


def test_the_default_map_is_canonical() -> None:
    label_map, problems = _parse(labels={"background": 0, "femoral_head": 1, "necrosis": 2})
    assert not problems and label_map == CANONICAL and label_map.is_canonical
    raw = np.array([0, 1, 2, 1, 0], np.uint8)
    assert np.array_equal(CANONICAL.canonical(raw), raw)


def test_left_right_heads_merge_and_unused_labels_read_as_background() -> None:
    label_map, problems = _parse(
        labels={"background": 0, "head_left": 1, "head_right": 4, "avn": 7, "acetabulum": 3},
        avn_roles={"necrosis": "avn", "femoral_head": ["head_left", "head_right"]},
    )
    assert not problems
    raw = np.array([0, 1, 4, 7, 3], np.uint8)
    assert label_map.canonical(raw).tolist() == [0, 1, 1, 2, 0]
    assert label_map.describe() == (
        "labels understood: necrosis = 'avn' (7); femoral head = 'head_left' (1) + 'head_right' (4); "
        "read as background: 'acetabulum'"
    )
    assert not label_map.is_canonical and label_map.key() != CANONICAL.key()


def test_nnunet_region_labels_keep_necrosis_inside_the_head() -> None:
    label_map, problems = _parse(labels={"background": 0, "femoral_head": [1, 2], "necrosis": 2})
    assert not problems
    assert label_map.canonical(np.array([0, 1, 2])).tolist() == [0, 1, 2]
    assert label_map.role_values("femoral_head") == (1, 2)


def test_a_cohort_with_necrosis_only_has_no_head_role() -> None:
    label_map, problems = _parse(labels={"background": 0, "necrosis": 1})
    assert not problems and not label_map.has_head
    assert label_map.canonical(np.array([0, 1])).tolist() == [0, 2]
    assert "femoral head = none (no femoral head labels" in label_map.describe()


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"labels": {"background": 0, "lesion": 1}}, "no label plays necrosis"),
        ({"labels": {"background": 1, "necrosis": 2}}, "background as 0"),
        ({"labels": {"necrosis": 2}}, "background as 0"),
        ({"labels": {"background": 0, "necrosis": "two"}}, "labels.necrosis: expected an integer 0-255"),
        ({"labels": {"background": 0, "necrosis": [1, 300]}}, "labels.necrosis: expected an integer 0-255"),
        ({"labels": []}, "labels must map label names to values"),
        ({"labels": {"background": 0, "avn": 1}, "avn_roles": {"necrosis": "anv"}}, "'anv' is not a name in labels"),
        ({"labels": {"background": 0, "avn": 1}, "avn_roles": {"lesion": "avn"}}, "avn_roles.lesion: unknown role"),
        ({"labels": {"background": 0, "avn": 1}, "avn_roles": ["avn"]}, "avn_roles must be a mapping"),
        ({"labels": {"background": 0, "avn": 1}, "avn_roles": {"necrosis": 1}}, "expected a label name or a list"),
        ({"labels": {"background": 0, "avn": 1}, "avn_roles": {"necrosis": "background"}}, "background cannot"),
    ],
)
def test_bad_label_maps_name_the_key(spec: dict, fragment: str) -> None:
    label_map, problems = _parse(**spec)
    assert label_map is None
    assert any(fragment in p.message for p in problems), [p.message for p in problems]


def _relabel(root: Path, spec: dict, mapping) -> None:
    """Rewrite every label file of a toy cohort with ``mapping(label) -> new values`` and a new dataset.json."""
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        write_nifti(mapping(label).astype(np.uint8), image.affine, path)
    data = json.loads((root / "dataset.json").read_text())
    data.update(spec)
    (root / "dataset.json").write_text(json.dumps(data))


def _split_heads(label: np.ndarray) -> np.ndarray:
    out = np.zeros_like(label)
    left = np.zeros(label.shape, bool)
    left[: label.shape[0] // 2] = True  # the toy heads sit symmetrically at R index 7 and 16 of 24
    out[(label == 1) & left] = 1
    out[(label == 1) & ~left] = 4
    out[label == 2] = 7
    return out


def _relabel_heads_apart(root: Path) -> None:
    """Left and right heads as labels 1 and 4, necrosis as 7, declared by name with avn_roles."""
    _relabel(
        root,
        {"labels": {"background": 0, "head_left": 1, "head_right": 4, "avn": 7},
         "avn_roles": {"necrosis": "avn", "femoral_head": ["head_left", "head_right"]}},
        _split_heads,
    )  # fmt: skip


def test_a_relabelled_cohort_caches_the_same_labels(toy_cohort: Path, tmp_path: Path) -> None:
    reference = {c.case_id: np.array(c.label) for c in build_cache(toy_cohort, cache_dir=tmp_path / "c1")}
    _relabel_heads_apart(toy_cohort)
    report = verify_dataset(toy_cohort)
    assert report.ok, report.format()
    assert "femoral head = 'head_left' (1) + 'head_right' (4)" in report.format()
    cached = build_cache(toy_cohort, cache_dir=tmp_path / "c2")
    assert {c.case_id for c in cached} == set(reference)
    for case in cached:
        assert np.array_equal(np.array(case.label), reference[case.case_id]), case.case_id
        assert case.has_head_labels


def test_undeclared_values_are_refused_with_the_declared_map(toy_cohort: Path) -> None:
    _relabel(toy_cohort, {"labels": {"background": 0, "femoral_head": 1, "necrosis": 2}},
             lambda lab: np.where(lab == 2, 5, lab))  # fmt: skip
    report = verify_dataset(toy_cohort)
    assert any("label values [5] are not in dataset.json's labels (0=background, 1=femoral_head, 2=necrosis)"
               in p.message for p in report.errors), report.format()  # fmt: skip


def test_necrosis_only_cohort_trains_seg_and_refuses_loc(toy_cohort: Path, tmp_path: Path) -> None:
    from avn_study.config import TrainConfig
    from avn_study.training.fold import prepare_data

    _relabel(toy_cohort, {"labels": {"background": 0, "necrosis": 1}}, lambda lab: (lab == 2).astype(np.uint8))
    report = verify_dataset(toy_cohort)
    assert report.ok and "no femoral head labels" in report.format()
    cached = build_cache(toy_cohort, cache_dir=tmp_path / "cache")
    assert not any(c.has_head_labels for c in cached)
    assert set(np.unique(np.array(cached[0].label)).tolist()) <= {0, 2}
    base = {"n_folds": 3, "slice_size": 32, "depth": 2, "inplane_spacing_mm": 4.0}
    data = prepare_data(toy_cohort, TrainConfig.from_flat({**base, "arm": "seg"}), tmp_path / "cache",
                        tmp_path / "splits.json")  # fmt: skip
    assert data.train
    with pytest.raises(DataError, match=r"arm 'seg\+loc' has a localisation branch.*labels no femoral head"):
        prepare_data(toy_cohort, TrainConfig.from_flat({**base, "arm": "seg+loc"}), tmp_path / "cache",
                     tmp_path / "splits.json")  # fmt: skip
    assert open_cohort(toy_cohort).label_map.necrosis == ("necrosis",)


def test_a_study_with_a_loc_row_is_refused_before_ray_on_a_cohort_without_heads(
    sweep_cohort: Path, tmp_path: Path
) -> None:
    import shutil

    from conftest import small_space

    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    cohort = tmp_path / "necrosis-only"
    shutil.copytree(sweep_cohort, cohort, ignore=shutil.ignore_patterns("splits.json"))
    _relabel(cohort, {"labels": {"background": 0, "necrosis": 1}}, lambda lab: (lab == 2).astype(np.uint8))
    space = load_space(small_space(tmp_path))  # rows unet and seg+recon+loc
    study = Study(space, cohort, str(tmp_path / "storage"), progress=False)
    with pytest.raises(DataError, match=r"arms.seg\+recon\+loc: arm 'seg\+recon\+loc' has a localisation branch"):
        study.prepare(resume=False)
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").rglob("study.json"))


@pytest.mark.parametrize(("labels", "expected"), [("with_head", {0, 1, 2}), ("necrosis", {0, 1})])
def test_nnunet_raw_labels_are_its_classes_from_any_label_map(toy_cohort: Path, tmp_path: Path, labels: str,
                                                              expected: set[int]) -> None:  # fmt: skip
    """nnU-Net rows train on the cohort's label map mapped to nnU-Net classes, in each label file's geometry."""
    from avn_study.baselines.nnunet.run import _write_raw

    reference = {p.name: np.asarray(nib.load(p).dataobj) for p in (toy_cohort / "labelsTr").glob("*.nii.gz")}
    _relabel_heads_apart(toy_cohort)
    cohort = open_cohort(toy_cohort)
    _write_raw(cohort, cohort.cases, labels, tmp_path / "raw")
    spec = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert set(spec["labels"].values()) == expected and spec["numTraining"] == len(cohort.cases)
    for name, before in reference.items():
        written = nib.load(tmp_path / "raw" / "labelsTr" / name)
        values = np.asarray(written.dataobj)
        assert set(np.unique(values)) <= expected
        canonical = before if labels == "with_head" else (before == 2)
        assert np.array_equal(values, canonical.astype(np.uint8)), name
        assert np.allclose(written.affine, nib.load(toy_cohort / "labelsTr" / name).affine)
    images = sorted((tmp_path / "raw" / "imagesTr").iterdir())
    assert images and all(p.is_symlink() and p.name.endswith("_0000.nii.gz") for p in images)
