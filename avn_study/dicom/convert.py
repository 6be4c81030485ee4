"""``avn-study import-dicom``: a hospital's DICOM export to the nnU-Net raw layout, pseudonymised.

Per visit (StudyInstanceUID of a PatientID) one series is chosen per channel, by SeriesDescription
regex and/or the acquisition plane of its orientation vectors; each is converted by **dcm2niix** (the
binary of the PyPI package, run on a folder holding exactly that series' files) and written with a
clean NIfTI header (dcm2niix's affine and voxels, none of its text fields). Cases are ``case_000``,
``case_001``, ... in the order patient, visit date; patients ``P000``, ``P001``, ...; ``dataset.json``'s
``patients`` map links a patient's visits, so splits stay by patient. The link back to the hospital's
identifiers (PatientID, StudyInstanceUID, SeriesInstanceUID) goes to one private mapping file outside
OUT. No name, date or free text from the headers enters a file name, ``dataset.json`` or the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avn_study.data.labels import LABELS
from avn_study.data.layout import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR, UNLABELLED_DIR
from avn_study.data.problems import Problem, format_problems
from avn_study.dicom.geometry import stack_map
from avn_study.dicom.tree import DicomTree, Instance, Series, matches, scan_tree, series_problems
from avn_study.errors import DataError, UsageError

WRITTEN_BY = "avn-study import-dicom"
UNLABELLED_DESTINATIONS = (IMAGES_TS, UNLABELLED_DIR)
AFFINE_ATOL_MM = 1e-3


@dataclass
class PlannedCase:
    """One visit to import: its pseudonymous ids, the chosen series per channel and its SEG (if any)."""

    case_id: str
    patient: str  # pseudonymous (P000)
    patient_id: str  # the hospital's PatientID (mapping file only)
    study_uid: str
    series: list[Series]  # one per channel, in channel order
    seg: Instance | None = None
    subset: str = IMAGES_TS  # IMAGES_TR, or one of UNLABELLED_DESTINATIONS


@dataclass
class ImportResult:
    out: Path
    mapping: Path
    cases: list[PlannedCase] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def mapping_path(out: Path, given: Path | None) -> Path:
    """Where the private mapping goes: ``--mapping`` or ``OUT.mapping.json`` beside OUT."""
    return given if given is not None else out.with_name(out.name + ".mapping.json")


def is_imported_cohort(path: Path) -> bool:
    """Whether ``path`` is a cohort that import-dicom wrote (what ``--overwrite`` may replace)."""
    from avn_study.outputs import json_marker

    return json_marker(Path(path) / DATASET_JSON, "import_dicom")


def channel_patterns(channels: list[str], series: list[str]) -> dict[str, re.Pattern[str] | None]:
    """``--series`` values per channel: ``REGEX`` (one channel) or ``NAME=REGEX``; by default the
    channel's own name, case-insensitively (``T1`` matches ``COR T1 TSE``).

    Raises:
        UsageError: an unknown channel name, a bad regex, an unnamed regex with several channels.
    """
    from avn_study.errors import look_up

    given: dict[str, str] = {}
    for item in series:
        name, sep, regex = item.partition("=")
        if sep and name in channels:
            given[name] = regex
        elif sep and re.fullmatch(r"[A-Za-z0-9_+-]+", name) and len(channels) > 1:
            look_up(name, channels, what="channel of --series")
        elif len(channels) == 1:
            given[channels[0]] = item
        else:
            raise UsageError(f"--series {item!r}: with several channels ({', '.join(channels)}) name the channel: "
                             f"--series {channels[0]}=REGEX")  # fmt: skip
    out: dict[str, re.Pattern[str] | None] = {}
    for channel in channels:
        regex = given.get(channel, re.escape(channel))
        try:
            out[channel] = re.compile(regex, re.IGNORECASE)
        except re.error as err:
            raise UsageError(f"--series {regex!r}: not a regular expression ({err})") from None
    return out


def _describe(regex: re.Pattern[str] | None, plane: str | None) -> str:
    parts = [f"description regex '{regex.pattern}'"] if regex is not None else []
    parts += [f"plane {plane}"] if plane else []
    return ", ".join(parts) or "any series"


def _verdict(regex: re.Pattern[str] | None, series: Series) -> str:
    return "matches" if regex is None or regex.search(series.description) else "does not match"


def plan_import(
    tree: DicomTree,
    channels: list[str],
    patterns: dict[str, re.Pattern[str] | None],
    plane: str | None,
    segs: list[Instance],
    unlabelled: str,
) -> tuple[list[PlannedCase], list[Problem]]:
    """Choose each visit's series per channel and its SEG; every problem found, none raised."""
    problems: list[Problem] = list(tree.problems)
    pseudonyms: dict[str, str] = {}
    cases: list[PlannedCase] = []
    checked: set[str] = set()  # series whose faults are reported (each once)
    for (patient_id, study_uid), visit in tree.visits().items():
        patient = pseudonyms.setdefault(patient_id, f"P{len(pseudonyms):03d}")
        n_visit = sum(c.patient == patient for c in cases) + 1
        case_id = f"case_{len(cases):03d}"
        where = f"{case_id} (patient {patient}, visit {n_visit}, {len(visit)} series)"
        chosen: list[Series] = []
        for channel in channels:
            regex = patterns[channel]
            candidates = [s for s in visit if matches(s, regex, plane)]
            for series in candidates:
                if series.uid not in checked:
                    checked.add(series.uid)
                    problems += series_problems(series)
            if len(candidates) == 1:
                chosen.append(candidates[0])
                continue
            listed = "\n".join(f"      {s.label()} (description {_verdict(regex, s)})" for s in visit)
            what = "no series matches" if not candidates else f"{len(candidates)} series match"
            hint = "" if not candidates else "; narrow it with --series or --plane"
            problems.append(Problem(visit[0].first.path.parent, f"{where}: {what} channel {channel} "
                                    f"({_describe(regex, plane)}){hint}; the visit's series:\n{listed}"))  # fmt: skip
        if len(chosen) == len(channels):
            if len({s.uid for s in chosen}) < len(chosen):
                problems.append(Problem(chosen[0].first.path, f"{where}: one series was chosen for two channels "
                                        f"({chosen[0].label()}); give each channel its own --series"))  # fmt: skip
            frames = {s.first.frame_of_reference for s in chosen}
            if len(frames) > 1:
                problems.append(Problem(chosen[0].first.path, f"{where}: its channels' series lie in {len(frames)} "
                                        "frames of reference; channels must be co-registered on one grid"))  # fmt: skip
        cases.append(PlannedCase(case_id, patient, patient_id, study_uid, chosen, subset=unlabelled))
    _assign_segs(cases, segs, problems)
    return cases, problems


def _assign_segs(cases: list[PlannedCase], segs: list[Instance], problems: list[Problem]) -> None:
    by_series = {s.uid: case for case in cases for s in case.series}
    for seg in segs:
        hits = [uid for uid in seg.referenced_series if uid in by_series]
        if not hits:
            problems.append(Problem(seg.path, "a DICOM SEG that references none of the chosen series (not used)",
                                    "warning"))  # fmt: skip
            continue
        case = by_series[hits[0]]
        if case.seg is not None:
            problems.append(Problem(seg.path, f"{case.case_id}: a second DICOM SEG for the visit (the first is "
                                    f"{case.seg.path}); keep one"))  # fmt: skip
            continue
        case.seg, case.subset = seg, IMAGES_TR


def run_dcm2niix(series: Series, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Convert one series with dcm2niix; return its voxel array (stored order) and affine.

    The series' files are linked (or copied) into a folder of their own first, so dcm2niix sees exactly
    that series whatever else shares its folder.

    Raises:
        DataError: dcm2niix failed, or did not write exactly one 3D NIfTI (naming the series).
    """
    import dcm2niix
    import nibabel as nib

    source, target = Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work))
    for k, instance in enumerate(series.instances):
        link = source / f"{k:05d}.dcm"
        try:
            link.symlink_to(instance.path.resolve())
        except OSError:
            shutil.copyfile(instance.path, link)
    args = [dcm2niix.bin, "-z", "y", "-b", "n", "-f", "image", "-x", "n", "-o", str(target), str(source)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600)
    except OSError as err:
        raise UsageError(f"the dcm2niix binary {dcm2niix.bin} cannot be run ({err.strerror}); reinstall it: "
                         "pip install --force-reinstall dcm2niix") from None  # fmt: skip
    except subprocess.TimeoutExpired:
        raise DataError(f"{series.first.path.parent}: dcm2niix took over 10 minutes on {series.label()}") from None
    written = sorted(p.name for p in target.iterdir())
    images = [name for name in written if name.endswith((".nii", ".nii.gz"))]
    if done.returncode != 0 or len(images) != 1:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")][:3]
        raise DataError(f"{series.first.path.parent}: dcm2niix (exit {done.returncode}) wrote {len(images)} "
                        f"NIfTI file(s) from {series.label()}, expected one"
                        + (f": {' | '.join(errors)}" if errors else ""))  # fmt: skip
    image = nib.load(str(target / images[0]))
    array = np.asanyarray(image.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{series.first.path.parent}: dcm2niix wrote a {array.ndim}D volume of shape {array.shape} "
                        f"from {series.label()}; expected one 3D volume")  # fmt: skip
    affine = np.asarray(image.affine, dtype=np.float64)
    if series.first.frames == 1 and stack_map(series, affine, array.shape) is None:
        raise DataError(f"{series.first.path.parent}: dcm2niix's volume (shape {array.shape}) is not on the grid "
                        f"of {series.label()}'s headers")  # fmt: skip
    return np.array(array), affine


def _write_case(case: PlannedCase, staged: Path, work: Path) -> None:
    from avn_study.data.nifti import write_nifti

    affine0, shape0 = None, None
    for k, series in enumerate(case.series):
        array, affine = run_dcm2niix(series, work)
        if affine0 is None:
            affine0, shape0 = affine, array.shape
        elif array.shape != shape0 or not np.allclose(affine, affine0, atol=AFFINE_ATOL_MM):
            raise DataError(f"{series.first.path.parent}: {case.case_id}'s channel {k} ({series.label()}) is not on "
                            "the grid of its first channel; channels must be co-registered (the import does not "
                            "resample)")  # fmt: skip
        write_nifti(array, affine, staged / case.subset / f"{case.case_id}_{k:04d}.nii.gz")
    if case.seg is not None:
        assert affine0 is not None and shape0 is not None
        referenced = next(s for s in case.series if s.uid in case.seg.referenced_series)
        from avn_study.dicom.seg import read_seg_labels

        labels = read_seg_labels(case.seg, referenced, affine0, shape0)
        write_nifti(labels, affine0, staged / LABELS_TR / f"{case.case_id}.nii.gz")


def _check_mapping(mapping: Path, out: Path, dicom_dir: Path, overwrite: bool) -> None:
    from avn_study.outputs import json_marker

    resolved = mapping.resolve()
    for folder, what in ((out, "OUT (which is meant to be shared)"), (dicom_dir, "DICOM_DIR")):
        if folder.resolve() in resolved.parents:
            raise UsageError(f"--mapping {mapping}: lies inside {what}; the private mapping must live outside it")
    if mapping.is_dir():
        raise UsageError(f"--mapping {mapping}: is a folder; expected a file path")
    if mapping.exists() and not overwrite:
        raise UsageError(f"--mapping {mapping}: already exists (a mapping of an earlier import?); choose another "
                         "path with --mapping, or pass --overwrite to replace an import and its mapping")  # fmt: skip
    if mapping.exists() and not json_marker(mapping, "written_by", WRITTEN_BY):
        raise UsageError(f"--mapping {mapping}: exists and is not a mapping that import-dicom wrote; it is never "
                         "replaced: choose another path")  # fmt: skip


def import_dicom(dicom_dir: str | Path, out: str | Path, *, channels: list[str], series: list[str] | None = None,
                 plane: str | None = None, labels_from: Path | None = None, unlabelled: str = IMAGES_TS,
                 mapping: Path | None = None, overwrite: bool = False,
                 progress: Callable[[int, int, str], None] | None = None) -> ImportResult:  # fmt: skip
    """Import a DICOM export as a cohort in the nnU-Net raw layout (see the module docstring).

    Every problem is collected before anything is written; a failed import writes nothing (OUT is built
    in a temporary sibling and renamed into place; the mapping is written last).

    Raises:
        UsageError: bad paths or arguments; OUT or the mapping exist (without ``overwrite``, or not ours).
        DataError: the export's problems (every one, each naming its series or file); a failed conversion.
    """
    from avn_study.outputs import check_target, staged_folder

    dicom_dir, out = Path(dicom_dir), Path(out)
    if not dicom_dir.is_dir():
        raise UsageError(f"DICOM_DIR {dicom_dir}: no such folder")
    if unlabelled not in UNLABELLED_DESTINATIONS:
        raise UsageError(f"--unlabelled {unlabelled!r}: expected one of {', '.join(UNLABELLED_DESTINATIONS)}")
    if dicom_dir.resolve() in out.resolve().parents:
        raise UsageError(f"OUT {out}: lies inside DICOM_DIR {dicom_dir}; write the cohort elsewhere")
    inputs = [dicom_dir] + ([labels_from] if labels_from is not None else [])
    check_target(out, flag="OUT", kind="an imported DICOM cohort", is_own=is_imported_cohort, overwrite=overwrite,
                 inputs=inputs)  # fmt: skip
    target_map = mapping_path(out, mapping)
    _check_mapping(target_map, out, dicom_dir, overwrite)
    patterns = channel_patterns(channels, series or [])
    tree = scan_tree(dicom_dir)
    segs: list[Instance] = []
    if labels_from is not None:
        if not labels_from.exists():
            raise UsageError(f"--labels-from {labels_from}: no such file or folder")
        inside = labels_from.resolve() == dicom_dir.resolve() or dicom_dir.resolve() in labels_from.resolve().parents
        if inside:  # SEG objects of the tree itself (all of them, or those under a subfolder)
            segs = [s for s in tree.segs if s.path.resolve() == labels_from.resolve()
                    or labels_from.resolve() in s.path.resolve().parents]  # fmt: skip
        else:
            seg_tree = scan_tree(labels_from) if labels_from.is_dir() else None
            segs = seg_tree.segs if seg_tree is not None else _single_seg(labels_from)
            if seg_tree is not None:
                tree.problems += seg_tree.problems
        if not segs:
            raise DataError(f"--labels-from {labels_from}: holds no DICOM SEG object")
    if not tree.series:
        raise DataError(format_problems(dicom_dir, [*tree.problems, Problem(dicom_dir, "no MR image series found")]))
    cases, problems = plan_import(tree, channels, patterns, plane, segs, unlabelled)
    if labels_from is None and tree.segs:
        problems.append(Problem(dicom_dir, f"{len(tree.segs)} DICOM SEG object(s) in the tree are not used as labels; "
                                f"pass --labels-from {dicom_dir} to use them", "warning"))  # fmt: skip
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(format_problems(dicom_dir, errors).replace(f"see `avn-study verify {dicom_dir}`",
                                                                   "nothing was written"))  # fmt: skip
    replace = is_imported_cohort if overwrite else None  # checked again right before the swap
    with tempfile.TemporaryDirectory(prefix="avn-dcm2niix-") as work, staged_folder(out, replace) as staged:
        for folder in (IMAGES_TR, LABELS_TR, unlabelled):
            (staged / folder).mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(cases):
            _write_case(case, staged, Path(work))
            if progress:
                progress(i + 1, len(cases), case.case_id)
        _write_dataset_json(staged, cases, channels, patterns, plane)
        _write_mapping(target_map, dicom_dir, out, cases, channels)
    return ImportResult(out, target_map, cases, [p for p in problems if p.severity == "warning"])


def _single_seg(path: Path) -> list[Instance]:
    from avn_study.dicom.tree import read_instance

    instance = read_instance(path)
    return [instance] if instance is not None and instance.modality == "SEG" else []


def _write_dataset_json(root: Path, cases: list[PlannedCase], channels: list[str],
                        patterns: dict[str, re.Pattern[str] | None], plane: str | None) -> None:  # fmt: skip
    spec = {
        "name": "imported DICOM cohort",
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": dict(LABELS),
        "numTraining": sum(c.subset == IMAGES_TR for c in cases),
        "file_ending": ".nii.gz",
        "patients": {c.case_id: c.patient for c in cases},
        "import_dicom": {
            "written_by": WRITTEN_BY,
            "channels": {
                name: {"series": p.pattern if p is not None else None, "plane": plane} for name, p in patterns.items()
            },
            "cases": {c.case_id: c.subset for c in cases},
        },
    }
    (root / DATASET_JSON).write_text(json.dumps(spec, indent=2) + "\n")


def _write_mapping(path: Path, dicom_dir: Path, out: Path, cases: list[PlannedCase], channels: list[str]) -> None:
    data = {
        "written_by": WRITTEN_BY,
        "private": "links the pseudonymous cases of the cohort to the hospital's identifiers: keep this file "
        "private, apart from the cohort",
        "dicom_dir": str(dicom_dir.resolve()),
        "cohort": str(out.resolve()),
        "patients": {c.patient: c.patient_id for c in cases},
        "cases": {
            c.case_id: {
                "patient": c.patient,
                "PatientID": c.patient_id,
                "StudyInstanceUID": c.study_uid,
                "series": {ch: s.uid for ch, s in zip(channels, c.series, strict=True)},
                "seg_sop_instance_uid": c.seg.sop_uid if c.seg is not None else None,
                "folder": c.subset,
            }
            for c in cases
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
