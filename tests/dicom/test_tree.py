"""What DICOM exports get wrong, one fault at a time, on a small synthetic series; and two channels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_writer import write_series

from avn_study.cli.commands import main

pydicom = pytest.importorskip("pydicom")

SHAPE = (12, 5, 10)  # RAS voxels: coronal slices along A
AFFINE = np.array([[2.0, 0, 0, -11.0], [0, 4.0, 0, 20.0], [0, 0, 2.0, -9.0], [0, 0, 0, 1]])


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE).astype(np.int16)


def write(folder: Path, plane: str = "coronal", description: str = "COR T1", **kw: object):
    from pydicom.uid import generate_uid

    common = {"patient_id": "X1", "study_uid": kw.pop("study_uid", None) or generate_uid(), "study_date": "20230101",
              "frame_uid": kw.pop("frame_uid", None) or generate_uid(), "rng": np.random.default_rng(0)}  # fmt: skip
    return write_series(folder, kw.pop("image", volume()), AFFINE, plane=plane, number=kw.pop("number", 2),
                        description=description, **common)  # fmt: skip


def edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def problems_of(root: Path) -> list[str]:
    from avn_study.dicom.tree import scan_tree, series_problems

    tree = scan_tree(root)
    found = [f"{p.severity}: {p.message}" for p in tree.problems]
    for series in tree.series.values():
        found += [f"{p.severity}: {p.message}" for p in series_problems(series)]
    return found


def test_a_clean_series_has_no_problem(tmp_path: Path) -> None:
    write(tmp_path / "s")
    assert problems_of(tmp_path) == []


def test_several_frames_of_reference(tmp_path: Path) -> None:
    written = write(tmp_path / "s")
    edit(written.files[0], FrameOfReferenceUID="1.2.3.4")
    assert any("error: " in p and "2 frames of reference in one series" in p for p in problems_of(tmp_path))


def test_gantry_tilt_is_an_error_and_an_oblique_stack_a_warning(tmp_path: Path) -> None:
    written = write(tmp_path / "tilt")
    for path in written.files:  # slices shifted along S as they go along A: a sheared stack
        x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
        edit(path, ImagePositionPatient=[x, y, z + 0.5 * y])
    found = problems_of(tmp_path)
    assert any(p.startswith("error: ") and "gantry tilt" in p for p in found), found
    oblique = tmp_path / "oblique"
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    written = write(oblique / "s")
    row, col = np.array([1.0, 0, 0]), np.array([0, s, -c])
    for k, path in enumerate(sorted(written.files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[1]))):
        edit(path, ImageOrientationPatient=[*row, *col], ImagePositionPatient=list(k * 4.0 * np.cross(row, col)))
    found = problems_of(oblique)
    assert any(p.startswith("warning: ") and "oblique stack" in p and "12.0 degrees" in p for p in found), found
    assert not any(p.startswith("error: ") for p in found), found


def test_duplicates_mixed_orientations_and_stray_files(tmp_path: Path) -> None:
    written = write(tmp_path / "s")
    ds = pydicom.dcmread(written.files[0])
    ds.InstanceNumber = 99  # same SOP instance UID, other content
    ds.save_as(tmp_path / "s" / "again.dcm")
    edit(written.files[1], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    found = problems_of(tmp_path)
    assert any("duplicate SOP instance UID" in p and "different content" in p for p in found), found
    assert any("slices of 2 orientations in one series" in p for p in found), found
    assert sum("not a DICOM file" in p for p in found) == 1  # hidden files are skipped


def test_two_channels_on_one_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pydicom.uid import generate_uid

    study, frame = generate_uid(), generate_uid()
    write(tmp_path / "dicom" / "t1", description="COR T1 TSE", study_uid=study, frame_uid=frame, number=2)
    write(tmp_path / "dicom" / "stir", description="COR STIR", study_uid=study, frame_uid=frame, number=3,
          image=volume(1))  # fmt: skip
    out = tmp_path / "cohort"
    argv = ["import-dicom", str(tmp_path / "dicom"), str(out), "--channels", "T1,STIR", "--unlabelled",
            "imagesUnlabelled", "--mapping", str(tmp_path / "private" / "map.json")]  # fmt: skip
    assert main([*argv, "--series", "T1"]) == 2
    assert "name the channel: --series T1=REGEX" in capsys.readouterr().err
    assert main([*argv, "--series", "T1=t1 tse", "--series", "STRI=stir"]) == 2
    assert "did you mean 'STIR'?" in capsys.readouterr().err
    assert main([*argv, "--series", "T1=t1 tse"]) == 0  # STIR: by its name
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1", "1": "STIR"} and spec["numTraining"] == 0
    assert sorted(p.name for p in (out / "imagesUnlabelled").iterdir()) == ["case_000_0000.nii.gz",
                                                                            "case_000_0001.nii.gz"]  # fmt: skip
    import nibabel as nib

    t1, stir = (nib.load(str(out / "imagesUnlabelled" / f"case_000_000{i}.nii.gz")) for i in range(2))
    assert not np.array_equal(np.asarray(t1.dataobj), np.asarray(stir.dataobj))
    np.testing.assert_allclose(t1.affine, stir.affine, atol=1e-6)
    mapping = json.loads((tmp_path / "private" / "map.json").read_text())
    assert set(mapping["cases"]["case_000"]["series"]) == {"T1", "STIR"}
