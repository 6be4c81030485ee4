"""The nnU-Net v2 raw layout: ``dataset.json``, ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``.

:func:`scan_cohort` reads the layout and returns every problem it finds instead of stopping at the
first, so ``avn-study verify`` can list them all. :func:`open_cohort` is what training uses: the same
scan, raising :class:`~avn_study.errors.DataError` with the same messages when anything is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from avn_study.data.labels import LABELS, parse_label_map
from avn_study.data.problems import Problem, format_problems
from avn_study.errors import DataError

DATASET_JSON = "dataset.json"  # the cohort's description: channels, labels, numTraining, file_ending, patients
IMAGES_TR, LABELS_TR = "imagesTr", "labelsTr"  # the labelled training cases
IMAGES_TS, LABELS_TS = "imagesTs", "labelsTs"  # a held-out test set (labelsTs optional: unlabelled test scans)
UNLABELLED_DIR = "imagesUnlabelled"  # scans without labels: reconstruction (pre-)training only
SUBSET_FOLDERS = {"Tr": (IMAGES_TR, LABELS_TR), "Ts": (IMAGES_TS, LABELS_TS)}  # subset -> (images, labels)
SUBSETS = tuple(SUBSET_FOLDERS)
CHANNEL_SUFFIX = "_0000"  # the first input channel; nnU-Net numbers channels _0000, _0001, ...
MAX_CHANNELS = 8
FILE_ENDINGS = (".nii.gz", ".nii")
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    patient_id: str
    image: Path  # the first channel (``_0000``)
    label: Path | None  # None for unlabelled (imagesTs) cases
    extra: tuple[Path, ...] = ()  # further channels ``_0001``, ... in dataset.json's channel order

    @property
    def images(self) -> tuple[Path, ...]:
        """Every channel's file, in ``channel_names`` order."""
        return (self.image, *self.extra)


@dataclass
class Cohort:
    """A scanned dataset folder: the training cases in sorted order and the dataset.json contents."""

    root: Path
    spec: dict
    cases: list[CaseFiles] = field(default_factory=list)
    unlabelled: list[CaseFiles] = field(default_factory=list)  # imagesUnlabelled/: reconstruction only

    @property
    def file_ending(self) -> str:
        return self.spec.get("file_ending", ".nii.gz")

    def patients(self) -> dict[str, str]:
        return {c.case_id: c.patient_id for c in self.cases}

    @property
    def channels(self) -> list[str]:
        """The input channels' names in file order (``_0000``, ``_0001``, ...), e.g. ``["T1", "STIR"]``."""
        return channel_names(self.spec)[0] or ["T1"]

    @property
    def label_map(self):  # -> avn_study.data.labels.LabelMap (imported late: labels.py imports this module)
        """How the cohort's label values map to necrosis and femoral head (see ``avn_study.data.labels``)."""

        label_map, problems = parse_label_map(self.spec, self.root / DATASET_JSON)
        if label_map is None:
            raise DataError(format_problems(self.root, problems))
        return label_map


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key '{key}'")
        seen[key] = value
    return seen


def read_dataset_json(root: Path) -> tuple[dict | None, list[Problem]]:
    """Parse ``dataset.json`` and check its keys; duplicate JSON keys are an error, not last-wins."""
    path = root / DATASET_JSON
    if not path.is_file():
        return None, [Problem(path, f"{DATASET_JSON} is missing (expected the nnU-Net v2 raw layout)")]
    try:
        spec = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as err:
        return None, [Problem(path, f"not valid JSON: {err}")]
    if not isinstance(spec, dict):
        return None, [Problem(path, f"expected a JSON object, got {type(spec).__name__}")]
    problems = [Problem(path, f"missing key '{key}'") for key in REQUIRED_KEYS if key not in spec]
    problems += _check_spec_values(path, spec)
    return spec, problems


def channel_names(spec: dict) -> tuple[list[str] | None, str]:
    """The names of ``channel_names`` in channel order, or ``(None, what is wrong)``."""
    channels = spec.get("channel_names", {"0": "T1"})
    expected = "keys '0', '1', ... in order (at most 8 channels), each naming a modality such as 'T1' or 'STIR'"
    if not isinstance(channels, dict) or not 1 <= len(channels) <= MAX_CHANNELS:
        return None, f"channel_names must be an object with {expected}, got {channels!r}"
    if list(channels) != [str(i) for i in range(len(channels))]:
        return None, f"channel_names must have {expected}, got keys {list(channels)}"
    names = list(channels.values())
    if not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
        return None, f"channel_names must give each channel a distinct non-empty name, got {channels!r}"
    return names, ""


def _check_spec_values(path: Path, spec: dict) -> list[Problem]:
    problems = []
    if channel_names(spec)[0] is None:
        problems.append(Problem(path, channel_names(spec)[1]))

    problems += parse_label_map(spec, path)[1]
    ending = spec.get("file_ending", ".nii.gz")
    if ending not in FILE_ENDINGS:
        problems.append(Problem(path, f"file_ending must be one of {FILE_ENDINGS}, got {ending!r}"))
    n = spec.get("numTraining", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(Problem(path, f"numTraining must be a non-negative integer, got {n!r}"))
    patients = spec.get("patients", {})
    if not isinstance(patients, dict) or not all(isinstance(v, str) and v for v in patients.values()):
        problems.append(Problem(path, "patients must map case ids to non-empty patient id strings"))
    return problems


def _case_id(name: str, ending: str, suffix: str) -> str | None:
    if not name.endswith(ending):
        return None
    stem = name[: -len(ending)]
    if suffix:
        return stem[: -len(suffix)] if stem.endswith(suffix) else None
    return stem


def _scan_folder(folder: Path, ending: str, suffix: str) -> tuple[dict[str, Path], list[Problem]]:
    """Map case id -> file, reporting files that do not fit the naming scheme and duplicate ids."""
    found: dict[str, Path] = {}
    problems = []
    other_ending = next(e for e in FILE_ENDINGS if e != ending)
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        case = _case_id(path.name, ending, suffix)
        if case is None:
            if _case_id(path.name, other_ending, suffix) is not None:
                problems.append(Problem(path, f"file ending does not match dataset.json file_ending {ending!r}"))
            else:
                problems.append(Problem(path, f"unexpected file: expected names like case{suffix}{ending}"))
            continue
        if case.lower() in {c.lower() for c in found}:
            problems.append(Problem(path, f"duplicate case id '{case}' (ids must be unique, case-insensitively)"))
            continue
        found[case] = path
    return found, problems


def _scan_images(
    folder: Path, ending: str, names: list[str]
) -> tuple[dict[str, tuple[Path, ...]], list[Problem], set[str]]:
    """Map case id -> its channel files ``{case}_0000``, ``{case}_0001``, ...; report the rest; also return
    the cases with some channels missing."""
    declared = ", ".join(f"_{i:04d} {n}" for i, n in enumerate(names))
    by_channel: dict[int, dict[str, Path]] = {}
    problems = []
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        if match is None:
            other = next(e for e in FILE_ENDINGS if e != ending)
            if path.name.endswith(other) and re.search(r"_\d{4}" + re.escape(other) + "$", path.name):
                problems.append(Problem(path, f"file ending does not match dataset.json file_ending {ending!r}"))
            else:
                problems.append(Problem(path, f"unexpected file: expected names like case{CHANNEL_SUFFIX}{ending}"))
            continue
        case, channel = match.group(1), int(match.group(2))
        if channel >= len(names):
            problems.append(Problem(path, f"extra input channel _{channel:04d}: dataset.json declares "
                                    f"{len(names)} channel(s) ({declared})"))  # fmt: skip
            continue
        found = by_channel.setdefault(channel, {})
        if case.lower() in {c.lower() for c in found}:
            problems.append(Problem(path, f"duplicate case id '{case}' (ids must be unique, case-insensitively)"))
            continue
        found[case] = path
    cases = sorted({c for found in by_channel.values() for c in found})
    images, incomplete = {}, set()
    for case in cases:
        missing = [i for i in range(len(names)) if case not in by_channel.get(i, {})]
        if missing:
            incomplete.add(case)
            where = by_channel[next(i for i in range(len(names)) if i not in missing)][case]
            problems.append(Problem(where, f"case '{case}' lacks channel(s) "
                            f"{', '.join(f'_{i:04d} ({names[i]})' for i in missing)}"))  # fmt: skip
            continue
        images[case] = tuple(by_channel[i][case] for i in range(len(names)))
    return images, problems, incomplete


def subset_folders(root: Path, subset: str) -> tuple[Path, Path]:
    """The image and the label folder of a subset (``Tr``: training, ``Ts``: a held-out test set)."""
    images, labels = SUBSET_FOLDERS[subset]
    return Path(root) / images, Path(root) / labels


def scan_cohort(root: str | Path, subset: str = "Tr") -> tuple[Cohort | None, list[Problem]]:
    """Read ``dataset.json`` and pair images with labels of ``images{subset}``/``labels{subset}``;
    report every layout problem found."""
    assert subset in SUBSETS, subset
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(root, "dataset folder does not exist")]
    spec, problems = read_dataset_json(root)
    if spec is None:
        return None, problems
    ending = spec.get("file_ending", ".nii.gz") if spec.get("file_ending") in FILE_ENDINGS else ".nii.gz"
    images_dir, labels_dir = subset_folders(root, subset)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            problems.append(Problem(folder, "folder is missing"))
    if any(p.message == "folder is missing" for p in problems):
        return None, problems
    names = channel_names(spec)[0] or ["T1"]
    images, image_problems, incomplete = _scan_images(images_dir, ending, names)
    labels, label_problems = _scan_folder(labels_dir, ending, "")
    problems += image_problems + label_problems
    for case in sorted(set(images) - set(labels)):
        problems.append(Problem(images[case][0], f"image has no label (expected {labels_dir.name}/{case}{ending}; "
                                f"a scan without a label belongs in {UNLABELLED_DIR}/)"))  # fmt: skip
    for case in sorted(set(labels) - set(images) - incomplete):
        expected = f"{images_dir.name}/{case}{CHANNEL_SUFFIX}{ending}"
        problems.append(Problem(labels[case], f"label has no image (expected {expected})"))
    paired = sorted(set(images) & set(labels))
    if subset == "Tr" and isinstance(spec.get("numTraining"), int) and spec["numTraining"] != len(labels):
        problems.append(
            Problem(
                root / DATASET_JSON, f"numTraining is {spec['numTraining']} but {LABELS_TR} holds {len(labels)} cases"
            )
        )
    patients = spec.get("patients", {}) if isinstance(spec.get("patients"), dict) else {}
    for case in sorted(set(patients) - set(images) - set(labels)) if subset == "Tr" else ():
        if any((root / folder / f"{case}{CHANNEL_SUFFIX}{ending}").exists() for folder in (UNLABELLED_DIR, IMAGES_TS)):
            continue  # a patient entry of an unlabelled or a test scan (import-dicom names every visit's patient)
        problems.append(Problem(root / DATASET_JSON, f"patients names case '{case}' that has no files"))
    cases = [CaseFiles(c, str(patients.get(c, c)), images[c][0], labels[c], images[c][1:]) for c in paired]
    if not cases:
        problems.append(Problem(labels_dir, "no labelled cases found"))
    unlabelled = []
    if subset == "Tr" and (root / UNLABELLED_DIR).is_dir():
        found, unlabelled_problems, _ = _scan_images(root / UNLABELLED_DIR, ending, names)
        problems += unlabelled_problems
        for case in sorted(set(found) & set(images)):
            problems.append(Problem(found[case][0], f"case id '{case}' is in {IMAGES_TR} too; an unlabelled scan "
                                    "needs an id of its own"))  # fmt: skip
        unlabelled = [CaseFiles(c, str(patients.get(c, c)), found[c][0], None, found[c][1:])
                      for c in sorted(set(found) - set(images))]  # fmt: skip
    return Cohort(root, spec, cases, unlabelled), problems


def open_cohort(root: str | Path) -> Cohort:
    """Scan a dataset folder for training; raise with every layout problem when it is broken."""
    cohort, problems = scan_cohort(root)
    errors = [p for p in problems if p.severity == "error"]
    if errors or cohort is None:
        raise DataError(format_problems(root, errors))
    return cohort


def write_dataset_json(root: Path, case_patients: dict[str, str], **extra: object) -> Path:
    """Write a ``dataset.json`` for the cases in ``case_patients`` (case id -> patient id)."""
    spec = {
        "channel_names": {"0": "T1"},
        "labels": LABELS,
        "numTraining": len(case_patients),
        "file_ending": ".nii.gz",
        "patients": dict(sorted(case_patients.items())),
        **extra,
    }
    path = root / DATASET_JSON
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path
