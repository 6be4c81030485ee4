"""``avn-study predict --dicom-seg``: masks back as DICOM SEG on the source series, read back with highdicom."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_writer import write_series

from avn_study.cli.commands import main
from avn_study.data.nifti import Geometry
from avn_study.data.phantom import PhantomConfig, synth_case

hd = pytest.importorskip("highdicom")


def make_bundle(out: Path, arm: str = "seg+loc") -> Path:
    """A bundle of a randomly initialised small model (gating off: both branches predict something)."""
    import torch

    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    flat = {"base_channels": 4, "depth": 2, "slice_size": 64, "inplane_spacing_mm": 4.0, "arm": arm, "gating": "none"}
    config = TrainConfig.from_flat(flat)
    torch.manual_seed(0)
    path, _ = write_bundle(out, build_model(config).eval(), config.to_flat(), {"test": True}, {"trial_id": "t0"})
    return path


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory):
    """Two visits as DICOM (coronal T1 and an axial T1 each), imported, predicted with --dicom-seg."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(1)
    series = {}
    for n in range(2):
        case = synth_case(n, 2, PhantomConfig.tiny(non_ras_fraction=0.5))
        geometry = Geometry.of(case.image.shape, case.affine)
        image, affine = geometry.to_ras(case.image), geometry.ras_affine
        common = {"patient_id": f"PID{n}", "study_uid": generate_uid(), "study_date": "20220101",
                  "frame_uid": generate_uid(), "rng": rng}  # fmt: skip
        folder = root / "dicom" / f"v{n}"
        series[f"case_{n:03d}"] = write_series(folder, image, affine, plane="coronal", number=5,
                                               description="T1 cor", **common)  # fmt: skip
        write_series(folder, image, affine, plane="axial", number=6, description="T1 ax", **common)
    cohort = root / "cohort"
    assert main(["import-dicom", str(root / "dicom"), str(cohort), "--plane", "coronal"]) == 0
    bundle = make_bundle(root / "bundle")
    out = root / "masks"
    argv = ["predict", str(bundle), str(cohort / "imagesTs"), str(out), "--device", "cpu", "--dicom-seg",
            str(root / "dicom")]  # fmt: skip
    assert main(argv) == 0
    return root, cohort, out, series, argv


def test_seg_equals_the_nifti_mask_on_the_source_series(predicted) -> None:
    from avn_study.dicom.geometry import stack_map
    from avn_study.dicom.tree import scan_tree

    root, _, out, series, _ = predicted
    tree = scan_tree(root / "dicom")
    assert sorted(p.name for p in out.iterdir()) == ["case_000.nii.gz", "case_000_seg.dcm", "case_001.nii.gz",
                                                     "case_001_seg.dcm", "volumes.json"]  # fmt: skip
    nonempty = 0
    for case, written in series.items():
        seg = hd.seg.segread(out / f"{case}_seg.dcm")
        source = written.datasets[0]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == written.uid
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == set(written.sop_uids)
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
        labels = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
        assert labels[1].SegmentLabel == "femoral head" and labels[2].SegmentLabel == "necrosis"
        assert labels[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "2812003"
        assert labels[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "6574001"
        algorithm = labels[2].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "avn-study" and "bundle" in str(algorithm.AlgorithmParameters)
        mask = nib.load(str(out / f"{case}.nii.gz"))
        volume = np.asarray(mask.dataobj)
        stack_uids = [i.sop_uid for i in tree.series[written.uid].sorted_instances()]
        pixels = seg.get_pixels_by_source_instance(stack_uids, combine_segments=True,
                                                   assert_missing_frames_are_empty=True)  # fmt: skip
        mapping = stack_map(tree.series[written.uid], mask.affine, volume.shape)
        assert mapping is not None
        np.testing.assert_array_equal(mapping.to_volume(pixels), volume)  # voxel for voxel
        nonempty += int((volume == 2).any() and (volume == 1).any())
    assert nonempty >= 1
    record = json.loads((out / "volumes.json").read_text())
    assert [Path(c["dicom_seg"]).name for c in record["cases"]] == ["case_000_seg.dcm", "case_001_seg.dcm"]


def test_seg_outputs_follow_the_overwrite_rule(predicted, capsys) -> None:
    _, _, out, _, argv = predicted
    before = (out / "case_000_seg.dcm").read_bytes()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "case_000_seg.dcm").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0  # its own SEGs, listed in volumes.json
    assert (out / "case_000_seg.dcm").read_bytes() != before  # a new SOP instance


def test_an_input_without_its_source_series_is_refused_before_predicting(predicted, tmp_path: Path, capsys) -> None:
    root, cohort, _, _, _ = predicted
    elsewhere = tmp_path / "dicom"
    (elsewhere / "v0").mkdir(parents=True)
    for path in (root / "dicom" / "v0").iterdir():  # the first visit only
        (elsewhere / "v0" / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "masks"
    argv = ["predict", str(root / "bundle"), str(cohort / "imagesTs"), str(out), "--device", "cpu", "--dicom-seg",
            str(elsewhere)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "case_001_0000.nii.gz: no series of the DICOM folder is on this image's grid" in err
    assert not out.exists()


def test_file_mode_and_a_model_without_localisation(predicted, tmp_path: Path) -> None:
    root, cohort, _, series, _ = predicted
    bundle = make_bundle(tmp_path / "unet", arm="unet")
    out = tmp_path / "one.nii.gz"
    argv = ["predict", str(bundle), str(cohort / "imagesTs" / "case_001_0000.nii.gz"), str(out), "--device", "cpu",
            "--dicom-seg", str(root / "dicom")]  # fmt: skip
    assert main(argv) == 0
    seg = hd.seg.segread(tmp_path / "one_seg.dcm")
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "necrosis")]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["case_001"].uid
    assert json.loads((tmp_path / "one.json").read_text())["dicom_seg"] == str(tmp_path / "one_seg.dcm")
