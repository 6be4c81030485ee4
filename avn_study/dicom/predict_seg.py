"""``avn-study predict ... --dicom-seg SOURCE_DICOM_DIR``: each predicted mask also as a DICOM SEG.

Before anything is predicted, every input is matched to the series of SOURCE_DICOM_DIR it was
converted from (the one on its grid holding its voxels) and every SEG's path is checked, so a bad
folder costs no prediction. The SEG of ``{case}.nii.gz`` is ``{case}_seg.dcm`` beside it; the JSON
record (``OUT.json`` / ``volumes.json``) lists it, which is what ``--overwrite`` may replace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avn_study.dicom.tree import Series
from avn_study.errors import DataError, UsageError

SEG_SUFFIX = "_seg.dcm"


@dataclass(frozen=True)
class PlannedSeg:
    mask: Path  # the NIfTI label map predict writes
    series: Series  # the source series the SEG references
    target: Path  # the SEG file


def seg_path(mask: Path) -> Path:
    """``case.nii.gz`` -> ``case_seg.dcm``."""
    name = mask.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")
    return mask.with_name(stem + SEG_SUFFIX)


def _record(output: Path, folder: bool, mask: Path) -> Path:
    from avn_study.bundle.predict import json_path

    return output / "volumes.json" if folder else json_path(mask)


def _listed_segs(record: Path) -> set[str]:
    from avn_study.bundle.predict import written_by_predict

    if not written_by_predict(record):
        return set()
    data = json.loads(record.read_text())
    return {Path(str(c.get("dicom_seg", ""))).name for c in data.get("cases", [data]) if isinstance(c, dict)}


def plan_segs(bundle, source: Path, output: Path, dicom_dir: Path, overwrite: bool) -> list[PlannedSeg]:
    """Match every input to its source series and check every SEG path (see the module docstring).

    Raises:
        UsageError: SOURCE_DICOM_DIR is missing; a SEG exists (without ``overwrite``, or one predict did not
            write).
        DataError: inputs without (or with several) source series, each named.
    """
    from avn_study.bundle.predict import plan
    from avn_study.dicom.seg import match_series
    from avn_study.dicom.tree import scan_tree

    if not Path(dicom_dir).is_dir():
        raise UsageError(f"--dicom-seg {dicom_dir}: no such folder")
    pairs, folder = plan(Path(source), Path(output), overwrite, bundle.channels)
    tree = scan_tree(dicom_dir)
    candidates = list(tree.series.values())
    planned, problems = [], []
    for src, dst in pairs:
        first = src[0] if isinstance(src, tuple) else src
        target = seg_path(dst)
        if target.exists():
            if not overwrite:
                raise UsageError(f"{target}: already exists; pass --overwrite to replace earlier predictions")
            if target.name not in _listed_segs(_record(Path(output), folder, dst)):
                raise UsageError(f"{target}: exists and predict's record does not list it as a DICOM SEG it wrote; "
                                 "it is not replaced: choose another OUTPUT")  # fmt: skip
        try:
            planned.append(PlannedSeg(dst, match_series(candidates, first), target))
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError(f"--dicom-seg {dicom_dir}: {len(problems)} input(s) have no source series there (nothing was "
                        "predicted):\n" + "\n".join(f"  - {p}" for p in problems))  # fmt: skip
    return planned


def write_segs(bundle, planned: list[PlannedSeg], records: list[dict], source: Path, output: Path) -> list[Path]:
    """Write each predicted mask as a SEG of its source series and list it in predict's JSON record."""
    import nibabel as nib

    from avn_study.dicom.seg import write_seg

    segments = ("femoral_head", "necrosis") if "loc" in bundle.branches else ("necrosis",)
    name = Path(bundle.path).name
    trial = str(bundle.provenance.get("trial_id") or "")
    written = []
    by_output = {str(r["output"]): r for r in records}
    folder = Path(source).is_dir()
    for item in planned:
        image = nib.load(str(item.mask))
        labels = np.asarray(image.dataobj).reshape(image.shape[:3])
        write_seg(item.series, labels, image.affine, item.target, bundle_name=name, bundle_version=trial,
                  segments=segments)  # fmt: skip
        written.append(item.target)
        if str(item.mask) in by_output:
            by_output[str(item.mask)]["dicom_seg"] = str(item.target)
    for item in planned:
        record = _record(Path(output), folder, item.mask)
        if not record.is_file():
            continue
        data = json.loads(record.read_text())
        for case in data.get("cases", [data]):
            if str(case.get("output")) in by_output and "dicom_seg" in by_output[str(case.get("output"))]:
                case["dicom_seg"] = by_output[str(case["output"])]["dicom_seg"]
        record.write_text(json.dumps(data, indent=1) + "\n")
        if folder:
            break
    return written
