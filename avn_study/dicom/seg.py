"""DICOM SEG in and out (highdicom): label maps from a radiologist's SEG, and predictions as SEG.

Reading (``import-dicom --labels-from``): each segment is assigned a role by its coded property type
(SNOMED CT femoral head 2812003, necrosis 6574001) or, failing that, by its label (``femoral head``,
``head``; ``necrosis``, ``AVN``, ``osteonecrosis``); segments may overlap (a head drawn with the lesion
inside it): the label map is 1 where a head segment is and 2 where a necrosis segment is.

Writing (``predict --dicom-seg``): one binary SEG per predicted series with the segments "femoral head"
(the localisation region, label 1) and "necrosis" (label 2) as in the NIfTI label map (they do not
overlap), coded concepts, the source series and its SOP instances referenced, its frame of reference
kept, and the algorithm identified as avn-study with the bundle. A SEG carries the source's patient and
study modules (that is how a PACS files it with the series); its file name carries none of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from avn_study.data.labels import LABELS
from avn_study.dicom.geometry import stack_map
from avn_study.dicom.tree import Instance, Series
from avn_study.errors import DataError

FEMORAL_HEAD_CODE = ("2812003", "SCT", "Femoral head")
NECROSIS_CODE = ("6574001", "SCT", "Necrosis")
_ROLE_PATTERNS = {
    "necrosis": re.compile(r"necro|\bavn\b|avascular", re.IGNORECASE),
    "femoral_head": re.compile(r"femoral[\s_-]*head|\bhead\b|caput", re.IGNORECASE),
}


def _role(segment) -> str | None:
    for item in segment.get("SegmentedPropertyTypeCodeSequence", []):
        code = (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")))
        if code == NECROSIS_CODE[:2]:
            return "necrosis"
        if code == FEMORAL_HEAD_CODE[:2]:
            return "femoral_head"
    label = str(segment.get("SegmentLabel", ""))
    return next((role for role, pattern in _ROLE_PATTERNS.items() if pattern.search(label)), None)


def read_seg_labels(seg: Instance, series: Series, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A SEG of ``series`` as a uint8 label map (0/1/2) on the volume with ``affine`` and ``shape``.

    Raises:
        DataError: the SEG does not reference ``series``, has no necrosis segment, or its frames do not
            lie on the series' slices (each message names the SEG file).
    """
    import highdicom as hd

    try:
        segmentation = hd.seg.segread(seg.path)
    except Exception as err:  # highdicom raises several types for a SEG it cannot use
        raise DataError(f"{seg.path}: not a usable DICOM SEG ({type(err).__name__}: {err})") from None
    roles: dict[str, list[int]] = {"femoral_head": [], "necrosis": []}
    for segment in segmentation.SegmentSequence:
        role = _role(segment)
        if role is not None:
            roles[role].append(int(segment.SegmentNumber))
    if not roles["necrosis"]:
        raise DataError(f"{seg.path}: no necrosis segment (segments are matched by the coded property type "
                        f"SCT {NECROSIS_CODE[0]} 'Necrosis' or a label naming necrosis/AVN); "
                        f"{len(segmentation.SegmentSequence)} segment(s) found")  # fmt: skip
    ordered = [i.sop_uid for i in series.sorted_instances()]
    numbers = roles["femoral_head"] + roles["necrosis"]
    try:
        pixels = segmentation.get_pixels_by_source_instance(ordered, segment_numbers=numbers,
                                                            assert_missing_frames_are_empty=True)  # fmt: skip
    except (ValueError, RuntimeError, KeyError) as err:
        raise DataError(f"{seg.path}: its frames do not map onto {series.label()} ({err})") from None
    stack = np.zeros(pixels.shape[:3], np.uint8)
    n_head = len(roles["femoral_head"])
    stack[pixels[..., :n_head].any(axis=-1)] = LABELS["femoral_head"]
    stack[pixels[..., n_head:].any(axis=-1)] = LABELS["necrosis"]
    mapping = stack_map(series, affine, shape)
    if mapping is None:
        raise DataError(f"{seg.path}: {series.label()} is not on the grid of the converted image")
    return mapping.to_volume(stack)


def _source_datasets(series: Series) -> list:
    import pydicom

    return [pydicom.dcmread(i.path) for i in series.sorted_instances()]


def series_pixels(series: Series) -> np.ndarray | None:
    """The series' modality values as a ``(slices, rows, columns)`` float array; None when the pixel data
    cannot be decoded here (a compressed transfer syntax without its decoder)."""
    try:
        datasets = _source_datasets(series)
        frames = [np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.get("RescaleSlope", 1) or 1)
                  + float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets]  # fmt: skip
    except Exception:
        return None
    return np.stack(frames)


def match_series(candidates: list[Series], path: Path) -> Series:
    """The series a NIfTI image was converted from: the one on its grid; when several are, the ones whose
    voxels it holds; when several still are (a reformat of the same voxels), the one whose slices are the
    image's third axis (as dcm2niix writes a stack).

    Raises:
        DataError: no series, or several, match (naming the image and the candidates).
    """
    import nibabel as nib

    image = nib.load(str(path))
    shape = image.shape[:3]
    on_grid = [(s, m) for s in candidates if (m := stack_map(s, image.affine, shape)) is not None]
    if not on_grid:
        raise DataError(f"{path}: no series of the DICOM folder is on this image's grid (shape {shape}); "
                        "--dicom-seg needs the series it was converted from (avn-study import-dicom)")  # fmt: skip
    if len(on_grid) > 1:
        data = np.asarray(image.get_fdata(dtype=np.float64)).reshape(shape)
        same = []
        for series, mapping in on_grid:
            pixels = series_pixels(series)
            stack = mapping.to_stack(data)
            if pixels is not None and pixels.shape == stack.shape and np.allclose(stack, pixels, atol=1e-3):
                same.append((series, mapping))
        on_grid = same or on_grid
    if len(on_grid) > 1:
        on_grid = [(s, m) for s, m in on_grid if m.axes[2] == 0] or on_grid
    if len(on_grid) == 1:
        return on_grid[0][0]
    listed = "\n".join(f"    {s.label()}" for s, _ in on_grid)
    raise DataError(f"{path}: {len(on_grid)} series hold this image's grid and voxels; cannot tell which to "
                    f"reference:\n{listed}")  # fmt: skip


def write_seg(series: Series, labels: np.ndarray, affine: np.ndarray, target: Path, *, bundle_name: str,
              bundle_version: str, segments: tuple[str, ...] = ("femoral_head", "necrosis")) -> Path:  # fmt: skip
    """Write a label map (the stored NIfTI array on ``affine``) as a binary DICOM SEG of ``series``.

    Raises:
        DataError: the label map is not on the series' grid.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    import avn_study

    mapping = stack_map(series, affine, labels.shape)
    if mapping is None:
        raise DataError(f"{target}: the label map is not on the grid of {series.label()}")
    stack = mapping.to_stack(np.asarray(labels)).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="avn-study", family=codes.cid7162.ArtificialIntelligence, version=avn_study.__version__,
        parameters={"bundle": bundle_name[:64], "bundle_trial": bundle_version[:64]},
    )  # fmt: skip
    described = {
        "femoral_head": ("femoral head", codes.SCT.AnatomicalStructure, Code(*FEMORAL_HEAD_CODE)),
        "necrosis": ("necrosis", codes.SCT.MorphologicallyAbnormalStructure, Code(*NECROSIS_CODE)),
    }
    head = "femoral_head" in segments  # segment numbers run from 1: without a head, necrosis is segment 1
    if not head:
        stack = (stack == LABELS["necrosis"]).astype(np.uint8)
    descriptions = []
    for name in segments:
        label, category, kind = described[name]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=LABELS[name] if head else 1, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))  # fmt: skip
    source = _source_datasets(series)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(source),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="avn-study",
        manufacturer_model_name=bundle_name[:64] or "avn-study bundle", software_versions=avn_study.__version__,
        device_serial_number="none", series_description="avn-study necrosis segmentation",
        content_label="AVN", content_description="avn-study prediction",
    )  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(target)
    return target


def _series_number(source: list) -> int:
    number = source[0].get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 9000
