"""Tests of the synthetic hip MRI generator (avn_study.data.phantom)."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from scipy import ndimage

from avn_study.data.nifti import write_nifti
from avn_study.data.phantom import PhantomConfig, iter_cohort, synth_case, write_cohort

TINY = PhantomConfig.tiny()
CUBE = np.ones((3, 3, 3), bool)  # 26-connectivity


def to_ras(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nio.apply_orientation(image, nio.io_orientation(affine))


@pytest.fixture(scope="module")
def cohort() -> list:
    """40 tiny patients (about 3 s), shared by the statistical tests."""
    return list(iter_cohort(40, seed=1, config=TINY))


def test_tiny_config_is_fast() -> None:
    start = time.perf_counter()
    synth_case(0, 0, TINY)
    assert time.perf_counter() - start < 1.0  # ~0.07 s on one core; generous for busy CI machines


def test_same_seed_same_arrays_different_seed_different() -> None:
    a, b, c = synth_case(3, 7, TINY), synth_case(3, 7, TINY), synth_case(3, 8, TINY)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.info == b.info
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_case_does_not_depend_on_cohort_size() -> None:
    second = list(iter_cohort(2, seed=5, config=TINY))[1]
    alone = synth_case(1, 5, TINY)
    assert second.case_id == alone.case_id == "AVN_001" and second.patient_id == "P001"
    assert np.array_equal(second.image, alone.image)


def test_arrays_labels_and_info(cohort: list) -> None:
    for case in cohort:
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape and case.affine.shape == (4, 4)
        assert set(np.unique(case.label)) <= {0, 1, 2}
        assert (case.label == 1).any()
        json.dumps(case.info)  # JSON-serialisable
        assert case.info["n_distractors"] == len(case.info["distractors"])


def test_necrosis_components_touch_the_head(cohort: list) -> None:
    for case in cohort:
        components, n = ndimage.label(case.label == 2, CUBE)
        near_head = ndimage.binary_dilation(case.label == 1, CUBE)
        for k in range(1, n + 1):
            assert near_head[components == k].any(), f"{case.case_id}: necrosis component {k} off the head"


def test_lesion_fraction_in_range_and_matches_labels(cohort: list) -> None:
    lo, hi = TINY.lesion_fraction
    checked = 0
    for case in cohort:
        label = to_ras(case.label, case.affine)
        half = label.shape[0] // 2  # RAS: the right hip has the larger x index
        for side, part in (("right", label[half:]), ("left", label[:half])):
            fraction = case.info["lesion_fraction"][side]
            if not case.info["necrosis"][side]:
                assert fraction == 0.0 and not (part == 2).any()
                continue
            assert lo <= fraction <= hi
            assert abs((part == 2).sum() / (part > 0).sum() - fraction) < 0.03, case.case_id
            checked += 1
    assert checked > 10


def test_healthy_unilateral_and_bilateral_occur(cohort: list) -> None:
    counts = {sum(case.info["necrosis"].values()) for case in cohort}
    assert counts == {0, 1, 2}


def test_some_cases_are_stored_non_ras(cohort: list) -> None:
    codes = {case.info["axcodes"] for case in cohort}
    assert "RAS" in codes and codes - {"RAS"}
    for case in cohort:
        assert "".join(nio.aff2axcodes(case.affine)) == case.info["axcodes"]


def test_non_ras_files_read_back_to_the_ras_volume(tmp_path) -> None:
    """The orientation is drawn last, so the same case stored RAS and non-RAS holds the same volume."""
    seen = set()
    for index in range(8):
        ras = synth_case(index, 3, dataclasses.replace(TINY, non_ras_fraction=0.0))
        stored = synth_case(index, 3, dataclasses.replace(TINY, non_ras_fraction=1.0))
        assert ras.info["axcodes"] == "RAS" and stored.info["axcodes"] != "RAS"
        seen.add(stored.info["axcodes"])
        path = write_nifti(stored.image, stored.affine, tmp_path / f"{index}.nii.gz")
        image = nib.load(path)
        ornt = nio.io_orientation(image.affine)
        assert np.array_equal(nio.apply_orientation(np.asanyarray(image.dataobj), ornt), ras.image)
        assert np.array_equal(to_ras(stored.label, stored.affine), ras.label)
        ras_affine = image.affine @ nio.inv_ornt_aff(ornt, image.shape)
        assert np.allclose(ras_affine, ras.affine)
        spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
        assert np.allclose(spacing, stored.info["spacing_mm"])
        assert spacing[1] == spacing.max()  # the coronal slice (A/P) spacing is the largest
    assert len(seen) >= 2


def test_t1_contrast() -> None:
    """Marrow bright, necrosis dark, air dark; a wide FOV puts air beside the body."""
    config = PhantomConfig.tiny(
        fov_mm=(460.0, 220.0), lesion_contrast=(0.3, 0.45), p_bilateral=1.0, p_unilateral=0.0, snr=(15.0, 20.0)
    )
    for index in range(3):
        case = synth_case(index, 11, config)
        image, label = to_ras(case.image, case.affine).astype(float), to_ras(case.label, case.affine)
        marrow = image[ndimage.binary_erosion(label == 1, iterations=2)].mean()  # head interior
        assert marrow > 1.5 * image[label == 2].mean()
        air = image[:4].mean()  # the outermost 8 mm on the right, beyond the body
        assert marrow > 4 * air


def test_default_contrast_mixes_clear_and_subtle_lesions(cohort: list) -> None:
    ratios = []
    for case in cohort:
        image, label = to_ras(case.image, case.affine).astype(float), to_ras(case.label, case.affine)
        if (label == 2).any():
            ratios.append(image[label == 1].mean() / image[label == 2].mean())
    assert 1.1 < np.median(ratios) < 2.5 and min(ratios) < 1.2


def test_distractors_darken_only_outside_the_head() -> None:
    """Distractors are drawn last from the anatomy stream: with and without them, all else is equal."""
    darkened = 0
    for index in range(3):
        plain = synth_case(index, 4, dataclasses.replace(TINY, distractor_mean=0.0))
        busy = synth_case(index, 4, dataclasses.replace(TINY, distractor_mean=8.0))
        assert plain.info["n_distractors"] == 0 and busy.info["n_distractors"] > 0
        assert np.array_equal(plain.label, busy.label)
        diff = busy.image.astype(float) - plain.image
        dark = diff < -0.2 * np.percentile(plain.image[plain.label == 1], 50)
        assert not (dark & (busy.label > 0)).any()
        darkened += dark.sum()
    assert darkened > 50


def test_default_case_geometry_and_distractors() -> None:
    case = synth_case(0, 0)
    spacing = np.array(case.info["spacing_mm"])
    nx, ny, nz = case.info["shape_ras"]
    assert 0.9 <= spacing[0] <= 1.2 and 0.9 <= spacing[2] <= 1.2 and 3.0 <= spacing[1] <= 4.0
    assert abs(nx * spacing[0] - 300) < 2 and abs(nz * spacing[2] - 220) < 2 and 20 <= ny <= 30
    assert any(synth_case(i, 0).info["n_distractors"] > 0 for i in range(2))


def test_write_cohort_layout_and_dataset_json(tmp_path) -> None:
    config = dataclasses.replace(TINY, followup_fraction=0.5)
    out = write_cohort(tmp_path / "new" / "cohort", 4, seed=2, config=config)
    dataset = json.loads((out / "dataset.json").read_text())
    ids = sorted(dataset["patients"])
    assert dataset["numTraining"] == len(ids) > 4  # some follow-ups
    assert dataset["labels"] == {"background": 0, "femoral_head": 1, "necrosis": 2}
    assert dataset["channel_names"] == {"0": "T1"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["phantom"]["seed"] == 2 and PhantomConfig(**dataset["phantom"]["config"]) == config
    assert set(dataset["phantom"]["cases"]) == set(ids)
    for case_id in ids:
        assert (out / "imagesTr" / f"{case_id}_0000.nii.gz").is_file()
        label = nib.load(out / "labelsTr" / f"{case_id}.nii.gz")
        assert label.get_data_dtype() == np.uint8
    for case_id in (i for i in ids if i.endswith("_fu")):
        assert dataset["patients"][case_id] == dataset["patients"][case_id[:-3]]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_followup_keeps_anatomy_and_changes_the_scan() -> None:
    base = synth_case(6, 9, TINY)
    second = synth_case(6, 9, TINY, followup=True)
    assert second.case_id == "AVN_006_fu" and second.patient_id == base.patient_id == "P006"
    for key in ("necrosis", "lesions", "head_radius_mm", "distractors"):
        assert second.info[key] == base.info[key]
    assert second.info["snr"] != base.info["snr"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("snr", (20.0, 8.0), "PhantomConfig.snr must be a (lo, hi) pair with 0 < lo <= hi"),
        ("lesion_fraction", (0.1, 0.95), "got lesion_fraction=(0.1, 0.95)"),
        ("lesion_contrast", (0.0, 0.5), "PhantomConfig.lesion_contrast must be"),
        ("p_bilateral", 1.5, "PhantomConfig.p_bilateral must be in [0, 1], got p_bilateral=1.5"),
        ("p_unilateral", 0.8, "p_unilateral must be <= 1, got p_bilateral=0.35 + p_unilateral=0.8"),
        ("snr", 12.0, "PhantomConfig.snr must be a (lo, hi) pair"),
        ("fov_mm", (300.0, -1.0), "PhantomConfig.fov_mm must be two sizes > 0"),
        ("texture", "high", "PhantomConfig.texture must be in [0, 1], got texture='high'"),
        ("non_ras_fraction", -0.1, "PhantomConfig.non_ras_fraction must be in [0, 1]"),
        ("followup_fraction", 2, "PhantomConfig.followup_fraction must be in [0, 1]"),
        ("sub_slices", 0, "PhantomConfig.sub_slices must be an int in [1, 16], got sub_slices=0"),
        ("bias_strength", -1.0, "PhantomConfig.bias_strength must be in [0, 2], got bias_strength=-1.0"),
        ("translation_mm", (1.0, 2.0), "PhantomConfig.translation_mm must be three shifts >= 0"),
        ("head_radius_mm", (20.0,), "PhantomConfig.head_radius_mm must be a (lo, hi) pair"),
    ],
)
def test_bad_config_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PhantomConfig(**{field: value})


def test_config_accepts_lists_from_json() -> None:
    config = PhantomConfig.tiny(snr=[5, 9])
    assert config.snr == (5, 9)
    assert PhantomConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iter_cohort(0, 1), "cases must be an int >= 1, got cases=0"),
        (lambda: iter_cohort(2, -3), "seed must be an int >= 0, got seed=-3"),
        (lambda: write_cohort("/nonexistent/never", 0, 1), "cases must be an int >= 1, got cases=0"),
        (lambda: synth_case(0, -1), "seed must be an int >= 0, got seed=-1"),
        (lambda: synth_case(-2, 0), "index must be an int >= 0, got index=-2"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ---------------------------------------------------------------- the harder phantom (issue 12)
def _hips_and_mimics(index: int, seed: int, config: PhantomConfig = TINY):
    """The hips and mimic layers of one patient, rebuilt from the generator's own streams."""
    from avn_study.data import phantom

    anatomy_rng, _, mimic_rng = phantom._streams(index, seed, False)
    anatomy_rng.random()  # the follow-up draw
    scale = anatomy_rng.uniform(*config.body_scale)
    d = anatomy_rng.uniform(76, 86) * scale**0.3
    sides = {"right": 1, "left": -1}
    hips = {side: phantom._hip(anatomy_rng, config, s, d) for side, s in sides.items()}
    layers, drawn = phantom._mimics(mimic_rng, config, hips, sides, necrotic=set())  # healthy hips: mimics only
    return phantom, hips, layers, drawn


def _mask(phantom, terms: tuple, hip: dict) -> np.ndarray:
    """A region on a 1 mm patient-frame grid around a hip (pose identity)."""
    grid = phantom._Grid(np.asarray(hip["c"]) - 60.0, np.ones(3), (120, 120, 120))
    pose = phantom._Pose(np.eye(3), np.zeros(3))
    return phantom._labels(grid, pose, [(terms, 1)]).astype(bool)


def test_every_mimic_type_appears_and_lies_in_the_head_or_neck() -> None:
    config = PhantomConfig.tiny(oedema_with_lesion=0.0, mimic_mean=2.0)
    seen = set()
    for index in range(4):
        phantom, hips, layers, drawn = _hips_and_mimics(index, 5, config)
        assert len(layers) >= len(drawn)
        layer_of = iter(layers)
        for record in drawn:
            hip = hips[record["side"]]
            head = _mask(phantom, phantom._head(hip), hip)
            neck = _mask(phantom, ((hip["neck"], 0.0, False),), hip)
            mine = [next(layer_of) for _ in range(2 if record["type"] == "oedema" else 1)]
            region = np.logical_or.reduce([_mask(phantom, layer.terms, hip) for layer in mine])
            assert region.any(), record["type"]  # it is drawn
            allowed = head | neck if record["type"] == "oedema" else head
            assert not (region & ~allowed).any(), record["type"]  # never outside the head (or neck)
            seen.add(record["type"])
    assert seen == {"oedema", "cyst", "bone_island", "fovea"}


def test_mimics_are_darker_than_marrow_and_never_labelled_necrosis(cohort_default: list) -> None:
    darker, checked = 0, 0
    for case in cohort_default:
        label, image = to_ras(case.label, case.affine), to_ras(case.image, case.affine)
        marrow = np.median(image[label == 1])
        for mimic in case.info["mimics"]:
            if case.info["necrosis"][mimic["side"]]:
                continue  # a mimic may share a hip with a lesion; healthy hips make the point cleanly
            x, y, z = mimic["voxel_ras"]
            if not all(0 <= v < n for v, n in zip((x, y, z), label.shape, strict=True)):
                continue  # an off-centre case can move a hip out of the field of view
            checked += 1
            assert label[x, y, z] in ((1,) if mimic["region"] == "head" else (0, 1)), mimic
            darker += image[x, y, z] < marrow
        assert not (label == 2).any() or any(case.info["necrosis"].values())
    assert checked >= 10 and darker / checked > 0.8


@pytest.fixture(scope="module")
def cohort_default() -> list:
    """12 patients at the default resolution (about 4 s)."""
    return list(iter_cohort(12, seed=2))


def test_heads_are_ellipsoids_and_advanced_lesions_collapse_the_dome(cohort: list) -> None:
    axes = np.array([a for case in cohort for a in case.info["head_semi_axes_mm"]])
    ratios = axes.min(axis=1) / axes.max(axis=1)
    assert ratios.min() < 0.93 and ratios.max() <= 1.0  # not spheres
    collapsed = [(c, side) for c in cohort for side, v in c.info["collapse"].items() if v]
    assert collapsed and all(c.info["lesion_fraction"][side] >= TINY.collapse_fraction for c, side in collapsed)
    big = [(c, s) for c in cohort for s, f in c.info["lesion_fraction"].items() if f >= TINY.collapse_fraction]
    assert len(collapsed) == len(big)


def test_patient_position_varies_by_15_mm_and_some_cases_are_off_centre() -> None:
    cases = list(iter_cohort(60, seed=4, config=TINY))
    shifts = np.array([c.info["translation_mm"] for c in cases])
    assert shifts[:, 0].std() >= 15 and shifts[:, 2].std() >= 12
    assert 0 < sum(c.info["off_centre"] for c in cases) < 20
    assert np.ptp([c.info["body_scale"] for c in cases]) > 0.2


def test_some_lesions_have_no_rim(cohort: list) -> None:
    lesions = [v for c in cohort for v in c.info["lesions"].values() if v]
    no_rim = [v for v in lesions if v["no_rim"]]
    assert no_rim and all(v["rim"] == v["contrast"] for v in no_rim) and len(no_rim) < len(lesions)


def test_label_noise_is_off_by_default_and_bounded_when_on() -> None:
    clean = synth_case(3, 9, TINY)
    assert clean.info["label_noise"] == {}
    noisy = synth_case(3, 9, PhantomConfig.tiny(label_noise=True))
    assert np.array_equal(noisy.image, clean.image)  # the scan is the same; only its annotation changes
    necrosis_clean, necrosis_noisy = clean.label == 2, noisy.label == 2
    changed = necrosis_clean ^ necrosis_noisy
    assert changed.any() and sum(noisy.info["label_noise"].values()) >= 1
    near = ndimage.binary_dilation(necrosis_clean, structure=CUBE)
    missed = noisy.info["label_noise"]["missed"]
    assert missed or not (changed & ~near).any()  # jitter stays within one voxel of the clean boundary
    assert (noisy.label[clean.label == 0] == 0).all()  # never outside the head


def test_a_cohort_written_before_the_harder_phantom_still_verifies_and_trains(tmp_path) -> None:
    from pathlib import Path

    from avn_study.cli.commands import main
    from avn_study.config import TrainConfig
    from avn_study.training.fold import prepare_data

    legacy = Path(__file__).parent / "legacy_phantom"
    assert main(["verify", str(legacy)]) == 0
    config = TrainConfig.from_flat({"n_folds": 2, "slice_size": 64, "inplane_spacing_mm": 4.0, "depth": 2})
    data = prepare_data(legacy, config, tmp_path / "cache", tmp_path / "splits.json")
    assert len(data.train) == 1 and len(data.val) == 1
