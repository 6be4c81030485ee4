"""Per-case 3D metrics: hand-computed values, the empty-mask rule, and an independent HD95."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from avn_study.metrics.case import (
    EMPTY_RULE,
    case_metrics,
    dice,
    hd95_mm,
    lesion_detection,
    psnr,
    summarize,
)

ANISO = (3.5, 2.0, 2.0)  # thick slices along axis 0, mm


def volume(shape: tuple[int, int, int] = (10, 10, 10), *boxes: tuple[slice, ...]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for box in boxes:
        mask[box] = True
    return mask


def box(i0: int, i1: int, j0: int, j1: int, k0: int, k1: int) -> tuple[slice, slice, slice]:
    return np.s_[i0:i1, j0:j1, k0:k1]


# ---------------------------------------------------------------------------------------------- Dice

DICE_CASES = [
    # (pred, ref, expected): 1D/2D toys are enough for Dice, which has no geometry
    ([1, 1, 0, 0], [1, 0, 0, 0], 2 * 1 / (2 + 1)),
    ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
    ([1, 1, 0, 0], [0, 0, 1, 1], 0.0),
    ([[1, 1, 1], [0, 0, 0]], [[0, 1, 1], [1, 0, 0]], 2 * 2 / (3 + 3)),
    ([[1, 1, 1], [1, 1, 1]], [[1, 0, 0], [0, 0, 0]], 2 * 1 / (6 + 1)),
]


@pytest.mark.parametrize(("pred", "ref", "expected"), DICE_CASES)
def test_dice_hand_computed(pred: list, ref: list, expected: float) -> None:
    assert dice(np.array(pred, bool), np.array(ref, bool)) == pytest.approx(expected)


def test_dice_accepts_integer_masks() -> None:
    assert dice(np.array([0, 1, 1], np.uint8), np.array([0, 1, 0], np.int64)) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ empty-mask rule

LESION = box(3, 5, 3, 5, 3, 5)
EMPTY_CASES = [
    # (pred has lesion, ref has lesion, dice, hd95, sensitivity, lesion_fp, has_necrosis)
    pytest.param(False, False, 1.0, 0.0, math.nan, 0, 0.0, id="both-empty"),
    pytest.param(True, False, 0.0, math.nan, math.nan, 1, 0.0, id="false-positive-on-healthy"),
    pytest.param(False, True, 0.0, math.nan, 0.0, 0, 1.0, id="missed-necrosis"),
    pytest.param(True, True, 1.0, 0.0, 1.0, 0, 1.0, id="both-present"),
]


def _same(actual: float, expected: float) -> bool:
    return math.isnan(actual) if math.isnan(expected) else actual == pytest.approx(expected)


@pytest.mark.parametrize(("has_pred", "has_ref", "exp_dice", "exp_hd", "exp_sens", "exp_fp", "exp_nec"), EMPTY_CASES)
def test_empty_rule_every_metric(
    has_pred: bool,
    has_ref: bool,
    exp_dice: float,
    exp_hd: float,
    exp_sens: float,
    exp_fp: int,
    exp_nec: float,
) -> None:
    pred = volume((10, 10, 10), *([LESION] if has_pred else []))
    ref = volume((10, 10, 10), *([LESION] if has_ref else []))
    assert _same(dice(pred, ref), exp_dice)
    assert _same(hd95_mm(pred, ref, ANISO), exp_hd)
    sens, n_fp, n_ref = lesion_detection(pred, ref)
    assert _same(sens, exp_sens)
    assert (n_fp, n_ref) == (exp_fp, int(has_ref))
    m = case_metrics(pred, ref, ANISO, pred_loc=pred, ref_loc=ref)
    assert _same(m["dice"], exp_dice) and _same(m["loc_dice"], exp_dice)
    assert _same(m["hd95_mm"], exp_hd)
    assert _same(m["lesion_sensitivity"], exp_sens)
    assert m["lesion_fp"] == exp_fp
    assert m["has_necrosis"] == exp_nec


def test_empty_rule_text_states_every_metric() -> None:
    for word in ("Dice is 1.0", "0.0", "HD95", "NaN", "n_hd95_undefined", "lesion_fp", "val_dice"):
        assert word in EMPTY_RULE


# ---------------------------------------------------------------------------------------------- HD95

HD95_CASES = [
    # A line of 10 voxels against its end voxel. Directed line->point: 0, s, ..., 9s; the 95th
    # percentile (linear) sits at rank 0.95 * 9 = 8.55 -> 8.55 s. point->line is 0. The pooled
    # percentile would be rank 0.95 * 10 = 9.5 of [0, 0, s, ..., 9s] -> 8.5 s, so this case tells
    # the two definitions apart.
    pytest.param(
        volume((12, 3, 3), box(1, 11, 1, 2, 1, 2)),
        volume((12, 3, 3), box(1, 2, 1, 2, 1, 2)),
        ANISO,
        8.55 * 3.5,
        id="line-axis0-max-of-directed",
    ),
    pytest.param(
        volume((3, 12, 3), box(1, 2, 1, 11, 1, 2)),
        volume((3, 12, 3), box(1, 2, 1, 2, 1, 2)),
        ANISO,
        8.55 * 2.0,
        id="line-axis1-max-of-directed",
    ),
    # One-voxel plates two voxels apart along the 3.5 mm axis: every distance is 7.0 mm.
    pytest.param(
        volume((8, 6, 6), box(1, 2, 1, 5, 1, 5)),
        volume((8, 6, 6), box(3, 4, 1, 5, 1, 5)),
        ANISO,
        7.0,
        id="plates-shift2-axis0",
    ),
    # Plates shifted in-plane by 2 voxels of 2 mm: per column the distances are 4, 2, 0, 0 mm ->
    # rank 0.95 * 15 = 14.25 of four 4.0s at the top -> 4.0.
    pytest.param(
        volume((3, 8, 6), box(1, 2, 0, 4, 1, 5)),
        volume((3, 8, 6), box(1, 2, 2, 6, 1, 5)),
        ANISO,
        4.0,
        id="plates-shift2-axis1",
    ),
    # 2x2x2 boxes (all voxels are surface) shifted by 2 voxels of 3.5 mm: directed distances are
    # four 3.5s and four 7.0s each way -> rank 6.65 -> 7.0.
    pytest.param(
        volume((8, 6, 6), box(1, 3, 2, 4, 2, 4)),
        volume((8, 6, 6), box(3, 5, 2, 4, 2, 4)),
        ANISO,
        7.0,
        id="box2-shift2-axis0",
    ),
    # 3x3x3 boxes shifted by 2 voxels of 3.5 mm: of the 26 surface voxels, the 9 of the shared
    # face are at 0, the 8 of the middle ring at 3.5, the 9 of the far face at 7.0 -> rank 23.75 -> 7.0.
    pytest.param(
        volume((9, 7, 7), box(1, 4, 2, 5, 2, 5)),
        volume((9, 7, 7), box(3, 6, 2, 5, 2, 5)),
        ANISO,
        7.0,
        id="box3-shift2-axis0",
    ),
    pytest.param(
        volume((7, 7, 9), box(2, 5, 2, 5, 1, 4)),
        volume((7, 7, 9), box(2, 5, 2, 5, 3, 6)),
        ANISO,
        4.0,
        id="box3-shift2-axis2",
    ),
    pytest.param(
        volume((9, 7, 7), box(1, 4, 2, 5, 2, 5)),
        volume((9, 7, 7), box(1, 4, 2, 5, 2, 5)),
        ANISO,
        0.0,
        id="identical",
    ),
]


@pytest.mark.parametrize(("pred", "ref", "spacing", "expected"), HD95_CASES)
def test_hd95_known_geometry(pred: np.ndarray, ref: np.ndarray, spacing: tuple, expected: float) -> None:
    assert hd95_mm(pred, ref, spacing) == pytest.approx(expected)
    assert hd95_mm(ref, pred, spacing) == pytest.approx(expected)  # symmetric


def _surface_points_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Surface voxels (a 6-neighbour outside, array edge outside) found by shifting, in mm."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_inside = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            all_inside &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & ~all_inside) * np.asarray(spacing)


def _brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    p, r = _surface_points_mm(pred, spacing), _surface_points_mm(ref, spacing)
    p_to_r = cKDTree(r).query(p)[0]
    r_to_p = cKDTree(p).query(r)[0]
    return float(max(np.percentile(p_to_r, 95), np.percentile(r_to_p, 95)))


def _blob(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) > level


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [ANISO, (1.0, 0.7, 2.5)])
def test_hd95_matches_brute_force_on_random_blobs(seed: int, spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(seed)
    shape = (10, 24, 20)
    pred, ref = _blob(rng, shape, 0.1), _blob(rng, shape, 0.1)  # touch the array edge too
    assert pred.any() and ref.any()
    assert hd95_mm(pred, ref, spacing) == pytest.approx(_brute_force_hd95(pred, ref, spacing), rel=1e-9)


def test_hd95_does_not_depend_on_the_field_of_view() -> None:
    rng = np.random.default_rng(7)
    pred, ref = _blob(rng, (8, 16, 16), 0.15), _blob(rng, (8, 16, 16), 0.15)
    big_pred, big_ref = np.zeros((30, 60, 50), bool), np.zeros((30, 60, 50), bool)
    big_pred[11:19, 20:36, 9:25], big_ref[11:19, 20:36, 9:25] = pred, ref
    # inside the big volume the former array edge is no longer surface; compare to brute force there
    assert hd95_mm(big_pred, big_ref, ANISO) == pytest.approx(_brute_force_hd95(big_pred, big_ref, ANISO))


def test_hd95_on_a_full_size_volume() -> None:
    shape = (30, 160, 128)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ref = ((z - 15) * 3.5) ** 2 + ((y - 80) * 2.0) ** 2 + ((x - 64) * 2.0) ** 2 <= 40.0**2
    pred = ((z - 16) * 3.5) ** 2 + ((y - 83) * 2.0) ** 2 + ((x - 60) * 2.0) ** 2 <= 38.0**2
    assert 0.0 < hd95_mm(pred, ref, ANISO) < 20.0


# --------------------------------------------------------------------------------- volumes and lesions


def test_volumes_in_ml_use_anisotropic_spacing() -> None:
    ref = volume((10, 10, 10), box(2, 4, 2, 7, 2, 3))  # 2 * 5 * 1 = 10 voxels
    pred = volume((10, 10, 10), box(2, 4, 2, 4, 2, 3))  # 4 voxels
    m = case_metrics(pred, ref, ANISO)
    voxel_ml = 3.5 * 2.0 * 2.0 / 1000.0  # 0.014 ml
    assert m["ref_volume_ml"] == pytest.approx(10 * voxel_ml)
    assert m["pred_volume_ml"] == pytest.approx(4 * voxel_ml)
    assert m["volume_error_ml"] == pytest.approx(-6 * voxel_ml)  # signed: predicted minus reference
    assert m["abs_volume_error_ml"] == pytest.approx(6 * voxel_ml)


def test_lesion_detection_with_several_components() -> None:
    ref = volume((12, 12, 12), box(1, 3, 1, 3, 1, 3), box(7, 9, 7, 9, 7, 9))  # two lesions
    pred = volume(
        (12, 12, 12),
        box(2, 4, 2, 4, 2, 4),  # overlaps the first lesion partly: detected
        box(0, 1, 10, 12, 0, 2),  # false positive
        box(10, 12, 0, 1, 10, 12),  # false positive
    )  # the second lesion is missed
    assert lesion_detection(pred, ref) == (0.5, 2, 2)
    m = case_metrics(pred, ref, ANISO)
    assert (m["lesion_sensitivity"], m["lesion_fp"], m["n_ref_lesions"]) == (0.5, 2.0, 2.0)


def test_one_predicted_component_can_detect_two_lesions() -> None:
    ref = volume((12, 12, 12), box(1, 3, 1, 3, 1, 3), box(1, 3, 7, 9, 1, 3))
    pred = volume((12, 12, 12), box(2, 3, 2, 8, 2, 3))  # a bar joining both
    assert lesion_detection(pred, ref) == (1.0, 0, 2)


CONNECTIVITY_CASES = [
    # second voxel relative to (2, 2, 2): corner and edge neighbours join under 26-connectivity
    pytest.param((3, 3, 3), 1, id="corner"),
    pytest.param((3, 3, 2), 1, id="edge"),
    pytest.param((3, 2, 2), 1, id="face"),
    pytest.param((4, 2, 2), 2, id="gap"),
    pytest.param((4, 4, 4), 2, id="diagonal-gap"),
]


@pytest.mark.parametrize(("other", "n_lesions"), CONNECTIVITY_CASES)
def test_lesions_are_26_connected(other: tuple[int, int, int], n_lesions: int) -> None:
    ref = np.zeros((6, 6, 6), bool)
    ref[2, 2, 2] = ref[other] = True
    pred = np.zeros_like(ref)
    pred[2, 2, 2] = True
    sens, n_fp, n_ref = lesion_detection(pred, ref)
    assert (n_ref, n_fp) == (n_lesions, 0)
    assert sens == pytest.approx(1.0 / n_lesions)
    assert lesion_detection(ref, np.zeros_like(ref))[1] == n_lesions  # the same rule for FPs


# ---------------------------------------------------------------------------------------------- PSNR

PSNR_CASES = [
    # ref range 3, MSE = 1 / 4 -> 10 log10(9 / 0.25) = 10 log10(36)
    pytest.param([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 4.0], None, 10 * math.log10(36.0), id="inferred-range"),
    pytest.param([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 4.0], 1.0, 10 * math.log10(4.0), id="given-range"),
    # MSE = (0.5^2 * 4) / 4 = 0.25, range 2 -> 10 log10(16)
    pytest.param([[0.0, 2.0], [1.0, 1.0]], [[0.5, 1.5], [1.5, 0.5]], None, 10 * math.log10(16.0), id="2d"),
    pytest.param([0.0, 1.0], [0.0, 1.0], None, math.inf, id="identical"),
    pytest.param([1.0, 1.0], [1.0, 2.0], None, math.nan, id="constant-ref-no-range"),
]


@pytest.mark.parametrize(("ref", "pred", "data_range", "expected"), PSNR_CASES)
def test_psnr_hand_computed(ref: list, pred: list, data_range: float | None, expected: float) -> None:
    value = psnr(np.array(pred), np.array(ref), data_range)
    assert _same(value, expected)


# ------------------------------------------------------------------------------------------ case dict


def test_case_metrics_keys_and_plain_floats() -> None:
    rng = np.random.default_rng(0)
    ref = volume((8, 12, 12), box(2, 5, 3, 8, 3, 8))
    pred = volume((8, 12, 12), box(2, 5, 4, 9, 3, 8))
    image = rng.normal(size=ref.shape)
    base = {
        "dice",
        "hd95_mm",
        "volume_error_ml",
        "abs_volume_error_ml",
        "ref_volume_ml",
        "pred_volume_ml",
        "lesion_sensitivity",
        "lesion_fp",
        "n_ref_lesions",
        "has_necrosis",
    }
    assert set(case_metrics(pred, ref, ANISO)) == base
    full = case_metrics(pred, ref, ANISO, pred_loc=ref, ref_loc=ref, recon=image + 0.1, recon_ref=image)
    assert set(full) == base | {"loc_dice", "recon_psnr"}
    assert all(type(v) is float for v in full.values())
    assert json.loads(json.dumps(full)) == full
    assert full["loc_dice"] == 1.0
    assert full["recon_psnr"] == pytest.approx(psnr(image + 0.1, image))


# ------------------------------------------------------------------------------------------ summarize


def _case(dice_: float, hd: float, nec: float, fp: float, sens: float, **extra: float) -> dict[str, float]:
    return {
        "dice": dice_,
        "hd95_mm": hd,
        "has_necrosis": nec,
        "lesion_fp": fp,
        "lesion_sensitivity": sens,
        **extra,
    }


def test_summarize_mixes_healthy_and_necrotic_cases() -> None:
    cases = [
        _case(0.6, 4.0, 1.0, 1.0, 1.0, loc_dice=0.9),
        _case(0.8, 8.0, 1.0, 0.0, 0.5, loc_dice=0.7),
        _case(1.0, 0.0, 0.0, 0.0, math.nan),  # healthy, predicted healthy
        _case(0.0, math.nan, 0.0, 3.0, math.nan),  # healthy, false positives
    ]
    s = summarize(cases)
    assert s["val_dice"] == pytest.approx(0.7)  # necrotic cases only
    assert s["val_dice_all"] == pytest.approx((0.6 + 0.8 + 1.0 + 0.0) / 4)
    assert (s["n_cases"], s["n_cases_necrosis"], s["n_hd95_undefined"]) == (4.0, 2.0, 1.0)
    assert s["hd95_mm"] == pytest.approx(4.0)  # (4 + 8 + 0) / 3 defined cases
    assert s["lesion_fp"] == pytest.approx(1.0)  # per case, all cases
    assert s["lesion_sensitivity"] == pytest.approx(0.75)
    assert s["loc_dice"] == pytest.approx(0.8)  # over the cases that have it
    assert "recon_psnr" not in s and "dice" not in s and "has_necrosis" not in s
    assert all(type(v) is float for v in s.values())


def test_summarize_all_healthy_gives_nan_tuning_metric() -> None:
    s = summarize([_case(1.0, 0.0, 0.0, 0.0, math.nan), _case(0.0, math.nan, 0.0, 2.0, math.nan)])
    assert math.isnan(s["val_dice"]) and math.isnan(s["lesion_sensitivity"])
    assert s["val_dice_all"] == 0.5 and s["n_cases_necrosis"] == 0.0


def test_summarize_of_case_metrics_end_to_end() -> None:
    ref = volume((10, 10, 10), LESION)
    healthy = np.zeros_like(ref)
    cases = [
        case_metrics(ref, ref, ANISO),
        case_metrics(healthy, healthy, ANISO),
        case_metrics(healthy, ref, ANISO),
    ]
    s = summarize(cases)
    assert s["val_dice"] == 0.5 and s["val_dice_all"] == pytest.approx(2 / 3)
    assert s["n_hd95_undefined"] == 1.0 and s["hd95_mm"] == 0.0


# ------------------------------------------------------------------------------------------ bad input

SHAPE_MISMATCH = [
    pytest.param(lambda a, b: dice(a, b), id="dice"),
    pytest.param(lambda a, b: hd95_mm(a, b, ANISO), id="hd95"),
    pytest.param(lambda a, b: lesion_detection(a, b), id="lesions"),
    pytest.param(lambda a, b: psnr(a.astype(float), b.astype(float)), id="psnr"),
    pytest.param(lambda a, b: case_metrics(a, b, ANISO), id="case_metrics"),
]


@pytest.mark.parametrize("call", SHAPE_MISMATCH)
def test_shape_mismatch_names_both_shapes(call) -> None:
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        call(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool))


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (3.5, -2.0, 2.0), (1.0, 1.0), (1.0, math.nan, 1.0)])
def test_bad_spacing_is_rejected(spacing: tuple) -> None:
    mask = volume((6, 6, 6), box(1, 3, 1, 3, 1, 3))
    with pytest.raises(ValueError, match="spacing must be three finite positive"):
        hd95_mm(mask, mask, spacing)
    with pytest.raises(ValueError, match="spacing must be three finite positive"):
        case_metrics(mask, mask, spacing)


BAD_INPUTS = [
    pytest.param(lambda m: dice(m.astype(float), m), TypeError, "bool or integer mask", id="float-mask"),
    pytest.param(lambda m: hd95_mm(m[0], m[0], ANISO), ValueError, "3D volumes", id="2d-hd95"),
    pytest.param(
        lambda m: case_metrics(m, m, ANISO, pred_loc=m),
        ValueError,
        "pred_loc and ref_loc",
        id="loc-without-ref",
    ),
    pytest.param(
        lambda m: case_metrics(m, m, ANISO, recon_ref=m),
        ValueError,
        "recon and recon_ref",
        id="recon-without-pred",
    ),
    pytest.param(lambda m: psnr(m, m, data_range=0.0), ValueError, "data_range must be", id="zero-range"),
    pytest.param(lambda m: summarize([]), ValueError, "at least one case", id="summarize-empty"),
    pytest.param(lambda m: summarize([{"dice": 1.0}]), ValueError, "lacks", id="summarize-missing-keys"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_INPUTS)
def test_bad_inputs_say_what_is_wrong(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call(volume((6, 6, 6), box(1, 3, 1, 3, 1, 3)))


def test_calibration_counts_bin_the_probabilities_exactly() -> None:
    from avn_study.metrics.case import calibration_counts

    prob = np.array([0.0, 0.05, 0.15, 0.95, 1.0, 0.55])
    ref = np.array([0, 0, 1, 1, 1, 0], bool)
    counts = calibration_counts(prob, ref)
    assert counts["count"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert counts["positive"] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert counts["prob_sum"][9] == pytest.approx(1.95) and counts["prob_sum"][0] == pytest.approx(0.05)
    region = np.array([1, 1, 1, 0, 0, 0], bool)
    assert sum(calibration_counts(prob, ref, region)["count"]) == 3
    with pytest.raises(ValueError, match="same shape"):
        calibration_counts(prob, ref[:3])
