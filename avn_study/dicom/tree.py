"""Walking a DICOM export: files grouped into series, visits and patients, and what exports get wrong.

:func:`scan_tree` reads every file's header (pydicom, pixels skipped), groups image files by
SeriesInstanceUID and collects DICOM SEG objects apart. :func:`series_problems` reports, per series, the
usual faults of an export: several frames of reference, mixed orientations or matrix sizes, two slices
at one position, missing slices (uneven spacing), sheared stacks (gantry tilt) and oblique stacks;
:func:`tree_problems` the faults of the tree itself: files that are not DICOM, duplicate SOP instances,
folders mixing several series.

Messages name series by their number, plane, size, UID and first file, never by header free text
(SeriesDescription, names, dates): what is printed or logged carries no identifying data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avn_study.data.problems import Problem

PLANES = ("sagittal", "coronal", "axial")  # the plane across LPS axis x, y, z (the slice normal's axis)
IMAGE_MODALITIES = ("MR",)
OBLIQUE_WARNING_DEG = 5.0  # as predict: beyond this a stack is oblique
TILT_ERROR_DEG = 0.5  # slices offset along something else than their normal: a sheared (gantry-tilted) stack
MIN_SLICES = 3  # fewer is a localiser or a key image, not a volume
SPACING_RTOL = 0.01  # slice steps may differ by 1 % (rounding of positions), not by a missing slice
_IGNORED_NAMES = {"DICOMDIR"}  # a media index: DICOM, but no image


@dataclass(frozen=True)
class Instance:
    """One DICOM file's header fields that the import needs (no patient or free-text fields)."""

    path: Path
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    frame_of_reference: str
    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS, mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row and column direction cosines)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    shape: tuple[int, int]  # (Rows, Columns)
    frames: int  # NumberOfFrames (1 for classic single-frame images)
    series_number: int | None
    description: str  # SeriesDescription (or ProtocolName): matched against --series, never printed
    study_date: str  # only to order a patient's visits; never written
    referenced_series: tuple[str, ...] = ()  # a SEG's ReferencedSeriesSequence (the series it segments)


@dataclass
class Series:
    """The image files of one SeriesInstanceUID."""

    uid: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def first(self) -> Instance:
        return self.instances[0]

    @property
    def study_uid(self) -> str:
        return self.first.study_uid

    @property
    def patient_id(self) -> str:
        return self.first.patient_id

    @property
    def description(self) -> str:
        return self.first.description

    @property
    def normal(self) -> np.ndarray | None:
        """The unit slice normal (row x column direction, LPS), or None without an orientation."""
        if self.first.orientation is None:
            return None
        row, col = np.asarray(self.first.orientation[:3]), np.asarray(self.first.orientation[3:])
        normal = np.cross(row, col)
        norm = float(np.linalg.norm(normal))
        return normal / norm if norm > 0 else None

    @property
    def plane(self) -> str:
        """``sagittal``, ``coronal`` or ``axial`` from the orientation vectors; ``unknown`` without them."""
        normal = self.normal
        return "unknown" if normal is None else PLANES[int(np.argmax(np.abs(normal)))]

    @property
    def obliquity_deg(self) -> float:
        """The angle between the slice normal and the nearest LPS axis."""
        normal = self.normal
        return 0.0 if normal is None else float(np.degrees(np.arccos(np.clip(np.abs(normal).max(), 0.0, 1.0))))

    def sorted_instances(self) -> list[Instance]:
        """The slices in order along the normal (the order of the stack's third axis)."""
        normal = self.normal
        if normal is None or any(i.position is None for i in self.instances):
            return sorted(self.instances, key=lambda i: i.path.name)
        return sorted(self.instances, key=lambda i: float(np.dot(i.position, normal)))

    def label(self) -> str:
        """How messages name the series: number, plane, size, UID and the first file (no free text)."""
        number = f"series {self.first.series_number}" if self.first.series_number is not None else "series"
        files = sorted(i.path for i in self.instances)
        return (f"{number} ({self.plane}, {len(self.instances)} file(s), {self.first.shape[0]}x{self.first.shape[1]}, "
                f"UID {self.uid}, first file {files[0]})")  # fmt: skip


@dataclass
class DicomTree:
    """A scanned DICOM folder: image series, SEG objects and the files that could not be used."""

    root: Path
    series: dict[str, Series]  # SeriesInstanceUID -> image series (modality MR)
    segs: list[Instance]  # DICOM SEG objects (labels for --labels-from)
    problems: list[Problem]  # tree-level problems (not DICOM, duplicates, mixed folders)
    skipped: int = 0  # DICOM files of other kinds (SR, presentation states, other modalities)

    def visits(self) -> dict[tuple[str, str], list[Series]]:
        """(PatientID, StudyInstanceUID) -> the study's image series, ordered by patient then study date."""
        out: dict[tuple[str, str], list[Series]] = {}
        order = sorted(self.series.values(), key=lambda s: (s.patient_id, s.first.study_date, s.study_uid,
                                                            s.first.series_number or 0, s.uid))  # fmt: skip
        for series in order:  # without a PatientID a visit is its own patient (never merged with others)
            out.setdefault((series.patient_id or f"no PatientID: {series.study_uid}", series.study_uid), []).append(
                series
            )
        return out


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(np.isfinite(numbers)) else None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_instance(path: Path) -> Instance | None:
    """The header of one file (pixels skipped); None when it is not DICOM.

    Raises:
        pydicom's errors for a DICOM file too damaged to parse (the caller reports them).
    """
    import warnings

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom's warnings may quote header values (names, free text)
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    if "SOPInstanceUID" not in ds:
        return None
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is None or position is None:  # enhanced multi-frame: the shared / first per-frame groups
        orientation, position = _multiframe_geometry(ds, orientation, position)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return Instance(
        path=path,
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        modality=str(ds.get("Modality", "")),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        shape=(_int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0),
        frames=_int(ds.get("NumberOfFrames")) or 1,
        series_number=_int(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "")),
        study_date=str(ds.get("StudyDate", "")) + str(ds.get("StudyTime", "")),
        referenced_series=tuple(
            str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])
        ),
    )


def _multiframe_geometry(ds, orientation, position):
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(group, [])[:1]:
            if orientation is None and "PlaneOrientationSequence" in item:
                orientation = _floats(item.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
            if position is None and "PlanePositionSequence" in item:
                position = _floats(item.PlanePositionSequence[0].get("ImagePositionPatient"), 3)
    return orientation, position


def _files(root: Path) -> Iterable[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            yield path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_tree(root: str | Path) -> DicomTree:
    """Read every file's header under ``root`` and group the image files into series.

    Hidden files (``.DS_Store``) and ``DICOMDIR`` are skipped; any other file that is not DICOM is an
    error (a DICOM export holds DICOM only: a stray file means a wrong folder or a broken copy).
    """
    root = Path(root)
    series: dict[str, Series] = {}
    segs: list[Instance] = []
    problems: list[Problem] = []
    by_sop: dict[str, Instance] = {}
    skipped = 0
    for path in _files(root):
        if path.name in _IGNORED_NAMES:
            continue
        try:
            instance = read_instance(path)
        except Exception as err:  # a damaged file: pydicom raises many types (struct, value, EOF errors)
            problems.append(Problem(path, f"a damaged DICOM file that cannot be read ({type(err).__name__})"))
            continue
        if instance is None:
            problems.append(Problem(path, "not a DICOM file; a DICOM export should hold DICOM files only: move it "
                                    "out of the folder"))  # fmt: skip
            continue
        seen = by_sop.get(instance.sop_uid)
        if seen is not None:
            if _digest(seen.path) == _digest(path):
                problems.append(Problem(path, f"duplicate SOP instance: the same file as {seen.path} (used once)",
                                        "warning"))  # fmt: skip
            else:
                message = (f"duplicate SOP instance UID {instance.sop_uid} with different content from {seen.path}: "
                           "the export mixed two objects under one UID")  # fmt: skip
                problems.append(Problem(path, message))
            continue
        by_sop[instance.sop_uid] = instance
        if instance.modality == "SEG":
            segs.append(instance)
        elif instance.modality in IMAGE_MODALITIES and instance.series_uid:
            series.setdefault(instance.series_uid, Series(instance.series_uid)).instances.append(instance)
        else:
            skipped += 1
    folders: dict[Path, set[str]] = {}
    for s in series.values():
        for instance in s.instances:
            folders.setdefault(instance.path.parent, set()).add(s.uid)
    for folder, uids in sorted(folders.items()):
        if len(uids) > 1:
            numbers = sorted(str(series[u].first.series_number) for u in uids)
            problems.append(Problem(folder, f"holds files of {len(uids)} series (numbers {', '.join(numbers)}); "
                                    "they are told apart by SeriesInstanceUID", "warning"))  # fmt: skip
    return DicomTree(root, series, segs, problems, skipped)


def series_problems(series: Series) -> list[Problem]:
    """The faults of one series that make it unusable as a volume (errors) or doubtful (warnings)."""
    where = series.first.path
    name = series.label()
    problems: list[Problem] = []
    frames = {i.frame_of_reference for i in series.instances}
    if len(frames) > 1:
        problems.append(Problem(where, f"{name}: {len(frames)} frames of reference in one series (the slices do "
                                "not share one patient coordinate system)"))  # fmt: skip
    if any(i.frames > 1 for i in series.instances):
        if len(series.instances) > 1:
            problems.append(Problem(where, f"{name}: {len(series.instances)} multi-frame objects in one series"))
        return problems  # an enhanced multi-frame image: dcm2niix reads its per-frame geometry
    missing = [i.path for i in series.instances if i.position is None or i.orientation is None or
               i.pixel_spacing is None]  # fmt: skip
    if missing:
        problems.append(Problem(missing[0], f"{name}: {len(missing)} file(s) without ImagePositionPatient, "
                                "ImageOrientationPatient or PixelSpacing: no geometry"))  # fmt: skip
        return problems
    orientations = {tuple(np.round(i.orientation, 4)) for i in series.instances}
    shapes = {(i.shape, tuple(np.round(i.pixel_spacing, 4))) for i in series.instances}
    if len(orientations) > 1:
        problems.append(Problem(where, f"{name}: slices of {len(orientations)} orientations in one series (a "
                                "localiser, or several stacks exported as one series)"))  # fmt: skip
    if len(shapes) > 1:
        problems.append(Problem(where, f"{name}: slices of {len(shapes)} matrix sizes or pixel spacings"))
    if len(orientations) > 1 or len(shapes) > 1:
        return problems
    if len(series.instances) < MIN_SLICES:
        problems.append(Problem(where, f"{name}: {len(series.instances)} slice(s) only, not a volume (a localiser?)"))
    if series.obliquity_deg > OBLIQUE_WARNING_DEG:
        problems.append(Problem(where, f"{name}: oblique stack, the slice normal is {series.obliquity_deg:.1f} "
                                "degrees off the nearest axis", "warning"))  # fmt: skip
    problems += _stack_problems(series, name)
    return problems


def _stack_problems(series: Series, name: str) -> list[Problem]:
    ordered = series.sorted_instances()
    if len(ordered) < 2:
        return []
    normal = series.normal
    assert normal is not None
    positions = np.array([i.position for i in ordered], dtype=np.float64)
    along = positions @ normal
    steps = np.diff(along)
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        k = int(same[0])
        return [Problem(ordered[k + 1].path, f"{name}: {same.size + 1} slices share a position with others, e.g. "
                        f"{ordered[k].path.name} and {ordered[k + 1].path.name} (several echoes, phases or "
                        "repeated acquisitions in one series)")]  # fmt: skip
    problems = []
    offsets = np.diff(positions, axis=0)
    cosines = np.clip(np.abs(offsets @ normal) / np.linalg.norm(offsets, axis=1), 0.0, 1.0)
    tilt = float(np.degrees(np.arccos(cosines.min())))
    if tilt > TILT_ERROR_DEG:
        problems.append(Problem(series.first.path, f"{name}: the slices are offset {tilt:.1f} degrees off their "
                                "normal (gantry tilt or a sheared stack); a volume would need resampling, which "
                                "the import does not do"))  # fmt: skip
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > SPACING_RTOL * step + 1e-3)
    if uneven.size:
        k = int(uneven[0])
        gaps = ", ".join(f"{steps[j]:.3g} mm between {ordered[j].path.name} and {ordered[j + 1].path.name}"
                         for j in uneven[:3])  # fmt: skip
        problems.append(Problem(ordered[k].path, f"{name}: uneven slice spacing ({gaps}; the others "
                                f"{step:.3g} mm): a missing slice or an incomplete export"))  # fmt: skip
    return problems


def matches(series: Series, regex: re.Pattern[str] | None, plane: str | None) -> bool:
    """Whether a series is a candidate for a channel: its description matches, and its plane."""
    if regex is not None and not regex.search(series.description):
        return False
    return plane is None or series.plane == plane
