"""Integrity checks of a cohort: ``avn-study verify DATA``.

Covers what nnU-Net's dataset integrity check covers and more: every file is decompressed whole (bad
CRC, cut trailer and trailing garbage are caught, which ``nib.load`` lets pass), Inf as well as NaN,
header consistency (qform/sform, pixdim vs affine, nibabel's header diagnosis), label values and
necrosis outside the femoral head. Every problem is collected with its file; nothing stops at the
first. Training runs the same checks (:func:`check_case`) on each case before it is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from avn_study.data.labels import CANONICAL, LABELS, LabelMap, parse_label_map
from avn_study.data.layout import DATASET_JSON, LABELS_TS, CaseFiles, scan_cohort
from avn_study.data.nifti import Geometry, NiftiReadError, RawNifti, header_repairs, read_nifti
from avn_study.data.preprocess import PreprocessConfig
from avn_study.data.problems import Problem, format_problems
from avn_study.errors import DataError

AFFINE_ATOL_MM = 1e-3  # image and label affines may differ by float noise, not by geometry
SPACING_RTOL = 1e-4


@dataclass(frozen=True)
class CaseVolumes:
    """A checked case in RAS order: float32 image, canonical uint8 labels (0/1/2, see
    :mod:`avn_study.data.labels`) and the image's original geometry."""

    case: CaseFiles
    image: np.ndarray  # (R, A, S) float32, the first channel
    label: np.ndarray | None  # (R, A, S) uint8; None for an unlabelled scan
    geometry: Geometry
    extra: tuple[np.ndarray, ...] = ()  # further channels, (R, A, S) float32 each

    @property
    def channels(self) -> tuple[np.ndarray, ...]:
        return (self.image, *self.extra)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.ras_spacing


@dataclass(frozen=True)
class VerifyReport:
    root: Path
    n_cases: int
    problems: list[Problem]
    label_map: LabelMap | None = None
    n_unlabelled: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        if self.ok:
            lines = [f"{self.root}: OK, {self.n_cases} labelled case(s) checked"]
            if self.n_unlabelled:
                lines[0] += f" and {self.n_unlabelled} unlabelled scan(s) (reconstruction only)"
            if self.problems:
                lines[0] += f" ({len(self.problems)} warning(s))"
            if self.label_map is not None:
                lines.insert(1, f"  {self.label_map.describe()}")
            return "\n".join(lines + [f"  - {p}" for p in self.problems])
        return format_problems(self.root, self.problems)


# Header fields nibabel may "repair" on load (it then only logs a warning): a difference between the stored
# and the loaded value means the file's own value is invalid, and every later comparison would use a value
# the file does not hold. Geometry fields are errors; qfac (pixdim[0]) 0 is read as 1 by the NIfTI standard.
# (vox_offset is not one: nibabel zeroes it in memory for every image; read_nifti checks the data's extent.)
def header_problems(raw: RawNifti) -> list[Problem]:
    """Header sanity: dimensionality, spacing, qform/sform agreement, pixdim vs affine, nibabel's diagnosis."""
    path, header = raw.path, raw.stored_header
    problems = header_repairs(raw)
    shape = header.get_data_shape()
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        problems.append(Problem(path, f"expected a 3D volume (or 4D with a singleton last axis), got shape {shape}"))
    pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
    if np.any(pixdim <= 0) or not np.all(np.isfinite(pixdim)):
        problems.append(Problem(path, f"voxel spacing must be positive, header pixdim[1:4] is {pixdim.tolist()}"))
    sform, scode = header.get_sform(coded=True)
    try:
        qform, qcode = header.get_qform(coded=True)
    except nib.spatialimages.HeaderDataError:  # e.g. non-positive pixdim, reported above
        qform, qcode = None, 0
    if qcode > 0 and scode > 0 and not np.allclose(qform, sform, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(qform - sform).max())
        problems.append(Problem(path, f"qform and sform disagree (max difference {worst:.4g} mm)"))
    affine = raw.image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        problems.append(Problem(path, "affine is singular or not finite"))
    else:
        implied = np.linalg.norm(affine[:3, :3], axis=0)
        if np.all(pixdim > 0) and not np.allclose(np.abs(pixdim), implied, rtol=1e-3, atol=1e-4):
            problems.append(
                Problem(
                    path,
                    f"pixdim {np.round(pixdim, 4).tolist()} disagrees with the spacing "
                    f"the affine implies {np.round(implied, 4).tolist()}",
                )
            )
    diagnosis = type(header).diagnose_binaryblock(header.binaryblock)
    if diagnosis:
        problems.append(Problem(path, f"nibabel header check: {' '.join(diagnosis.split())}", "warning"))
    if raw.trailing_zero_bytes:
        problems.append(
            Problem(path, f"{raw.trailing_zero_bytes} zero bytes of padding after the gzip stream", "warning")
        )
    if raw.extra_bytes:
        problems.append(Problem(path, f"{raw.extra_bytes} bytes after the voxel data the header announces", "warning"))
    return problems


def _read(path: Path) -> tuple[RawNifti | None, np.ndarray | None, list[Problem]]:
    try:
        raw = read_nifti(path)
    except NiftiReadError as err:
        return None, None, [Problem(path, str(err).removeprefix(f"{path}: "))]
    problems = header_problems(raw)
    if any("expected a 3D volume" in p.message for p in problems):
        return raw, None, problems
    if raw.image.header.get_data_dtype().kind not in "biuf":
        return raw, None, [*problems, Problem(path, f"unsupported voxel type {raw.image.header.get_data_dtype()}")]
    data = raw.image.get_fdata(dtype=np.float32)
    data = data.reshape(data.shape[:3])
    n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    if n_nan or n_inf:
        problems.append(Problem(path, f"{n_nan} NaN and {n_inf} +/-Inf voxels (all voxels must be finite)"))
    return raw, data, problems


def _label_problems(path: Path, label: np.ndarray, label_map: LabelMap) -> list[Problem]:
    finite = label[np.isfinite(label)]
    if not np.array_equal(finite, np.round(finite)):
        bad = np.unique(finite[finite != np.round(finite)])[:3]
        return [Problem(path, f"label values must be integers, found {bad.tolist()}")]
    values = set(np.unique(finite).astype(int).tolist())
    allowed = label_map.declared_values
    if values - allowed:
        declared = ", ".join(f"{'/'.join(map(str, v))}={k}" for k, v in label_map.labels)
        return [
            Problem(
                path,
                f"label values {sorted(values - allowed)} are not in {DATASET_JSON}'s labels ({declared})",
            )
        ]
    problems = []
    head = label_map.role_values("femoral_head")
    if label_map.has_head and not values & set(head):
        names = " + ".join(label_map.femoral_head)
        problems.append(
            Problem(path, f"no femoral head labelled ({names}): the localisation target is empty", "warning")
        )
    return problems


def _necrosis_outside_head(path: Path, label: np.ndarray) -> list[Problem]:
    """Each 3D connected component of necrosis must touch the femoral head label."""
    necrosis = label == LABELS["necrosis"]
    if not necrosis.any():
        return []
    components, n = ndimage.label(necrosis, structure=np.ones((3, 3, 3), bool))
    near_head = ndimage.binary_dilation(label == LABELS["femoral_head"], structure=np.ones((3, 3, 3), bool))
    touching = np.unique(components[near_head & necrosis])
    outside = n - int(np.count_nonzero(touching))
    if outside:
        voxels = int(np.isin(components, np.setdiff1d(np.arange(1, n + 1), touching)).sum())
        return [
            Problem(
                path,
                f"{outside} necrosis component(s) ({voxels} voxels) lie outside the femoral head "
                f"(necrosis must lie inside or touch the femoral head region)",
            )
        ]
    return []


def _pair_problems(
    case: CaseFiles, img: RawNifti, lab: RawNifti, image: np.ndarray, label: np.ndarray
) -> list[Problem]:
    if image.shape != label.shape:
        return [Problem(case.label, f"label shape {label.shape} differs from image shape {image.shape}")]
    problems = []
    if not np.allclose(img.image.affine, lab.image.affine, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(img.image.affine - lab.image.affine).max())
        problems.append(Problem(case.label, f"label affine differs from the image affine (max difference {worst:.4g})"))
    zi, zl = img.image.header.get_zooms()[:3], lab.image.header.get_zooms()[:3]
    if not np.allclose(zi, zl, rtol=SPACING_RTOL):
        problems.append(
            Problem(
                case.label, f"label spacing {tuple(map(float, zl))} differs from image spacing {tuple(map(float, zi))}"
            )
        )
    return problems


def _channel_problems(path: Path, raw: RawNifti, data: np.ndarray, first: RawNifti, image: np.ndarray) -> list[Problem]:
    """A further channel must share the first channel's grid exactly (they are stacked voxel by voxel)."""
    if data.shape != image.shape:
        return [Problem(path, f"shape {data.shape} differs from the first channel's {image.shape} (channels must "
                        "be co-registered on one grid)")]  # fmt: skip
    if not np.allclose(raw.image.affine, first.image.affine, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(raw.image.affine - first.image.affine).max())
        return [Problem(path, f"affine differs from the first channel's (max difference {worst:.4g}); channels must "
                        "be co-registered on one grid")]  # fmt: skip
    return []


def check_case(case: CaseFiles, label_map: LabelMap = CANONICAL) -> tuple[CaseVolumes | None, list[Problem]]:
    """Read a case's image and label whole and run every per-case check.

    ``label_map`` (the cohort's, from ``dataset.json``) says which values exist and what they mean;
    the returned label volume is canonical (0/1/2).

    Returns:
        The volumes in RAS order when there is no error (warnings allowed), and all problems found.
    """
    assert case.label is not None, "check_case needs a labelled case"
    reads, problems = _read_channels(case)
    (img, image), extra = reads[0], reads[1:]
    lab, label, label_problems = _read(case.label)
    problems += label_problems
    if label is not None and not label_problems:
        problems += _label_problems(case.label, label, label_map)
    repaired = any("nibabel would silently replace" in p.message for p in problems)
    if img is not None and lab is not None and image is not None and label is not None and not repaired:
        problems += _pair_problems(case, img, lab, image, label)  # only on values the files really hold
        problems += _co_registration(case, reads)
    if any(p.severity == "error" for p in problems):
        return None, problems
    label_u8 = label_map.canonical(label.astype(np.uint8))
    if label_map.has_head:  # without head labels there is no region to lie in
        problems += _necrosis_outside_head(case.label, label_u8)
    if any(p.severity == "error" for p in problems):
        return None, problems
    geometry = Geometry.of(image.shape, img.image.affine)
    problems += _plane_warning(case, geometry)
    channels = tuple(geometry.to_ras(data) for _, data in extra)
    return CaseVolumes(case, geometry.to_ras(image), geometry.to_ras(label_u8), geometry, channels), problems


def check_unlabelled(case: CaseFiles) -> tuple[CaseVolumes | None, list[Problem]]:
    """:func:`check_case` for a scan without a label (``imagesUnlabelled/``): every image check."""
    reads, problems = _read_channels(case)
    (img, image) = reads[0]
    repaired = any("nibabel would silently replace" in p.message for p in problems)
    if img is not None and image is not None and not repaired:
        problems += _co_registration(case, reads)
    if any(p.severity == "error" for p in problems) or img is None or image is None:
        return None, problems
    geometry = Geometry.of(image.shape, img.image.affine)
    problems += _plane_warning(case, geometry)
    channels = tuple(geometry.to_ras(data) for _, data in reads[1:])
    return CaseVolumes(case, geometry.to_ras(image), None, geometry, channels), problems


def _read_channels(case: CaseFiles) -> tuple[list[tuple[RawNifti | None, np.ndarray | None]], list[Problem]]:
    problems: list[Problem] = []
    reads = []
    for path in case.images:
        raw, data, channel_problems = _read(path)
        problems += channel_problems
        if data is not None and float(np.nanmax(data) - np.nanmin(data)) == 0.0:
            problems.append(Problem(path, f"image is constant ({float(data.flat[0])}): nothing to normalise"))
        elif data is not None and np.isfinite(data).all():
            problems += _nearly_constant(path, data)
        reads.append((raw, data))
    return reads, problems


def _nearly_constant(path: Path, data: np.ndarray) -> list[Problem]:
    """A warning when clipping to the preprocessing's percentiles leaves a constant image (all but a few
    voxels share one value): it would be cached, and trained on, as all zeros."""
    percentiles = PreprocessConfig().clip_percentiles
    lo, hi = (float(v) for v in np.percentile(data, percentiles))
    if lo != hi:
        return []
    differ = int(np.count_nonzero(data != lo))
    return [Problem(path, f"image is constant but for {differ:,} of {data.size:,} voxels (value {lo:g}): clipped to "
                    f"its {percentiles[0]:g}-{percentiles[1]:g} percentiles it is constant, so it would be "
                    "normalised, and trained on, as all zeros; check the file", "warning")]  # fmt: skip


def _co_registration(case: CaseFiles, reads: list) -> list[Problem]:
    (img, image), problems = reads[0], []
    for path, (raw, data) in zip(case.extra, reads[1:], strict=True):
        if raw is not None and data is not None:
            problems += _channel_problems(path, raw, data, img, image)
    return problems


def _plane_warning(case: CaseFiles, geometry: Geometry) -> list[Problem]:
    plane = geometry.acquisition_plane
    if plane in ("coronal", "isotropic"):
        return []
    voxel = " x ".join(f"{v:g}" for v in geometry.ras_spacing)
    message = (f"{plane} acquisition (voxel {voxel} mm R, A, S, thickest across the {plane} plane); models read "
               f"coronal slices, built here from thick {plane} slices")  # fmt: skip
    return [Problem(case.image, message, "warning")]


def verify_dataset(root: str | Path) -> VerifyReport:
    """Check a dataset folder whole: layout, dataset.json and every case (of ``imagesTr``/``labelsTr``
    and, when the folder has a labelled test set, ``imagesTs``/``labelsTs``); collect every problem."""
    root = Path(root)
    cohort, problems = scan_cohort(root)
    n_cases, label_map = 0, None
    if cohort is not None:
        label_map = parse_label_map(cohort.spec, root / DATASET_JSON)[0]  # its problems are in ``problems``
    if cohort is not None and label_map is not None:  # (without a label map the labels cannot be checked)
        cases = list(cohort.cases)
        if (root / LABELS_TS).is_dir():
            test, test_problems = scan_cohort(root, "Ts")
            problems += [p for p in test_problems if p.path.name != DATASET_JSON]  # (reported once above)
            cases += test.cases if test is not None else []
        for case in cases:
            _, case_problems = check_case(case, label_map)
            problems += case_problems
            n_cases += 1
        for case in cohort.unlabelled:
            problems += check_unlabelled(case)[1]
    return VerifyReport(root, n_cases, problems, label_map, len(cohort.unlabelled) if cohort else 0)


def require_valid_case(case: CaseFiles, label_map: LabelMap = CANONICAL) -> CaseVolumes:
    """:func:`check_case` for training: raise :class:`DataError` listing the case's problems."""
    volumes, problems = check_case(case, label_map)
    if volumes is None:
        raise DataError(format_problems(case.image.parent.parent, [p for p in problems if p.severity == "error"]))
    return volumes
