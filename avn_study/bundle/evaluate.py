"""``avn-study evaluate BUNDLE DATA``: score a bundle on a labelled cohort, in each scan's own geometry.

For every labelled case of ``DATA`` (``imagesTs``/``labelsTs`` when the folder has them, else
``imagesTr``/``labelsTr``; ``--subset`` chooses), the case goes through ``verify``'s checks with the
cohort's own label map, the bundle predicts it exactly as ``avn-study predict`` does, and:

- **native** metrics (the primary ones) compare the label map predict would write with the reference
  in the scan's own voxel grid and spacing: Dice, HD95, volumes, lesions (training's rule), plus
  surface Dice and lesion detection with a minimum IoU (:mod:`avn_study.metrics.clinical`);
- **training-grid** metrics (``grid_dice``, ``grid_hd95_mm``) compare the probabilities pasted into the
  resampled grid with the reference resampled as the cache does: the numbers a trial's validation
  reports. The two differ by the resampling of the prediction back to the scan (thin structures at
  thick slices and coarse in-plane spacing gain or lose boundary voxels) and by the reference
  being the original, not a resampled, mask;
- **per hip** (right/left): necrotic fraction of the femoral head with the ARCO/Steinberg bins,
  hip-level detection, surface Dice.

Outputs (``--out``, a new or empty folder, or one evaluate wrote with ``--overwrite``): ``per_case.csv``,
``per_hip.csv`` and ``summary.json``, written into a staged folder that replaces ``--out`` at the end.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from avn_study.data.labels import LABELS
from avn_study.data.layout import DATASET_JSON, IMAGES_TS, LABELS_TR, LABELS_TS, scan_cohort
from avn_study.data.problems import format_problems
from avn_study.errors import DataError, UsageError
from avn_study.metrics.clinical import hip_rows, hip_summary, lesion_detection_iou, surface_dice

WRITTEN_BY = "avn-study evaluate"


def is_evaluation(path: Path) -> bool:
    """Whether ``path`` is a folder evaluate wrote (what ``--overwrite`` may replace)."""
    from avn_study.outputs import json_marker

    return json_marker(Path(path) / "summary.json", "written_by", WRITTEN_BY)


def pick_subset(data: Path, subset: str) -> str:
    """``auto``: ``Ts`` when ``DATA`` has ``imagesTs`` and ``labelsTs``, else ``Tr``."""
    if subset != "auto":
        return subset
    return "Ts" if (data / IMAGES_TS).is_dir() and (data / LABELS_TS).is_dir() else "Tr"


def score_case(
    bundle: Any,
    volumes: Any,
    device: Any,
    *,
    min_volume_ml: float,
    min_iou: float,
    tau_mm: float,
    has_head_labels: bool,
    options: Any = None,
    order: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One checked case (``verify.CaseVolumes``): its per-case row and its two per-hip rows. ``order``
    picks the case's channels the bundle reads, in the bundle's order (default: all, as they are)."""
    from avn_study.bundle.predict import predict_volume
    from avn_study.data.preprocess import inplane_shape, resample_labels
    from avn_study.metrics.case import case_metrics, hd95_mm
    from avn_study.metrics.case import dice as dice_of

    geometry, case = volumes.geometry, volumes.case
    channels = [volumes.channels[i] for i in (order if order is not None else range(len(volumes.channels)))]
    prediction = predict_volume(bundle, channels[0], geometry, device, options=options, extra=tuple(channels[1:]))
    spacing = geometry.ras_spacing
    pred, ref = prediction.labels == LABELS["necrosis"], volumes.label == LABELS["necrosis"]
    row: dict[str, Any] = {"case": case.case_id, "patient": case.patient_id}
    row.update(case_metrics(pred, ref, spacing))
    row["surface_dice"] = surface_dice(pred, ref, spacing, tau_mm)
    sensitivity, n_fp, _ = lesion_detection_iou(pred, ref, min_iou)
    row.update(lesion_sensitivity_iou=sensitivity, lesion_fp_iou=float(n_fp))
    shape = inplane_shape(volumes.label.shape, spacing, bundle.preprocess.inplane_spacing_mm)
    grid_ref = np.moveaxis(resample_labels(volumes.label, shape), 1, 0) == LABELS["necrosis"]  # (A, R', S')
    grid_pred = prediction.grid["seg"] >= bundle.threshold
    row["grid_dice"] = dice_of(grid_pred, grid_ref)
    row["grid_hd95_mm"] = hd95_mm(grid_pred, grid_ref, prediction.spacing)
    pred_loc = prediction.labels >= LABELS["femoral_head"] if "loc" in bundle.branches else None
    hips = hip_rows(pred, ref, volumes.label >= LABELS["femoral_head"], spacing, has_head_labels=has_head_labels,
                    pred_loc=pred_loc, min_volume_ml=min_volume_ml, min_iou=min_iou, tau_mm=tau_mm)  # fmt: skip
    return row, [{"case": case.case_id, "patient": case.patient_id, **h} for h in hips]


def match_channels(wanted: list[str], available: list[str], data: Path) -> list[int]:
    """Indices into the cohort's channels of the channels a bundle reads, matched by name.

    Raises:
        UsageError: a channel the bundle reads is not among the cohort's ``channel_names``.
    """
    missing = [c for c in wanted if c not in available]
    if missing:
        raise UsageError(f"{data}/{DATASET_JSON}: channel_names ({', '.join(available)}) lack {', '.join(missing)}, "
                         f"which the bundle reads ({', '.join(wanted)})")  # fmt: skip
    return [available.index(c) for c in wanted]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _finite(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def evaluate_bundle(
    bundle_path: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    subset: str = "auto",
    device: str = "auto",
    min_volume_ml: float = 0.1,
    min_iou: float = 0.1,
    tau_mm: float = 2.0,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score a bundle on a labelled cohort and write the tables (see the module docstring).

    ``options`` (``tta``, ``restrict_to_head``, ``min_component_ml``; None keeps the bundle's) as for
    ``predict``; the training-grid metrics use the (augmented, ensembled) probabilities before
    post-processing.

    Returns:
        The contents of ``summary.json``.

    Raises:
        UsageError: a bad ``--out``, ``--subset`` or threshold.
        DataError: the cohort's layout or any case is broken (every problem listed, nothing written),
            or the bundle cannot be loaded.
    """
    from avn_study.bundle.format import load_bundle
    from avn_study.bundle.predict import _device, resolve_options
    from avn_study.outputs import check_target, staged_folder

    data, out = Path(data), Path(out)
    _check_settings(subset, min_volume_ml, min_iou, tau_mm)
    check_target(out, flag="--out", kind="an evaluation", is_own=is_evaluation, overwrite=overwrite,
                 inputs=[data, Path(bundle_path)])  # fmt: skip
    subset = pick_subset(data, subset)
    cohort, problems = scan_cohort(data, subset)
    errors = [p for p in problems if p.severity == "error"]
    if cohort is None or errors:
        raise DataError(format_problems(data, errors))
    bundle = load_bundle(bundle_path)
    chosen = resolve_options(bundle, **options)
    order = match_channels(bundle.channels, cohort.channels, data)
    settings = {"min_volume_ml": min_volume_ml, "min_iou": min_iou, "tau_mm": tau_mm}
    cases, hips = _score_cases(bundle, cohort, data, _device(device), chosen, order, settings, progress)
    summary = _summary(bundle, data, subset, cohort.label_map, chosen, cases, hips, settings)
    with staged_folder(out, is_evaluation if overwrite else None) as staged:
        _write_csv(staged / "per_case.csv", cases)
        _write_csv(staged / "per_hip.csv", hips)
        (staged / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _check_settings(subset: str, min_volume_ml: float, min_iou: float, tau_mm: float) -> None:
    """Refuse a bad ``--subset`` or threshold before anything is read.

    Raises:
        UsageError: names the flag, its allowed values and the value given.
    """
    if subset not in ("auto", "Tr", "Ts"):
        raise UsageError(f"--subset must be auto, Tr or Ts, got {subset!r}")
    for name, value, low in (("--min-volume-ml", min_volume_ml, 0.0), ("--tau-mm", tau_mm, 0.0)):
        if not (math.isfinite(value) and value >= low):
            raise UsageError(f"{name} must be a finite number >= {low:g}, got {value}")
    if not 0.0 < min_iou <= 1.0:
        raise UsageError(f"--min-iou must be in (0, 1], got {min_iou}")


def _score_cases(
    bundle: Any,
    cohort: Any,
    data: Path,
    device: Any,
    chosen: Any,
    order: list[int],
    settings: dict[str, float],
    progress: Callable[[int, int, str], None] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check and score every case of the cohort: one row per case, and its hips' rows.

    ``settings`` holds ``min_volume_ml``, ``min_iou`` and ``tau_mm`` (see :func:`score_case`). Once a case
    fails its checks no further case is scored, but every case is still checked, so all problems are listed.

    Raises:
        DataError: a case is broken (every problem listed), or the model produced NaN for one (names its image).
    """
    from avn_study.data.verify import check_case

    label_map = cohort.label_map
    cases, hips, errors = [], [], []
    for i, case in enumerate(cohort.cases):
        volumes, case_problems = check_case(case, label_map)
        errors += [p for p in case_problems if p.severity == "error"]
        if volumes is not None and not errors:
            try:
                row, hip = score_case(bundle, volumes, device, **settings, has_head_labels=label_map.has_head,
                                      options=chosen, order=order)  # fmt: skip
            except DataError as err:  # the model produced NaN for this case, say
                raise DataError(f"{case.image}: {err}") from None
            cases.append(row)
            hips += hip
        if progress:
            progress(i + 1, len(cohort.cases), case.case_id)
    if errors:
        raise DataError(format_problems(data, errors))
    return cases, hips


def _summary(
    bundle: Any,
    data: Path,
    subset: str,
    label_map: Any,
    chosen: Any,
    cases: list[dict[str, Any]],
    hips: list[dict[str, Any]],
    settings: dict[str, float],
) -> dict[str, Any]:
    """The contents of ``summary.json``: what was scored, how, and the cohort-level numbers (None for NaN)."""
    from avn_study.bundle.predict import UNVERIFIED_BUNDLE
    from avn_study.metrics.case import summarize

    extra = ("case", "patient", "surface_dice", "lesion_sensitivity_iou", "lesion_fp_iou", "grid_dice", "grid_hd95_mm")
    native = summarize([{k: v for k, v in c.items() if k not in extra} for c in cases])
    necrotic = [c for c in cases if c["has_necrosis"] > 0]
    grid = {
        "grid_dice": float(np.mean([c["grid_dice"] for c in necrotic])) if necrotic else math.nan,
        "grid_hd95_mm": float(np.nanmean([c["grid_hd95_mm"] for c in cases]))
        if any(not math.isnan(c["grid_hd95_mm"]) for c in cases)
        else math.nan,
    }
    return {
        "written_by": WRITTEN_BY,
        "bundle": str(bundle.path),
        "trial_id": bundle.provenance.get("trial_id"),
        "data": str(data),
        "subset": subset,
        "labels": label_map.describe(),
        "settings": {**settings, "threshold": bundle.threshold},
        "inference": chosen.to_json(),
        "models": len(bundle.models),
        "warnings": [*([UNVERIFIED_BUNDLE] if not bundle.verified else []), *_seen_by_the_model(bundle, data, subset)],
        "native": {k: _finite(v) for k, v in native.items()},
        "training_grid": {k: _finite(v) for k, v in grid.items()},
        "surface_dice": _finite(float(np.mean([c["surface_dice"] for c in necrotic])) if necrotic else math.nan),
        "hips": {k: _finite(v) for k, v in hip_summary(hips).items()},
        "n_cases": len(cases),
    }


def _seen_by_the_model(bundle: Any, data: Path, subset: str) -> list[str]:
    """A warning when the scored cases are the cohort the bundle was trained on (its training cases)."""
    source = bundle.provenance.get("data")
    if subset != "Tr" or not source:
        return []
    try:
        same = Path(source).resolve() == data.resolve()
    except OSError:
        same = False
    if not same:
        return []
    return [f"{data} is the cohort the bundle was trained on and {LABELS_TR} holds its training cases: these numbers "
            f"are optimistic; score a held-out test set ({IMAGES_TS}/{LABELS_TS}) for an estimate"]  # fmt: skip


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The few numbers ``avn-study evaluate`` prints."""

    def show(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    native, grid, hips = summary["native"], summary["training_grid"], summary["hips"]
    return [
        *(f"warning: {w}" for w in summary["warnings"]),
        f"{summary['n_cases']} case(s) of {summary['data']} (labels{summary['subset']}); {summary['labels']}",
        f"Dice (cases with necrosis), native grid {show(native['val_dice'])} | training grid "
        f"{show(grid['grid_dice'])}; HD95 {show(native.get('hd95_mm'), 1)} mm native",
        f"surface Dice at {summary['settings']['tau_mm']:g} mm {show(summary['surface_dice'])}; lesion sensitivity "
        f"(IoU >= {summary['settings']['min_iou']:g}) {show(hips['lesion_sensitivity_iou'])}",
        f"hips: {int(hips['n_hips'] or 0)} ({int(hips['n_hips_positive'] or 0)} with necrosis); sensitivity "
        f"{show(hips['hip_sensitivity'], 2)}, specificity {show(hips['hip_specificity'], 2)}; necrotic fraction "
        f"MAE {show(hips['fraction_mae'])}, 15/30 % bin agreement {show(hips['bin_agreement'], 2)}",
    ]
