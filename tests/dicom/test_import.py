"""``avn-study import-dicom`` on phantom scans written as DICOM: series choice, patients, geometry, PHI,
labels from SEG, and the export faults (missing slice, two candidates, a stray file) refused whole."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dicom_writer import PLANTED, WrittenSeries, write_seg, write_series

from avn_study.cli.commands import main
from avn_study.data.nifti import Geometry, load_ras
from avn_study.data.phantom import PhantomConfig, synth_case

pytest.importorskip("highdicom")


@dataclass
class Visit:
    patient_id: str
    coronal: WrittenSeries
    axial: WrittenSeries
    image_ras: np.ndarray
    label_ras: np.ndarray
    affine_ras: np.ndarray
    seg: Path | None


def write_tree(root: Path, seed: int = 5, labelled: tuple[int, ...] = (0, 2)) -> list[Visit]:
    """Two visits of patient HOSP-1234 (baseline and follow-up), one of HOSP-5678; each visit a coronal T1 and
    an axial T1 in one folder with shuffled file names; SEGs for the visits in ``labelled``."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    config = PhantomConfig.tiny(non_ras_fraction=1.0)  # stored LPS/LSP/RIA: the import must not care
    scans = [
        ("HOSP-1234", 0, False, "20190312"),
        ("HOSP-1234", 0, True, "20200917"),
        ("HOSP-5678", 1, False, "20210101"),
    ]
    visits = []
    for n, (patient_id, index, followup, date) in enumerate(scans):
        case = synth_case(index, seed, config, followup=followup)
        geometry = Geometry.of(case.image.shape, case.affine)
        image, label, affine = geometry.to_ras(case.image), geometry.to_ras(case.label), geometry.ras_affine
        study, frame = generate_uid(), generate_uid()
        folder = root / f"export{n // 2}" / f"S{n:02d}"
        common = {"patient_id": patient_id, "study_uid": study, "study_date": date, "frame_uid": frame, "rng": rng}
        coronal = write_series(folder, image, affine, plane="coronal", number=3, description="COR T1 TSE zqxfree",
                               **common)  # fmt: skip
        axial = write_series(folder, image, affine, plane="axial", number=4, description="AX T1 SE", **common)
        seg = write_seg(folder / "seg" / "mask.dcm", coronal, label) if n in labelled else None
        visits.append(Visit(patient_id, coronal, axial, image, label, affine, seg))
    return visits


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Visit]]:
    root = tmp_path_factory.mktemp("dicom") / "export"
    return root, write_tree(root)


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root, _ = tree
    out = tmp_path_factory.mktemp("imported") / "cohort"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["import-dicom", str(root), str(out), "--plane", "coronal", "--labels-from", str(root)])
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue() + stderr.getvalue()


def test_import_chooses_the_coronal_series_and_links_visits_by_patient(tree, imported) -> None:
    _, visits = tree
    out, _ = imported
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["patients"] == {"case_000": "P000", "case_001": "P000", "case_002": "P001"}
    assert spec["numTraining"] == 2 and spec["channel_names"] == {"0": "T1"}
    mapping = json.loads(out.with_name("cohort.mapping.json").read_text())
    for case, visit in zip(("case_000", "case_001", "case_002"), visits, strict=True):
        assert mapping["cases"][case]["series"] == {"T1": visit.coronal.uid}
        assert mapping["cases"][case]["PatientID"] == visit.patient_id
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_000_0000.nii.gz", "case_002_0000.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["case_001_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_002.nii.gz"]


def test_voxels_and_affines_equal_the_phantom(tree, imported) -> None:
    _, visits = tree
    out, _ = imported
    for case, visit in zip(("case_000", "case_001", "case_002"), visits, strict=True):
        folder = "imagesTs" if visit.seg is None else "imagesTr"
        image, geometry = load_ras(out / folder / f"{case}_0000.nii.gz")
        assert image.shape == visit.image_ras.shape
        np.testing.assert_array_equal(image, visit.image_ras)
        np.testing.assert_allclose(geometry.ras_affine, visit.affine_ras, atol=1e-3)
        if visit.seg is not None:  # the SEG's overlapping head and lesion segments -> 1 / 2, on the image's grid
            label, label_geometry = load_ras(out / "labelsTr" / f"{case}.nii.gz")
            np.testing.assert_array_equal(label, visit.label_ras)
            np.testing.assert_allclose(label_geometry.affine, geometry.affine, atol=1e-6)


def test_the_imported_cohort_verifies(imported, capsys: pytest.CaptureFixture) -> None:
    out, _ = imported
    assert main(["verify", str(out)]) == 0, capsys.readouterr().err


def _every_byte(folder: Path) -> list[tuple[Path, bytes]]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found.append((path, data + (gzip.decompress(data) if path.name.endswith(".gz") else b"")))
    return found


def test_no_header_phi_in_any_written_file_or_output(tree, imported) -> None:
    _, visits = tree
    out, printed = imported
    planted = [*PLANTED.values(), "Doe", "Janetquix", "zqxfree", "ACC778899", "HOSP-1234", "HOSP-5678", "20190312",
               "20200917", *(v.coronal.uid for v in visits)]  # fmt: skip
    files = _every_byte(out)
    assert len(files) == 6  # dataset.json, 3 images, 2 label maps
    for path, data in [*files, (Path("stdout+stderr"), printed.encode())]:
        for text in planted:
            assert text.encode() not in data, (text, path)
        assert path.name.startswith(("case_", "dataset.json", "stdout")) or path.parent == out, path
    mapping = out.with_name("cohort.mapping.json").read_text()  # the one private file holds the link
    assert "HOSP-1234" in mapping and "Doe" not in mapping


def test_an_existing_cohort_or_mapping_is_refused(tree, imported, tmp_path: Path, capsys) -> None:
    root, _ = tree
    out, _ = imported
    before = (out / "dataset.json").read_bytes()
    assert main(["import-dicom", str(root), str(out), "--plane", "coronal"]) == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["import-dicom", str(root), str(other), "--plane", "coronal", "--overwrite"]) == 2
    assert "not one" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    (tmp_path / "new.mapping.json").write_text("{}")
    assert main(["import-dicom", str(root), str(tmp_path / "new"), "--plane", "coronal"]) == 2
    assert "--mapping" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert (out / "dataset.json").read_bytes() == before
    copy = tmp_path / "copy"  # --overwrite replaces an import of its own, and its mapping
    shutil.copytree(out, copy)
    shutil.copyfile(out.with_name("cohort.mapping.json"), tmp_path / "copy.mapping.json")
    assert main(["import-dicom", str(root), str(copy), "--plane", "coronal", "--overwrite"]) == 0
    assert json.loads((copy / "dataset.json").read_text())["numTraining"] == 0  # no --labels-from this time
    assert "are not used as labels; pass --labels-from" in capsys.readouterr().err
    assert json.loads((tmp_path / "copy.mapping.json").read_text())["cohort"] == str(copy.resolve())


def test_two_candidates_missing_slice_and_stray_file_are_refused_together(tree, tmp_path: Path, capsys) -> None:
    root, visits = tree
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    stray = broken / "export0" / "README.txt"
    stray.write_text("exported by the PACS\n")
    order = visits[2].coronal.files  # in stack order: drop a middle slice of the third visit's coronal T1
    (broken / order[len(order) // 2].relative_to(root)).unlink()
    out = tmp_path / "cohort"
    assert main(["import-dicom", str(broken), str(out)]) == 2  # no --plane: coronal and axial both match T1
    err = capsys.readouterr().err
    assert f"{stray}: not a DICOM file" in err
    assert "2 series match channel T1" in err and "series 3 (coronal" in err and "series 4 (axial" in err
    assert "uneven slice spacing" in err and str(broken / "export1" / "S02") in err
    assert "nothing was written" in err
    assert not out.exists() and not out.with_name("cohort.mapping.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cohort")]
    for text in PLANTED.values():
        assert text not in err


def test_verify_reports_a_dicom_export(tree, tmp_path: Path, capsys) -> None:
    root, visits = tree
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "DICOM export, 6 MR series in 3 visit(s) of 2 patient(s), 2 DICOM SEG" in out
    assert "holds files of 2 series" in out
    broken = tmp_path / "dup"
    shutil.copytree(root, broken)
    first = visits[0].coronal.files[0]
    shutil.copyfile(broken / first.relative_to(root), broken / "export0" / "copy.dcm")
    assert main(["verify", str(broken)]) == 0
    assert "duplicate SOP instance: the same file as" in capsys.readouterr().out
    (broken / "export1" / "S02" / "Thumbs.db").write_bytes(b"\x00" * 300)
    assert main(["verify", str(broken)]) == 2
    assert f"{broken / 'export1' / 'S02' / 'Thumbs.db'}: not a DICOM file" in capsys.readouterr().err


def test_labels_from_one_seg_file_outside_the_tree(tree, tmp_path: Path, capsys) -> None:
    root, visits = tree
    seg = tmp_path / "labels" / "reader.dcm"
    seg.parent.mkdir()
    shutil.copyfile(visits[2].seg, seg)
    out = tmp_path / "cohort"
    assert main(["import-dicom", str(root), str(out), "--plane", "coronal", "--labels-from", str(seg)]) == 0
    assert json.loads((out / "dataset.json").read_text())["import_dicom"]["cases"] == {
        "case_000": "imagesTs", "case_001": "imagesTs", "case_002": "imagesTr"}  # fmt: skip
    label, _ = load_ras(out / "labelsTr" / "case_002.nii.gz")
    np.testing.assert_array_equal(label, visits[2].label_ras)


def test_without_the_extra_the_commands_are_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    assert main(["import-dicom", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "highdicom missing" in err and "pip install -c constraints.txt 'avn-study[dicom]'" in err
