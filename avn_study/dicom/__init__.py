"""DICOM in and out: ``import-dicom`` (a DICOM export to the nnU-Net raw layout) and DICOM SEG.

Needs the optional extra ``avn-study[dicom]`` (pydicom, highdicom, dcm2niix); this module itself imports
none of them, so the command line can refuse politely (exit 2, with the install line) without them.

- :mod:`avn_study.dicom.tree`: walking an export, series, visits, and the faults exports have;
- :mod:`avn_study.dicom.geometry`: the exact index map between a slice stack and a NIfTI volume;
- :mod:`avn_study.dicom.convert`: series selection, dcm2niix, the layout, pseudonyms and the mapping;
- :mod:`avn_study.dicom.seg`: DICOM SEG label maps in, predictions out (highdicom).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from avn_study.errors import UsageError

INSTALL_LINE = "pip install -c constraints.txt 'avn-study[dicom]'"
_NEEDED = ("pydicom", "highdicom", "dcm2niix")


def require_dicom(command: str) -> None:
    """Refuse ``command`` (exit 2, with the install line) when the ``dicom`` extra is not installed.

    Raises:
        UsageError: pydicom, highdicom or dcm2niix cannot be imported.
    """
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"{command} needs the optional DICOM support ({', '.join(missing)} missing); install it "
                         f"with: {INSTALL_LINE}")  # fmt: skip


def looks_like_dicom(folder: Path, probe: int = 50) -> bool:
    """Whether a folder (without ``dataset.json``) holds DICOM files: the ``DICM`` mark at byte 128 of one of
    the first ``probe`` files."""
    for n, path in enumerate(p for p in sorted(Path(folder).rglob("*")) if p.is_file()):
        if n >= probe:
            break
        try:
            with path.open("rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def verify_dicom_tree(root: Path) -> tuple[bool, str]:
    """``avn-study verify`` on a DICOM export: every series' and the tree's problems, and a summary.

    Returns:
        Whether there is no error, and the report's text (series named without header free text).
    """
    from avn_study.data.problems import format_problems
    from avn_study.dicom.tree import scan_tree, series_problems

    tree = scan_tree(root)
    problems = list(tree.problems)
    for series in tree.series.values():
        problems += series_problems(series)
    visits = tree.visits()
    patients = {patient for patient, _ in visits}
    summary = (f"{root}: DICOM export, {len(tree.series)} MR series in {len(visits)} visit(s) of {len(patients)} "
               f"patient(s), {len(tree.segs)} DICOM SEG object(s), {tree.skipped} other DICOM file(s)")  # fmt: skip
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        return False, summary + "\n" + format_problems(root, problems).replace(
            f"see `avn-study verify {root}`", "then `avn-study import-dicom`"
        )
    lines = [summary + (f" ({len(problems)} warning(s))" if problems else ""), *(f"  - {p}" for p in problems)]
    lines += [f"  {s.label()}" for series in visits.values() for s in series]
    return True, "\n".join(lines)


__all__ = ["INSTALL_LINE", "looks_like_dicom", "require_dicom", "verify_dicom_tree"]
