"""Bundles and ``avn-study predict``: safe loading, refusal of tampered bundles, geometry, naming, bad inputs.

These tests use small bundles with random weights (fast); the reproduction of a trained trial's
validation metrics from a bundle is in ``test_export.py`` (it needs the shared smoke experiment).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import malicious_pickle
from nibabel import orientations as nio

from avn_study.bundle.format import BUNDLE_VERSION, load_bundle
from avn_study.bundle.predict import output_name, predict
from avn_study.cli.commands import main
from avn_study.data.nifti import write_nifti
from avn_study.errors import DataError, UsageError

ARCH = {"base_channels": 4, "depth": 2, "slice_size": 64, "inplane_spacing_mm": 4.0}


def make_bundle(out: Path, arm: str = "seg+loc", seed: int = 0, **flat: object) -> Path:
    """A bundle of a randomly initialised model (gating off, so seg and loc both predict something)."""
    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": arm, "gating": "none", **flat})
    torch.manual_seed(seed)
    model = build_model(config).eval()
    path, _ = write_bundle(out, model, config.to_flat(), {"test": True}, {"trial_id": "random"})
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be called on a bundle")

    monkeypatch.setattr(torch, "load", refuse)


def edit_config(bundle: Path, change) -> None:
    config = json.loads((bundle / "config.json").read_text())
    change(config)
    (bundle / "config.json").write_text(json.dumps(config))


def without_checksums(bundle: Path) -> Path:
    """The bundle as format version 2 wrote it (no checksums): what the checks behind the checksums see."""
    edit_config(bundle, lambda c: (c.pop("checksums", None), c.update(format_version=2)))
    return bundle


# ------------------------------------------------------------------------------------------ loading
def test_bundle_round_trip(bundle: Path, no_torch_load: None) -> None:
    loaded = load_bundle(bundle)
    config = loaded.config
    assert config["format_version"] == BUNDLE_VERSION and config["labels"] == {
        "background": 0,
        "femoral_head": 1,
        "necrosis": 2,
    }
    assert config["model"]["name"] == "multitask" and config["model"]["arm"] == "seg+loc"
    assert config["preprocessing"]["slice_axis"] == 1 and config["preprocessing"]["inplane_spacing_mm"] == 4.0
    assert loaded.branches == ("seg", "loc") and loaded.slice_size == 64 and loaded.threshold == 0.5
    assert sorted(p.name for p in bundle.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "provenance.json",
    ]


def test_pickle_in_place_of_the_weights_is_refused_unopened(
    bundle_copy: Path, tmp_path: Path, no_torch_load: None
) -> None:
    marker = tmp_path / "pwned"
    malicious_pickle(bundle_copy / "model.safetensors", marker)
    with pytest.raises(DataError, match=r"model\.safetensors: SHA-256 [0-9a-f]{16}\.\.\. differs from the"):
        load_bundle(bundle_copy)  # the checksum refuses it first; behind it, the safetensors reader
    without_checksums(bundle_copy)
    with pytest.raises(DataError, match=r"model\.safetensors: not a readable safetensors weights file"):
        load_bundle(bundle_copy)
    assert not marker.exists()
    # torch's own format (a zip of pickles) is refused the same way
    torch.save({"x": torch.zeros(1)}, bundle_copy / "model.safetensors")
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("change", "error", "fragments"),
    [
        (lambda c: c["model"].update(name="multitaks"), UsageError,
         ["key 'model.name'", "Unknown model 'multitaks'; did you mean 'multitask'?",
          "Available: cascade, multitask, unet"]),
        (lambda c: c["model"].update(arm="seg+lco"), UsageError, ["key 'model.arm'", "did you mean 'seg+loc'?"]),
        (lambda c: c["model"].update(name="unet"), UsageError, ["'model.arm' 'seg+loc' is built by model 'multitask'"]),
        (lambda c: c["model"]["config"].update(base_chanels=8), UsageError, ["did you mean 'base_channels'?"]),
        (lambda c: c.update(format_version=BUNDLE_VERSION + 98), DataError,
         [f"bundle format version {BUNDLE_VERSION + 98} is newer", "upgrade avn-study"]),
        (lambda c: c.update(format="something-else"), DataError, ["not an avn-study bundle"]),
        (lambda c: c["preprocessing"].update(slice_axis=0), DataError, ["'preprocessing.slice_axis' must be 1"]),
        (lambda c: c.pop("threshold"), DataError, ["missing key 'threshold'"]),
        (lambda c: c["labels"].update(necrosis=1), DataError, ["'labels' must be"]),
    ],
)  # fmt: skip
def test_bad_config_is_refused_naming_file_and_key(
    bundle_copy: Path, change, error: type[Exception], fragments: list[str]
) -> None:
    edit_config(bundle_copy, change)
    with pytest.raises(error) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert str(bundle_copy / "config.json") in message
    for fragment in fragments:
        assert fragment in message


def test_weights_of_another_architecture_are_refused(bundle_copy: Path, tmp_path: Path) -> None:
    without_checksums(bundle_copy)  # (with them, the checksum refuses another file first)
    other = make_bundle(tmp_path / "wide", base_channels=8)
    shutil.copyfile(other / "model.safetensors", bundle_copy / "model.safetensors")
    with pytest.raises(DataError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert str(bundle_copy / "model.safetensors") in message and "of the wrong shape" in message
    assert "[8, 1, 3, 3] in the file, [4, 1, 3, 3] in the model" in message
    unet = make_bundle(tmp_path / "unet", arm="unet")  # same encoder, no loc branch: keys missing
    shutil.copyfile(unet / "model.safetensors", bundle_copy / "model.safetensors")
    with pytest.raises(DataError, match=r"missing \(e.g. 'loc_decoder"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "metrics.json", "provenance.json"])
def test_missing_file_is_named(bundle_copy: Path, name: str) -> None:
    (bundle_copy / name).unlink()
    with pytest.raises(DataError, match=f"incomplete bundle, missing {name}"):
        load_bundle(bundle_copy)


def test_damaged_json_and_non_folder(bundle_copy: Path) -> None:
    (bundle_copy / "config.json").write_text('{"format": ')
    with pytest.raises(DataError, match=r"config\.json: not a readable JSON file"):
        load_bundle(bundle_copy)
    with pytest.raises(UsageError, match="not a folder"):
        load_bundle(bundle_copy / "model.safetensors")


# ------------------------------------------------------------------------------------------ geometry
def reoriented(ras: nib.Nifti1Image, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The RAS image stored in orientation ``codes``: permuted/flipped array and the matching affine."""
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(codes)))
    data = nio.apply_orientation(np.asarray(ras.dataobj), ornt)
    return data, ras.affine @ nio.inv_ornt_aff(ornt, ras.shape)


def test_non_ras_twins_predict_the_same_voxels(bundle: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    source = nib.as_closest_canonical(nib.load(tiny_phantom / "imagesTr" / "AVN_000_0000.nii.gz"))
    inputs = tmp_path / "in"
    for codes in ("RAS", "LPS", "PIR", "ASL"):
        data, affine = reoriented(source, codes)
        write_nifti(data, affine, inputs / f"twin{codes}_0000.nii.gz")
    assert main(["predict", str(bundle), str(inputs), str(tmp_path / "out")]) == 0
    reference = nib.load(tmp_path / "out" / "twinRAS.nii.gz").get_fdata()
    assert 0 < (reference == 2).sum() < reference.size and (reference == 1).any() and (reference == 0).any()
    for codes in ("LPS", "PIR", "ASL"):
        given = nib.load(inputs / f"twin{codes}_0000.nii.gz")
        out = nib.load(tmp_path / "out" / f"twin{codes}.nii.gz")
        assert out.shape == given.shape and np.array_equal(out.affine, given.affine)
        assert nib.aff2axcodes(out.affine) == tuple(codes) and out.get_data_dtype() == np.uint8
        assert np.array_equal(nib.as_closest_canonical(out).get_fdata(), reference), codes


def test_folder_naming_and_volumes(bundle: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(tiny_phantom / "imagesTr" / "AVN_001_0000.nii.gz", inputs / "AVN_001_0000.nii.gz")
    image = nib.load(tiny_phantom / "imagesTr" / "AVN_002_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), inputs / "scan_b.nii")
    (inputs / "notes.txt").write_text("not an image")  # ignored in folder mode
    assert main(["predict", str(bundle), str(inputs), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["AVN_001.nii.gz", "scan_b.nii", "volumes.json"]
    summary = json.loads((tmp_path / "out" / "volumes.json").read_text())
    assert summary["labels"] == {"background": 0, "femoral_head": 1, "necrosis": 2} and summary["failed"] == []
    for record in summary["cases"]:
        out = nib.load(record["output"])
        labels = np.asarray(out.dataobj)
        voxel_ml = abs(np.linalg.det(out.affine[:3, :3])) / 1000
        assert record["voxel_volume_ml"] == pytest.approx(voxel_ml)
        for name, value in (("necrosis", 2), ("femoral_head", 1)):
            assert record[name]["voxels"] == int((labels == value).sum())
            assert record[name]["volume_ml"] == pytest.approx((labels == value).sum() * voxel_ml)
        assert record["femoral_head"]["predicted"] is True


def test_single_file_writes_label_map_and_json(bundle: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    source = tiny_phantom / "imagesTr" / "AVN_003_0000.nii.gz"
    records = predict(bundle, source, tmp_path / "pred.nii.gz", device="cpu")
    stored = nib.load(source)
    out = nib.load(tmp_path / "pred.nii.gz")
    assert out.shape == stored.shape and np.array_equal(out.affine, stored.affine)
    payload = json.loads((tmp_path / "pred.json").read_text())
    assert payload["necrosis"] == records[0]["necrosis"] and payload["trial_id"] == "random"
    # an output folder for a single file: nnU-Net naming
    (tmp_path / "dir").mkdir()
    predict(bundle, source, tmp_path / "dir")
    assert (tmp_path / "dir" / "AVN_003.nii.gz").is_file() and (tmp_path / "dir" / "AVN_003.json").is_file()


def test_unet_bundle_writes_necrosis_only(tmp_path: Path, tiny_phantom: Path) -> None:
    bundle = make_bundle(tmp_path / "unet", arm="unet")
    records = predict(bundle, tiny_phantom / "imagesTr" / "AVN_000_0000.nii.gz", tmp_path / "p.nii.gz")
    labels = np.asarray(nib.load(tmp_path / "p.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 2} and records[0]["femoral_head"]["predicted"] is False


@pytest.mark.parametrize(
    ("name", "expected"),
    [("AVN_001_0000.nii.gz", "AVN_001.nii.gz"), ("case.nii", "case.nii"), ("x_0001.nii.gz", "x_0001.nii.gz")],
)
def test_output_name(name: str, expected: str) -> None:
    assert output_name(name) == expected


# ------------------------------------------------------------------------------------------ bad input
def write_bad_inputs(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("hello")
    (root / "garbage.nii.gz").write_bytes(b"this is not gzip")
    write_nifti(np.zeros((8, 8, 8, 2), np.float32), np.eye(4), root / "four_d.nii.gz")
    nan = np.ones((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(nan, np.eye(4), root / "nan.nii.gz")
    (root / "empty").mkdir(exist_ok=True)
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("missing.nii.gz", "no such file or folder"),
        ("notes.txt", "not a NIfTI file (expected a .nii or .nii.gz name)"),
        ("garbage.nii.gz", "not a gzip stream"),
        ("four_d.nii.gz", "expected a 3D volume"),
        ("nan.nii.gz", "1 NaN/Inf voxels"),
        ("empty", "no .nii or .nii.gz files in this folder"),
    ],
)
def test_bad_input_exits_2_naming_the_file(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, fragment: str
) -> None:
    write_bad_inputs(tmp_path / "bad")
    source = tmp_path / "bad" / name
    assert main(["predict", str(bundle), str(source), str(tmp_path / "out.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert f"{source}" in err and fragment in err and "Traceback" not in err


def test_folder_with_bad_files_writes_the_good_ones(
    bundle: Path, tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    write_bad_inputs(inputs)
    shutil.copyfile(tiny_phantom / "imagesTr" / "AVN_000_0000.nii.gz", inputs / "AVN_000_0000.nii.gz")
    assert main(["predict", str(bundle), str(inputs), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "3 of 4 input(s) could not be predicted" in err
    for name in ("garbage.nii.gz", "four_d.nii.gz", "nan.nii.gz"):
        assert str(inputs / name) in err
    assert (tmp_path / "out" / "AVN_000.nii.gz").is_file()
    assert len(json.loads((tmp_path / "out" / "volumes.json").read_text())["failed"]) == 3


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("channel", "an extra input channel of case 'a'"),
        ("collision", "would both be written to"),
        ("file_out", "OUTPUT must be a folder too"),
        ("bad_out", "must be a .nii or .nii.gz file name"),
    ],
)
def test_bad_names_exit_2(
    bundle: Path, tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture, setup: str, fragment: str
) -> None:
    image = tiny_phantom / "imagesTr" / "AVN_000_0000.nii.gz"
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "out"
    if setup == "channel":
        for name in ("a_0000.nii.gz", "a_0001.nii.gz"):
            shutil.copyfile(image, inputs / name)
    elif setup == "collision":
        for name in ("a_0000.nii.gz", "a.nii.gz"):
            shutil.copyfile(image, inputs / name)
    elif setup == "file_out":
        shutil.copyfile(image, inputs / "a.nii.gz")
        out.write_text("x")
    else:
        inputs = image
        out = tmp_path / "out.png"
    assert main(["predict", str(bundle), str(inputs), str(out)]) == 2
    assert fragment in capsys.readouterr().err


def test_tampered_bundle_is_a_usage_error_in_the_cli(
    bundle_copy: Path, tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    malicious_pickle(bundle_copy / "model.safetensors", marker)
    source = tiny_phantom / "imagesTr" / "AVN_000_0000.nii.gz"
    assert main(["predict", str(bundle_copy), str(source), str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avn-study predict: error: ") and "model.safetensors" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "o.nii.gz").exists()
