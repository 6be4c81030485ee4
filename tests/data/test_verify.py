"""Every verify check: a broken toy cohort per case, the message and the file asserted."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from avn_study.cli.commands import main
from avn_study.data.cache import build_cache
from avn_study.data.nifti import write_nifti
from avn_study.data.verify import verify_dataset
from avn_study.errors import DataError

IMG = "imagesTr/toy_000_0000.nii.gz"
LAB = "labelsTr/toy_000.nii.gz"


def _rewrite_json(root: Path, **changes: object) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(changes)
    (root / "dataset.json").write_text(json.dumps(spec))


def _raw(root: Path, rel: str) -> bytearray:
    return bytearray(gzip.decompress((root / rel).read_bytes()))


def _patch_header(root: Path, rel: str, offset: int, fmt: str, value: float) -> None:
    data = _raw(root, rel)
    struct.pack_into(fmt, data, offset, value)
    (root / rel).write_bytes(gzip.compress(bytes(data)))


def _rewrite_array(root: Path, rel: str, change: Callable[[np.ndarray], np.ndarray], dtype: type = np.float32) -> None:
    img = nib.load(str(root / rel))
    data = change(np.asanyarray(img.dataobj).astype(dtype))
    write_nifti(data, img.affine, root / rel)


def _set_voxel(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a[5, 2, 5] = value
        return a

    return change


def _move_necrosis_out(a: np.ndarray) -> np.ndarray:
    a[0:2, 0:2, 0:2] = 2
    return a


def _write_raw_bytes(root: Path, rel: str, data: bytes) -> None:
    (root / rel).write_bytes(data)


def _gz(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


# (id, mutation, file the problem names, message fragment)
BROKEN: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("no_dataset_json", lambda r: (r / "dataset.json").unlink(), "dataset.json", "dataset.json is missing"),
    ("bad_json", lambda r: (r / "dataset.json").write_text("{"), "dataset.json", "not valid JSON"),
    (
        "duplicate_json_key",
        lambda r: (r / "dataset.json").write_text(
            (r / "dataset.json").read_text().replace('"numTraining"', '"numTraining": 3, "numTraining"', 1)
        ),
        "dataset.json",
        "duplicate key 'numTraining'",
    ),
    (
        "missing_key",
        lambda r: (
            _rewrite_json(r, file_ending=None)
            or (r / "dataset.json").write_text(
                (r / "dataset.json")
                .read_text()
                .replace('"file_ending": null, ', "")
                .replace(', "file_ending": null', "")
            )
        ),
        "dataset.json",
        "missing key 'file_ending'",
    ),
    (
        "wrong_labels",
        lambda r: _rewrite_json(r, labels={"background": 0, "lesion": 1}),
        "dataset.json",
        "no label plays necrosis",
    ),
    (
        "declared_channel_missing",
        lambda r: _rewrite_json(r, channel_names={"0": "T1", "1": "T2"}),
        IMG,
        "case 'toy_000' lacks channel(s) _0001 (T2)",
    ),
    (
        "channel_names_out_of_order",
        lambda r: _rewrite_json(r, channel_names={"1": "T1", "0": "T2"}),
        "dataset.json",
        "channel_names must have keys '0', '1', ... in order",
    ),
    (
        "channel_names_repeated",
        lambda r: _rewrite_json(r, channel_names={"0": "T1", "1": "T1"}),
        "dataset.json",
        "each channel a distinct non-empty name",
    ),
    (
        "num_training",
        lambda r: _rewrite_json(r, numTraining=5),
        "dataset.json",
        "numTraining is 5 but labelsTr holds 3",
    ),
    ("bad_file_ending", lambda r: _rewrite_json(r, file_ending=".mha"), "dataset.json", "file_ending must be one of"),
    (
        "unknown_patient_case",
        lambda r: _rewrite_json(r, patients={"toy_000": "P0", "ghost": "P9"}),
        "dataset.json",
        "patients names case 'ghost'",
    ),
    ("image_without_label", lambda r: (r / LAB).unlink(), IMG, "image has no label"),
    ("label_without_image", lambda r: (r / IMG).unlink(), LAB, "label has no image"),
    ("missing_images_folder", lambda r: shutil.rmtree(r / "imagesTr"), "imagesTr", "folder is missing"),
    (
        "extra_channel",
        lambda r: shutil.copy(r / IMG, r / "imagesTr/toy_000_0001.nii.gz"),
        "imagesTr/toy_000_0001.nii.gz",
        "extra input channel",
    ),
    (
        "wrong_ending",
        lambda r: (r / "labelsTr/toy_009.nii").write_bytes(b""),
        "labelsTr/toy_009.nii",
        "file ending does not match",
    ),
    ("stray_file", lambda r: (r / "labelsTr/notes.txt").write_text("hi"), "labelsTr/notes.txt", "unexpected file"),
    (
        "duplicate_case_id",
        lambda r: shutil.copy(r / IMG, r / "imagesTr/TOY_000_0000.nii.gz"),
        "imagesTr/toy_000_0000.nii.gz",
        "duplicate case id",
    ),
    ("truncated_gzip", lambda r: _write_raw_bytes(r, IMG, _gz(r, IMG)[:-300]), IMG, "truncated"),
    ("cut_trailer", lambda r: _write_raw_bytes(r, IMG, _gz(r, IMG)[:-4]), IMG, "truncated"),
    (
        "bad_crc",
        lambda r: _write_raw_bytes(r, LAB, _gz(r, LAB)[:-8] + b"\0\0\0\0" + _gz(r, LAB)[-4:]),
        LAB,
        "corrupt gzip data",
    ),
    ("trailing_garbage", lambda r: _write_raw_bytes(r, IMG, _gz(r, IMG) + b"garbage"), IMG, "trailing garbage"),
    ("not_gzip", lambda r: _write_raw_bytes(r, IMG, b"plain text, not a volume"), IMG, "not a gzip stream"),
    (
        "truncated_voxels",
        lambda r: _write_raw_bytes(r, IMG, gzip.compress(bytes(_raw(r, IMG)[:-100]))),
        IMG,
        "truncated voxel data",
    ),
    (
        "short_header",
        lambda r: _write_raw_bytes(r, IMG, gzip.compress(b"\0" * 100)),
        IMG,
        "too short for a NIfTI header",
    ),
    ("shape_mismatch", lambda r: _rewrite_array(r, LAB, lambda a: a[:-1], np.uint8), LAB, "label shape"),
    ("non_integer_label", lambda r: _rewrite_array(r, LAB, _set_voxel(1.5)), LAB, "label values must be integers"),
    (
        "undeclared_label",
        lambda r: _rewrite_array(r, LAB, _set_voxel(3), np.uint8),
        LAB,
        "label values [3] are not in dataset.json's labels",
    ),
    (
        "necrosis_outside_head",
        lambda r: _rewrite_array(r, LAB, _move_necrosis_out, np.uint8),
        LAB,
        "lie outside the femoral head",
    ),
    ("nan_image", lambda r: _rewrite_array(r, IMG, _set_voxel(np.nan)), IMG, "1 NaN and 0 +/-Inf voxels"),
    ("inf_image", lambda r: _rewrite_array(r, IMG, _set_voxel(np.inf)), IMG, "0 NaN and 1 +/-Inf voxels"),
    ("constant_image", lambda r: _rewrite_array(r, IMG, lambda a: np.zeros_like(a)), IMG, "image is constant"),
    ("four_d", lambda r: _rewrite_array(r, IMG, lambda a: np.stack([a, a], -1)), IMG, "expected a 3D volume"),
    ("qform_sform", lambda r: _patch_header(r, IMG, 268, "<f", 55.0), IMG, "qform and sform disagree"),
    ("pixdim_vs_affine", lambda r: _patch_header(r, IMG, 80, "<f", 3.0), IMG, "disagrees with the spacing"),
    ("negative_spacing", lambda r: _patch_header(r, IMG, 84, "<f", -4.0), IMG, "voxel spacing must be positive"),
    ("affine_mismatch", lambda r: _patch_header(r, LAB, 292, "<f", 12.0), LAB, "label affine differs"),
]


@pytest.mark.parametrize(("mutate", "rel", "fragment"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_verify_reports_broken_input(toy_cohort: Path, mutate, rel: str, fragment: str) -> None:
    mutate(toy_cohort)
    report = verify_dataset(toy_cohort)
    assert not report.ok
    matching = [p for p in report.errors if fragment in p.message]
    assert matching, f"no error with {fragment!r} in:\n{report.format()}"
    assert any(p.path == toy_cohort / rel for p in matching), report.format()


def test_clean_cohort_passes(toy_cohort: Path) -> None:
    report = verify_dataset(toy_cohort)
    assert report.ok and report.n_cases == 3 and not report.problems, report.format()


def test_singleton_4d_is_accepted(toy_cohort: Path) -> None:
    _rewrite_array(toy_cohort, IMG, lambda a: a[..., None])
    assert verify_dataset(toy_cohort).ok


def test_zero_padding_after_gzip_is_a_warning(toy_cohort: Path) -> None:
    _write_raw_bytes(toy_cohort, IMG, _gz(toy_cohort, IMG) + b"\0" * 16)
    report = verify_dataset(toy_cohort)
    assert report.ok
    assert any("16 zero bytes of padding" in p.message and p.severity == "warning" for p in report.problems)


def test_uncompressed_nii_cohort(tmp_path: Path) -> None:
    from conftest import write_toy_cohort

    root = write_toy_cohort(tmp_path / "c")
    for path in [*root.glob("*Tr/*.nii.gz")]:
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    _rewrite_json(root, file_ending=".nii")
    assert verify_dataset(root).ok
    nii = root / "imagesTr/toy_001_0000.nii"
    nii.write_bytes(nii.read_bytes()[:-50])
    report = verify_dataset(root)
    assert any(p.path == nii and "truncated voxel data" in p.message for p in report.errors)


def test_every_problem_is_reported_at_once_and_cli_exits_2(toy_cohort: Path, capsys) -> None:
    _write_raw_bytes(toy_cohort, IMG, _gz(toy_cohort, IMG)[:-300])
    _rewrite_array(toy_cohort, "labelsTr/toy_002.nii.gz", _set_voxel(7), np.uint8)
    _rewrite_json(toy_cohort, numTraining=4)
    assert main(["verify", str(toy_cohort)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    for fragment in ("toy_000_0000.nii.gz: truncated", "toy_002.nii.gz: label values [7]", "numTraining is 4"):
        assert fragment in err
    assert "Traceback" not in err


def test_training_refuses_broken_data_with_the_same_message(toy_cohort: Path, cache_dir: Path) -> None:
    _rewrite_array(toy_cohort, IMG, _set_voxel(np.inf))
    report = verify_dataset(toy_cohort)
    with pytest.raises(DataError) as info:
        build_cache(toy_cohort, cache_dir=cache_dir)
    for problem in report.errors:
        assert str(problem) in str(info.value)


def test_verify_warns_on_a_non_coronal_acquisition(toy_cohort: Path) -> None:
    import nibabel as nib

    for rel in (IMG, "labelsTr/toy_000.nii.gz"):
        image = nib.load(toy_cohort / rel)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([2.0, 2.0, 6.0, 1.0])), toy_cohort / rel)
    report = verify_dataset(toy_cohort)
    assert report.ok, report.format()
    assert any("axial acquisition (voxel 2 x 2 x 6 mm R, A, S" in p.message and p.severity == "warning"
               for p in report.problems), report.format()  # fmt: skip
