"""Scans without labels (``imagesUnlabelled/``): verified, cached, and used for the reconstruction term only,
never from a patient the run validates or tests on, never in a segmentation metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avn_study.cli.commands import main
from avn_study.config import TrainConfig
from avn_study.data.verify import verify_dataset
from avn_study.errors import DataError
from avn_study.training.fold import prepare_data
from avn_study.training.run import TrainingRun

BASE = {"n_folds": 3, "slice_size": 64, "depth": 2, "base_channels": 4, "inplane_spacing_mm": 4.0, "epochs": 2,
        "threads": 1, "batch_size": 8, "schedule": "constant", "schedule_params": {}}  # fmt: skip


@pytest.fixture(scope="module")
def cohorts(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny phantom as it is, and a copy with three unlabelled scans: one of a new patient, one of a
    labelled patient (P000), one of a patient nobody else has."""
    root = tmp_path_factory.mktemp("unlabelled")
    plain = Path(shutil.copytree(tiny_phantom, root / "plain", ignore=shutil.ignore_patterns("splits.json")))
    extra = Path(shutil.copytree(plain, root / "extra"))
    (extra / "imagesUnlabelled").mkdir()
    spec = json.loads((extra / "dataset.json").read_text())
    for name, source in (("U_new", "AVN_001"), ("U_p0", "AVN_002"), ("U_x", "AVN_003")):
        shutil.copy(plain / "imagesTr" / f"{source}_0000.nii.gz", extra / "imagesUnlabelled" / f"{name}_0000.nii.gz")
    spec["patients"]["U_p0"] = spec["patients"]["AVN_000"]
    (extra / "dataset.json").write_text(json.dumps(spec))
    return plain, extra


def test_unlabelled_scans_are_verified_and_reported(cohorts, tmp_path: Path, capsys) -> None:
    _, extra = cohorts
    report = verify_dataset(extra)
    assert report.ok and "and 3 unlabelled scan(s) (reconstruction only)" in report.format()
    broken = Path(shutil.copytree(extra, tmp_path / "broken"))
    (broken / "imagesUnlabelled" / "U_x_0000.nii.gz").write_bytes(b"not a nifti")
    assert main(["verify", str(broken)]) == 2
    assert "imagesUnlabelled/U_x_0000.nii.gz" in capsys.readouterr().err


def test_a_run_never_trains_on_scans_of_patients_it_validates(cohorts, tmp_path: Path) -> None:
    _, extra = cohorts
    for fold in range(3):
        config = TrainConfig.from_flat({**BASE, "arm": "seg+recon", "fold": fold})
        data = prepare_data(extra, config, tmp_path / "cache", tmp_path / "splits.json")
        validated = {c.patient_id for c in data.val}
        used = {c.case_id for c in data.unlabelled}
        assert {"U_new", "U_x"} <= used  # patients with no labelled scan
        assert ("U_p0" in used) == ("P000" not in validated)  # P000's scan only where P000 trains
        assert not {c.patient_id for c in data.unlabelled} & validated
    assert prepare_data(extra, TrainConfig.from_flat({**BASE, "arm": "unet"}), tmp_path / "cache",
                        tmp_path / "splits.json").unlabelled == []  # fmt: skip


def test_unlabelled_slices_train_the_reconstruction_only(cohorts, tmp_path: Path) -> None:
    _, extra = cohorts
    config = TrainConfig.from_flat({**BASE, "arm": "seg+recon"})
    run = TrainingRun(config, prepare_data(extra, config, tmp_path / "cache", tmp_path / "splits.json"))
    record = run.run_epoch()
    assert record["unlabelled_slices"] == min(round(0.5 * record["train_slices"]), len(run.unlabelled)) > 0
    assert record["loss_recon_unlabelled"] > 0
    cases = {c["case"] for c in run.last_per_case}
    assert cases == {c.case_id for c in run.data.val} and not any(c.startswith("U_") for c in cases)


def test_without_the_ratio_a_run_is_the_run_without_the_folder(cohorts, tmp_path: Path) -> None:
    plain, extra = cohorts

    def history(root: Path, **flat) -> str:
        config = TrainConfig.from_flat({**BASE, "arm": "seg+recon", **flat})
        run = TrainingRun(config, prepare_data(root, config, tmp_path / "cache", tmp_path / f"{root.name}.json"))
        while not run.done:
            run.run_epoch()
        return json.dumps([{k: v for k, v in r.items() if k != "train_seconds"} for r in run.history], sort_keys=True)

    assert history(extra, unlabelled_ratio=0.0) == history(plain)
    assert history(extra) != history(plain)


def test_a_broken_unlabelled_scan_stops_training_naming_it(cohorts, tmp_path: Path) -> None:
    _, extra = cohorts
    broken = Path(shutil.copytree(extra, tmp_path / "broken"))
    (broken / "imagesUnlabelled" / "U_new_0000.nii.gz").write_bytes(b"\x1f\x8b broken")
    config = TrainConfig.from_flat({**BASE, "arm": "seg+recon"})
    with pytest.raises(DataError, match=r"imagesUnlabelled/U_new_0000\.nii\.gz"):
        prepare_data(broken, config, tmp_path / "cache", tmp_path / "splits.json")


def test_a_study_checks_unlabelled_scans_before_ray(cohorts, tmp_path: Path) -> None:
    from conftest import small_space

    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    _, extra = cohorts
    broken = Path(shutil.copytree(extra, tmp_path / "broken", ignore=shutil.ignore_patterns("splits.json")))
    (broken / "imagesUnlabelled" / "U_x_0000.nii.gz").write_bytes(b"junk")
    study = Study(load_space(small_space(tmp_path)), broken, str(tmp_path / "storage"), progress=False)
    with pytest.raises(DataError, match=r"imagesUnlabelled/U_x_0000\.nii\.gz"):
        study.prepare(resume=False)
