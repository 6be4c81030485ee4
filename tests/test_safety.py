"""Nothing a user types destroys, corrupts or silently rewrites a study, a cohort or a bundle.

Each case runs the command as a user would and asserts on the message and on the files left intact
(checksums of the folder before and after). Cases that need Ray live in ``test_study_lock.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import small_space

from avn_study.cli.commands import main


def checksums(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) -> sha256 of its bytes."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "cs"
    assert main(["synth", str(out), "--cases", "6", "--tiny", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(smoke_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety-bundle") / "bundle"
    assert main(["export", str(smoke_experiment), "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------- 1. export --overwrite
def test_export_overwrite_never_replaces_the_study_a_parent_or_the_cwd(
    smoke_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = checksums(smoke_experiment)
    assert main(["export", str(smoke_experiment), "--out", str(smoke_experiment), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    parent = tmp_path / "P"
    study = Path(shutil.copytree(smoke_experiment, parent / "study"))
    (parent / "precious.txt").write_text("keep me")
    assert main(["export", str(study), "--out", str(parent), "--overwrite"]) == 2
    assert "a folder holding it" in capsys.readouterr().err and (parent / "precious.txt").read_text() == "keep me"
    work = tmp_path / "D"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["export", str(study), "--out", ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err and (work / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    assert main(["export", str(study), "--out", str(other), "--overwrite"]) == 2
    assert "replaces only a bundle, and this is not one (it holds data.csv)" in capsys.readouterr().err
    assert (other / "data.csv").read_text() == "1,2" and checksums(smoke_experiment) == before


def test_export_overwrite_replaces_its_own_bundle(smoke_experiment: Path, bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    (copy / "stale.txt").write_text("from an older export")
    assert main(["export", str(smoke_experiment), "--out", str(copy), "--overwrite"]) == 0
    assert not (copy / "stale.txt").exists() and (copy / "model.safetensors").is_file()  # replaced whole


# ------------------------------------------------------------------------------ 2. sweep --name
@pytest.mark.parametrize(
    "name", ["../../x", "..", ".", "/tmp/avn-abs", "a" * 300, "a b", ".hidden", "x/y", "-rf", "", "n\x00ul", "é"]
)
def test_sweep_name_never_escapes_the_storage(name: str, cohort: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    storage = tmp_path / "deep" / "storage"
    space = small_space(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["sweep", str(space), "--data", str(cohort), "--storage", str(storage), f"--name={name}"]
    assert main(argv) == 2
    assert "is not a safe folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not storage.exists()
    assert not Path("/tmp/avn-abs").exists()


# --------------------------------------------------------------------------- 4. row names, 5. YAML
def test_rows_that_share_a_folder_are_refused_naming_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fresh = {"schedule": "constant", "schedule_params": {}}
    arms = {"seg+loc": fresh, "seg-loc": {"arm": "unet", **fresh}}
    space = small_space(tmp_path, arms=arms)
    assert main(["sweep", str(space), "--data", str(tmp_path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "rows 'seg+loc' and 'seg-loc' map to the same folder 'stage1-seg-loc'" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["name", "categorical"])
def test_a_yaml_alias_bomb_is_refused_at_once(where: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    value = "*a9"
    body = f"name: {value}\n" if where == "name" else f"name: bomb\nsearch:\n  gating: {{categorical: {value}}}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n" + body)
    started = time.perf_counter()
    assert main(["sweep", str(path), "--data", str(tmp_path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 5 and len(err) < 1000
    assert f"{path}: line " in err and "YAML aliases (*a" in err and "expand to more than 100,000 values" in err


def test_yaml_aliases_within_the_budget_are_fine(tmp_path: Path) -> None:
    from avn_study.study.space import load_space

    shared = {"schedule": "constant", "schedule_params": {}}  # PyYAML writes &id001 / *id001 for these
    path = small_space(tmp_path, arms={"a": {**shared, "arm": "unet"}, "b": {**shared, "arm": "seg"}})
    assert "*id001" in path.read_text()  # the shared schedule_params dict
    assert set(load_space(path).arms) == {"a", "b"}


def test_space_files_that_are_not_text_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["sweep", str(path), "--data", str(tmp_path), "--storage", str(tmp_path / "s")]) == 2
    assert f"{path}: not UTF-8 text (byte 9" in capsys.readouterr().err
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "# padding\n" * 120_000)
    assert main(["sweep", str(big), "--data", str(tmp_path), "--storage", str(tmp_path / "s")]) == 2
    assert "a search-space file is at most 1,000,000" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 6. synth, split
def test_synth_never_rewrites_an_existing_folder(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = checksums(cohort)
    assert main(["synth", str(cohort), "--cases", "2", "--tiny"]) == 2
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert checksums(cohort) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scan.nii.gz").write_bytes(b"not a phantom")
    assert main(["synth", str(mine), "--cases", "2", "--tiny", "--overwrite"]) == 2
    assert "replaces only a phantom cohort" in capsys.readouterr().err and (mine / "scan.nii.gz").is_file()
    copy = Path(shutil.copytree(cohort, tmp_path / "copy"))
    (copy / "labelsTr" / "stale.nii.gz").write_bytes(b"x")
    assert main(["synth", str(copy), "--cases", "2", "--tiny", "--overwrite"]) == 0
    spec = json.loads((copy / "dataset.json").read_text())
    assert spec["numTraining"] == 2 and len(list((copy / "imagesTr").iterdir())) == 2  # whole, not file by file
    assert not (copy / "labelsTr" / "stale.nii.gz").exists()
    assert main(["verify", str(copy)]) == 0


def test_split_never_replaces_a_frozen_split_silently(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "splits.json"
    argv = ["split", str(cohort), "--folds", "3", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    frozen = out.read_text()
    assert main([*argv, "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "a frozen split (hash" in err and "runs and studies recorded its hash" in err and out.read_text() == frozen
    assert main([*argv, "--seed", "5", "--overwrite"]) == 0 and out.read_text() != frozen
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert main(["split", str(cohort), "--folds", "3", "--out", str(notes), "--overwrite"]) == 2
    assert "replaces only a splits file" in capsys.readouterr().err and notes.read_text() == '{"mine": true}'


# ------------------------------------------------------------------------------------ 7. predict
def _scan(path: Path, affine: np.ndarray, shape: tuple[int, int, int] = (40, 12, 40)) -> Path:
    """A noise scan with exactly this sform (qform off, so even a singular affine is stored as given)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.random.default_rng(0).normal(100, 10, shape).astype(np.int16), None)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(None, code=0)
    nib.save(image, path)
    return path


def test_predict_never_writes_over_files_it_did_not_write(bundle: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    scan = _scan(tmp_path / "scan.nii.gz", np.diag([2.0, 4.0, 2.0, 1.0]))
    before = checksums(bundle)
    assert main(["predict", str(bundle), str(scan), str(bundle / "config.nii.gz")]) == 2
    assert "config.json: exists and was not written by avn-study predict" in capsys.readouterr().err
    assert checksums(bundle) == before
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(bundle), str(scan), str(out)]) == 0
    assert main(["predict", str(bundle), str(scan), str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(scan), str(out), "--overwrite"]) == 0  # its own prediction
    other = tmp_path / "theirs.nii.gz"
    shutil.copy(scan, other)
    assert main(["predict", str(bundle), str(scan), str(other), "--overwrite"]) == 2
    assert "does not list it as a prediction" in capsys.readouterr().err
    assert other.read_bytes() == scan.read_bytes()  # untouched


@pytest.mark.parametrize(
    ("affine", "code", "fragment"),
    [
        (np.diag([2000.0, 4.0, 2000.0, 1.0]), 2, "would give a"),  # 1000x spacing: a grid of hundreds of GiB
        (np.array([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), 2, "affine is unusable"),
    ],
)
def test_predict_refuses_impossible_geometry_naming_the_file(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, affine: np.ndarray, code: int, fragment: str
) -> None:
    scan = _scan(tmp_path / "bad.nii.gz", affine)
    assert main(["predict", str(bundle), str(scan), str(tmp_path / "out.nii.gz")]) == code
    err = capsys.readouterr().err
    assert str(scan) in err and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_predict_warns_on_oblique_and_implausible_spacing(bundle: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), 0, -np.sin(angle)], [0, 1, 0], [np.sin(angle), 0, np.cos(angle)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([2.0, 4.0, 2.0])
    tiny = np.diag([0.002, 4.0, 0.002, 1.0])
    for name, affine, fragment in (("oblique", oblique, "oblique acquisition: a voxel axis is 20.0 degrees"),
                                   ("tiny", tiny, "is outside 0.2-10 mm")):  # fmt: skip
        out = tmp_path / f"{name}_mask.nii.gz"
        assert main(["predict", str(bundle), str(_scan(tmp_path / f"{name}.nii.gz", affine)), str(out)]) == 0
        assert fragment in capsys.readouterr().err
        record = json.loads((tmp_path / f"{name}_mask.json").read_text())
        assert any(fragment in w for w in record["warnings"]) and record["written_by"] == "avn-study predict"


def test_predict_warns_on_non_coronal_scans_and_a_field_wider_than_the_crop(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    axial = _scan(tmp_path / "axial.nii.gz", np.diag([1.0, 1.0, 5.0, 1.0]), shape=(60, 60, 12))
    wide = _scan(tmp_path / "wide.nii.gz", np.diag([2.0, 4.0, 2.0, 1.0]), shape=(400, 12, 40))  # 800 mm across
    for scan, fragment in ((axial, "axial acquisition (voxel 1 x 1 x 5 mm R, A, S"),
                           (wide, "covers")):  # fmt: skip
        out = tmp_path / scan.name.replace(".nii.gz", "_mask.nii.gz")
        assert main(["predict", str(bundle), str(scan), str(out)]) == 0
        assert fragment in capsys.readouterr().err
    record = json.loads((tmp_path / "wide_mask.json").read_text())
    assert any("of the scan's coronal plane (800 x 80 mm, R x S); nothing is predicted outside it" in w
               for w in record["warnings"]), record["warnings"]  # fmt: skip


def test_acquisition_plane_follows_the_thick_axis_whatever_the_storage_order() -> None:
    from nibabel import orientations as nio

    from avn_study.data.nifti import Geometry

    cases = {(2.0, 4.0, 2.0): "coronal", (1.0, 1.0, 5.0): "axial", (6.0, 1.0, 1.0): "sagittal",
             (1.0, 1.1, 1.0): "isotropic"}  # fmt: skip
    for spacing, plane in cases.items():
        ras = np.diag([*spacing, 1.0])
        assert Geometry.of((10, 10, 10), ras).acquisition_plane == plane
        ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(("P", "I", "L")))
        stored = ras @ nio.inv_ornt_aff(ornt, (10, 10, 10))  # the same scan stored PIL
        assert Geometry.of((10, 10, 10), stored).acquisition_plane == plane, spacing


def test_training_warns_when_heads_reach_outside_the_crop(cohort: Path, tmp_path: Path, capsys) -> None:
    train = ["train", "--data", str(cohort), "--epochs", "1", "--slice-size", "32", "--base-channels", "4",
             "--depth", "2", "--set", "n_folds=3", "--set", "inplane_spacing_mm=4.0", "--quiet",
             "--arm", "unet", "--schedule", "constant", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(train) == 0
    err = capsys.readouterr().err
    assert "case(s) have femoral head or necrosis outside the 32-pixel slice crop = 128 mm" in err


# -------------------------------------------------------------------------- 8. bad output paths
def test_bad_output_paths_fail_before_any_work(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    train = ["train", "--data", str(cohort), "--epochs", "1", "--slice-size", "64", "--base-channels", "4",
             "--depth", "2", "--set", "n_folds=3", "--set", "inplane_spacing_mm=4.0", "--quiet"]  # fmt: skip
    started = time.perf_counter()
    assert main([*train, "--out", str(a_file)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err and time.perf_counter() - started < 5
    assert main(["synth", str(a_file), "--cases", "1", "--tiny"]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert main(["sweep", str(small_space(tmp_path)), "--data", str(cohort), "--storage", str(a_file)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err and a_file.read_text() == "x"
    run = tmp_path / "run"
    assert main([*train, "--out", str(run), "--splits", str(tmp_path / "s.json")]) == 0
    before = checksums(run)
    assert main([*train, "--out", str(run), "--splits", str(tmp_path / "s.json")]) == 2
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert checksums(run) == before
    assert main([*train, "--out", str(run), "--splits", str(tmp_path / "s.json"), "--overwrite"]) == 0
    assert main([*train, "--out", str(cohort), "--overwrite"]) == 2  # the input itself
    assert "is the input" in capsys.readouterr().err


# --------------------------------------------------------------------------------- 10. headers
def test_a_header_nibabel_would_repair_is_reported_on_its_own_file(cohort: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import gzip
    import struct

    import nibabel as nib

    copy = Path(shutil.copytree(cohort, tmp_path / "c"))
    image = sorted((copy / "imagesTr").glob("*.nii.gz"))[0]
    raw = bytearray(gzip.decompress(image.read_bytes()))
    fields = nib.Nifti1Header.template_dtype.fields
    offset = fields["sform_code"][1]
    raw[offset : offset + 2] = struct.pack("<h", 9)  # not a valid code: nibabel would read 0
    image.write_bytes(gzip.compress(bytes(raw)))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{image}: header field 'sform_code' holds an invalid value 9, which nibabel would silently replace" in err
    label = copy / "labelsTr" / image.name.replace("_0000", "")
    assert f"{label}: label affine differs" not in err  # no comparison against the repaired value


# ------------------------------------------------------------------------------------- 11. bundles
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c["model"]["config"].update(base_channels=1_000_000), "base_channels must be in [1, 512]"),
        (lambda c: c["model"]["config"].update(base_channels=512, depth=6), "channels at the deepest level"),
        (lambda c: c.update(surprise=1), "unknown top-level key(s) ['surprise']"),
    ],
)
def test_a_tampered_bundle_is_refused_before_building_anything(
    bundle: Path, tmp_path: Path, change, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    scan = _scan(tmp_path / "x.nii.gz", np.diag([2.0, 4.0, 2.0, 1.0]))
    started = time.perf_counter()
    assert main(["predict", str(copy), str(scan), str(tmp_path / "y.nii.gz")]) == 2
    assert fragment in capsys.readouterr().err and time.perf_counter() - started < 10
    assert not (tmp_path / "y.nii.gz").exists()


def test_a_bundle_file_linked_outside_the_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    from avn_study.bundle.format import load_bundle
    from avn_study.errors import DataError

    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(copy / "model.safetensors", outside)
    os.symlink(outside, copy / "model.safetensors")
    with pytest.raises(DataError, match=r"model.safetensors: a link to .*elsewhere.safetensors, outside the bundle"):
        load_bundle(copy)


def test_a_cohort_without_necrosis_is_refused_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import write_toy_case

    from avn_study.data.layout import write_dataset_json

    healthy = tmp_path / "healthy"
    for i in range(6):
        write_toy_case(healthy, f"toy_{i:03d}", i, necrosis=False)
    write_dataset_json(healthy, {f"toy_{i:03d}": f"P{i}" for i in range(6)})
    started = time.perf_counter()
    assert main(["sweep", str(small_space(tmp_path)), "--data", str(healthy), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "tuning fold 0 has no case with necrosis" in err and "the cohort has 0 case(s) with necrosis" in err
    assert time.perf_counter() - started < 30 and not (tmp_path / "s").exists()


def test_the_space_file_name_key_is_a_safe_name_too(tmp_path: Path) -> None:
    from avn_study.errors import UsageError
    from avn_study.study.space import load_space

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(small_space(tmp_path).read_text()), "name": "../up"}))
    with pytest.raises(UsageError, match=r"name: the study '\.\./up' is not a safe folder name"):
        load_space(path)
