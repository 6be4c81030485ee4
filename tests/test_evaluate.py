"""Clinical metrics (per hip, necrotic fraction, IoU lesion hits, surface Dice) and ``avn-study evaluate``."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_predict import make_bundle

from avn_study.cli.commands import main
from avn_study.metrics.case import dice
from avn_study.metrics.clinical import (
    fraction_bin,
    hip_midline,
    hip_rows,
    hip_summary,
    lesion_detection_iou,
    surface_dice,
)

SPACING = (1.0, 1.0, 1.0)


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


# ------------------------------------------------------------------------------------------ clinical metrics
def test_surface_dice_tolerance_and_empty_rule() -> None:
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    shifted = np.roll(ref, 1, axis=0)
    assert surface_dice(ref, ref, SPACING, 0.0) == 1.0
    assert surface_dice(shifted, ref, SPACING, 1.0) == 1.0  # every surface voxel within 1 mm
    assert 0.0 < surface_dice(shifted, ref, SPACING, 0.0) < 1.0
    assert surface_dice(shifted, ref, (2.0, 1.0, 1.0), 1.0) < 1.0  # the same shift is 2 mm along a thick axis
    empty = np.zeros_like(ref)
    assert surface_dice(empty, empty, SPACING) == 1.0 and surface_dice(ref, empty, SPACING) == 0.0
    with pytest.raises(ValueError, match="tau_mm must be >= 0"):
        surface_dice(ref, ref, SPACING, -1.0)


def test_lesion_detection_needs_the_minimum_overlap() -> None:
    ref = np.zeros((30, 30, 30), bool)
    ref[2:12, 2:12, 2:12] = True  # 1000 voxels
    ref[20:24, 20:24, 20:24] = True  # 64 voxels
    pred = np.zeros_like(ref)
    pred[2, 2, 2] = True  # one voxel of the big lesion: a hit for training's rule, not here
    pred[20:24, 20:24, 21:25] = True  # IoU 48/80 = 0.6 with the small lesion
    pred[27:29, 27:29, 27:29] = True  # touches nothing: a false positive
    sensitivity, n_fp, n_ref = lesion_detection_iou(pred, ref, 0.1)
    assert (sensitivity, n_fp, n_ref) == (0.5, 2, 2)  # the one-voxel blob is below the IoU as well
    assert lesion_detection_iou(pred, ref, 0.0005)[:2] == (1.0, 1)
    assert math.isnan(lesion_detection_iou(pred, np.zeros_like(ref))[0])
    with pytest.raises(ValueError, match="min_iou"):
        lesion_detection_iou(pred, ref, 0.0)


def test_fraction_bins_follow_the_staging_cut_offs() -> None:
    assert [fraction_bin(f) for f in (0.0, 0.1499, 0.15, 0.2999, 0.30, 0.9)] == [0, 0, 1, 1, 2, 2]
    assert math.isnan(fraction_bin(math.nan))


def _two_hips():
    shape = (40, 12, 16)
    right_head = _ball(shape, (30, 6, 8), 5)  # R index 30: the patient's right (RAS)
    left_head = _ball(shape, (9, 6, 8), 5)
    necrosis = right_head & (np.indices(shape)[2] >= 10)  # the top of the right head
    return right_head | left_head, necrosis, right_head, left_head


def test_hip_midline_from_the_reference_heads_then_the_grid() -> None:
    head, _, right, _ = _two_hips()
    assert hip_midline(head.shape, head, None) == (pytest.approx(19.5), "reference heads")
    assert hip_midline(head.shape, None, head)[1] == "predicted heads"
    assert hip_midline(head.shape, right, None) == (19.5, "grid centre")  # one head only: no midline from it


def test_hip_rows_give_the_necrotic_fraction_of_each_head() -> None:
    head, necrosis, right, _ = _two_hips()
    spacing = (2.0, 3.0, 2.0)
    ml = 12.0 / 1000.0
    pred = necrosis & (np.indices(head.shape)[2] >= 11)  # under-segmented
    rows = {r["hip"]: r for r in hip_rows(pred, necrosis, head, spacing, has_head_labels=True, min_volume_ml=0.0)}
    r, left_row = rows["right"], rows["left"]
    assert r["ref_head_ml"] == pytest.approx(right.sum() * ml)
    assert r["ref_fraction"] == pytest.approx(necrosis.sum() / right.sum())
    assert r["pred_fraction"] == pytest.approx(pred.sum() / right.sum())
    assert r["fraction_abs_error"] == pytest.approx((necrosis.sum() - pred.sum()) / right.sum())
    assert r["ref_bin"] == fraction_bin(necrosis.sum() / right.sum())
    assert r["dice"] == pytest.approx(dice(pred, necrosis)) and r["ref_positive"] == r["pred_positive"] == 1.0
    assert left_row["ref_fraction"] == 0.0 and left_row["dice"] == 1.0 and left_row["ref_positive"] == 0.0
    summary = hip_summary(list(rows.values()))
    assert summary["hip_sensitivity"] == 1.0 and summary["hip_specificity"] == 1.0
    assert summary["n_hips"] == 2 and summary["n_hips_positive"] == 1
    unlabelled = hip_rows(pred, necrosis, head, spacing, has_head_labels=False)
    assert all(math.isnan(row["ref_fraction"]) and row["midline_from"] == "grid centre" for row in unlabelled)


def test_hip_detection_uses_the_volume_threshold() -> None:
    head, necrosis, _, _ = _two_hips()
    speck = np.zeros_like(necrosis)
    speck[9, 6, 8] = True  # one voxel in the left (healthy) hip: 0.001 ml
    rows = hip_rows(necrosis | speck, necrosis, head, SPACING, has_head_labels=True, min_volume_ml=0.01)
    assert [r["pred_positive"] for r in rows] == [1.0, 0.0]
    rows = hip_rows(necrosis | speck, necrosis, head, SPACING, has_head_labels=True, min_volume_ml=0.0)
    assert hip_summary(rows)["hip_specificity"] == 0.0


# ------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("eval-bundle") / "b", seed=1)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_evaluate_scores_what_predict_writes_in_the_scans_own_grid(
    bundle: Path, tiny_phantom: Path, tmp_path: Path, capsys
) -> None:
    from avn_study.metrics.case import case_metrics

    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle), str(tiny_phantom), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "case(s) of" in printed and "labelsTr" in printed and "bin agreement" in printed
    cases, hips = _rows(out / "per_case.csv"), _rows(out / "per_hip.csv")
    summary = json.loads((out / "summary.json").read_text())
    images = sorted((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))
    assert len(cases) == len(images) == summary["n_cases"] and len(hips) == 2 * len(cases)
    assert {h["hip"] for h in hips} == {"right", "left"}
    assert summary["subset"] == "Tr" and summary["written_by"] == "avn-study evaluate"
    # independently: predict's label maps against the label files, in their own voxel grid
    assert (
        main(["predict", str(bundle), str(tiny_phantom / "imagesTr"), str(tmp_path / "pred"), "--device", "cpu"]) == 0
    )
    for row in cases:
        written = nib.load(tmp_path / "pred" / f"{row['case']}.nii.gz")
        label = nib.load(tiny_phantom / "labelsTr" / f"{row['case']}.nii.gz")
        spacing = tuple(float(z) for z in label.header.get_zooms()[:3])
        expected = case_metrics(np.asarray(written.dataobj) == 2, np.asarray(label.dataobj) == 2, spacing)
        assert float(row["dice"]) == pytest.approx(expected["dice"], abs=1e-12), row["case"]
        assert float(row["pred_volume_ml"]) == pytest.approx(expected["pred_volume_ml"])


def test_a_perfect_prediction_scores_perfectly(bundle: Path, tiny_phantom: Path, tmp_path: Path, monkeypatch) -> None:
    """The reference as the prediction: every overlap 1, every fraction exact, every hip right."""
    from avn_study.bundle import predict as predict_module
    from avn_study.bundle.evaluate import evaluate_bundle
    from avn_study.data.preprocess import inplane_shape, resample_labels

    real = predict_module.predict_volume
    truth: dict[str, np.ndarray] = {}

    def oracle(bundle_, image, geometry, device=None, batch_size=32, options=None, extra=()):
        prediction = real(bundle_, image, geometry, device, batch_size, options, extra)
        label = truth["label"]
        shape = inplane_shape(label.shape, geometry.ras_spacing, bundle_.preprocess.inplane_spacing_mm)
        prediction.grid["seg"] = (np.moveaxis(resample_labels(label, shape), 1, 0) == 2).astype(np.float32)
        prediction.labels = label.copy()
        return prediction

    from avn_study.data import verify

    real_check = verify.check_case

    def remember(case, label_map=verify.CANONICAL):
        volumes, problems = real_check(case, label_map)
        truth["label"] = volumes.label
        return volumes, problems

    monkeypatch.setattr(predict_module, "predict_volume", oracle)
    monkeypatch.setattr(verify, "check_case", remember)
    summary = evaluate_bundle(bundle, tiny_phantom, tmp_path / "eval", device="cpu")
    assert summary["native"]["val_dice"] == 1.0 and summary["native"]["hd95_mm"] == 0.0
    assert summary["training_grid"]["grid_dice"] == 1.0 and summary["surface_dice"] == 1.0
    hips = summary["hips"]
    assert hips["hip_sensitivity"] == 1.0 and hips["bin_agreement"] == 1.0 and hips["fraction_mae"] == 0.0
    assert hips["lesion_sensitivity_iou"] == 1.0 and hips["lesion_fp_iou"] == 0.0
    if hips["n_hips"] > hips["n_hips_positive"]:
        assert hips["hip_specificity"] == 1.0
    assert {r["midline_from"] for r in _rows(tmp_path / "eval" / "per_hip.csv")} == {"reference heads"}


def test_evaluate_prefers_the_test_set_and_refuses_bad_input(
    bundle: Path, tiny_phantom: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "cohort"
    shutil.copytree(tiny_phantom, data)
    (data / "imagesTs").mkdir()
    (data / "labelsTs").mkdir()
    for case in ("AVN_000", "AVN_001"):
        shutil.copy(data / "imagesTr" / f"{case}_0000.nii.gz", data / "imagesTs")
        shutil.copy(data / "labelsTr" / f"{case}.nii.gz", data / "labelsTs")
    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle), str(data), "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subset"] == "Ts" and summary["n_cases"] == 2
    # an existing evaluation is replaced only with --overwrite; a foreign folder never
    assert main(["evaluate", str(bundle), str(data), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["evaluate", str(bundle), str(data), "--out", str(foreign), "--overwrite"]) == 2
    assert "replaces only an evaluation" in capsys.readouterr().err and (foreign / "notes.txt").exists()
    assert main(["evaluate", str(bundle), str(data), "--out", str(tmp_path / "x"), "--min-iou", "0"]) == 2
    assert "--min-iou must be in (0, 1]" in capsys.readouterr().err
    # a broken reference: every problem named, nothing written
    label = data / "labelsTs" / "AVN_001.nii.gz"
    image = nib.load(label)
    bad = np.asarray(image.dataobj).astype(np.uint8)
    bad[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(bad, image.affine), label)
    assert main(["evaluate", str(bundle), str(data), "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "labelsTs/AVN_001.nii.gz: label values [9] are not in dataset.json's labels" in err
    assert not (tmp_path / "y").exists()
    assert main(["verify", str(data)]) == 2  # verify checks the labelled test set too
    assert "labelsTs/AVN_001.nii.gz: label values [9]" in capsys.readouterr().err
