"""Phantom scans written as DICOM MR series (pydicom) and SEG (highdicom), geometry from the NIfTI affine.

A scan's RAS array and RAS affine (``Geometry.to_ras`` / ``ras_affine`` of a phantom case) become a
stack of single-frame MR images: coronal (slices along A, rows running down S, columns running to the
patient's left, as scanners write them) or axial (slices along S). Slice files get shuffled names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLANTED = {  # identifying header values: none may appear in anything import-dicom writes
    "PatientName": "Doe^Janetquix",
    "PatientBirthDate": "19610407",
    "InstitutionName": "Xylophone Clinic Omberg",
    "ReferringPhysicianName": "Smithwick^Perpetua",
    "StudyDescription": "HIP PAIN LEFT qwertzfree",
}
LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class WrittenSeries:
    uid: str
    files: list[Path]
    sop_uids: list[str]  # in stack order
    datasets: list = field(default_factory=list, repr=False)


def stack_of(volume_ras: np.ndarray, plane: str) -> tuple[np.ndarray, callable]:
    """The (slice, row, column) stack of a RAS array and the RAS voxel index of a stack index."""
    nx, ny, nz = volume_ras.shape
    if plane == "coronal":  # stack[k, i, j] = V[X-1-j, k, Z-1-i]
        stack = volume_ras[::-1, :, ::-1].transpose(1, 2, 0)
        return stack, lambda k, i, j: (nx - 1 - j, k, nz - 1 - i)
    if plane == "axial":  # stack[k, i, j] = V[X-1-j, Y-1-i, k]
        stack = volume_ras[::-1, ::-1, :].transpose(2, 1, 0)
        return stack, lambda k, i, j: (nx - 1 - j, ny - 1 - i, k)
    raise ValueError(plane)


def _lps(affine_ras: np.ndarray, voxel: tuple) -> np.ndarray:
    return LPS @ (affine_ras[:3, :3] @ np.asarray(voxel, float) + affine_ras[:3, 3])


def write_series(folder: Path, volume_ras: np.ndarray, affine_ras: np.ndarray, *, plane: str, patient_id: str,
                 study_uid: str, study_date: str, frame_uid: str, number: int, description: str,
                 rng: np.random.Generator) -> WrittenSeries:  # fmt: skip
    """Write one MR series into ``folder`` (which may hold others); file names are shuffled."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    stack, voxel = stack_of(np.asarray(volume_ras), plane)
    n, rows, cols = stack.shape
    origin = [_lps(affine_ras, voxel(k, 0, 0)) for k in range(n)]
    row_dir = _lps(affine_ras, voxel(0, 0, 1)) - origin[0]
    col_dir = _lps(affine_ras, voxel(0, 1, 0)) - origin[0]
    spacing = [float(np.linalg.norm(col_dir)), float(np.linalg.norm(row_dir))]
    thickness = float(np.linalg.norm(origin[1] - origin[0])) if n > 1 else 1.0
    iop = [*(row_dir / spacing[1]), *(col_dir / spacing[0])]
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    names = rng.permutation(n) + rng.integers(1000, 5000)  # shuffled on disk
    written = WrittenSeries(series_uid, [], [])
    for k in range(n):
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop, "MR"
        for key, value in PLANTED.items():
            setattr(ds, key, value)
        ds.PatientID, ds.PatientSex, ds.PatientAge = patient_id, "F", "058Y"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, study_date, "101500", "1"
        ds.AccessionNumber, ds.Manufacturer, ds.ManufacturerModelName = "ACC778899", "PhantomVendor", "Model-9"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = study_date, "101600", study_date, "101700"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber, ds.AcquisitionNumber = int(names[k]) - int(names.min()) + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "SK", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 600, 12, 3, 1.5
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{thickness:.6f}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(stack[k]).astype("<i2").tobytes()
        path = folder / f"IM{int(names[k]):05d}"
        ds.save_as(path, enforce_file_format=True)
        written.files.append(path)
        written.sop_uids.append(sop)
        written.datasets.append(ds)
    return written


def write_seg(path: Path, series: WrittenSeries, label_ras: np.ndarray, plane: str = "coronal") -> Path:
    """A radiologist's SEG of a coronal series: overlapping binary segments femoral head (label >= 1, coded)
    and necrosis (label 2, found by its label text), written with highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    stack, _ = stack_of(np.asarray(label_ras), plane)
    pixels = np.stack([stack >= 1, stack == 2], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(name="manual", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")  # fmt: skip
    descriptions = [
        hd.seg.SegmentDescription(
            1,
            "Femoral head",
            codes.SCT.AnatomicalStructure,
            codes.SCT.FemoralHead,
            hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        ),
        hd.seg.SegmentDescription(
            2,
            "AVN lesion",
            codes.SCT.MorphologicallyAbnormalStructure,
            codes.SCT.Lesion,
            hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm,
        ),
    ]
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Reader", manufacturer_model_name="Slicer",
        software_versions="5", device_serial_number="1",
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
