"""Several input channels (e.g. T1 + STIR): layout, verify, cache, training, bundles, predict, evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import ARCH

from avn_study.cli.commands import main
from avn_study.data.cache import build_cache
from avn_study.data.verify import verify_dataset
from avn_study.errors import DataError

BASE = {"n_folds": 3, "slice_size": 64, "depth": 2, "base_channels": 4, "inplane_spacing_mm": 4.0, "epochs": 1,
        "threads": 1, "batch_size": 8}  # fmt: skip


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avn_study.data.phantom import PhantomConfig, write_cohort

    root = tmp_path_factory.mktemp("mc") / "cohort"
    return write_cohort(root, cases=6, seed=3, config=PhantomConfig.tiny(), channels=("T1", "STIR"))


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("splits.json")))


def test_a_two_channel_cohort_is_verified_cached_and_sliced(two_channel: Path, tmp_path: Path) -> None:
    from avn_study.data.slices import SliceConfig, SliceDataset

    assert verify_dataset(two_channel).ok
    cases = build_cache(two_channel, cache_dir=tmp_path / "cache")
    assert all(c.n_channels == 2 and c.meta["channel_names"] == ["T1", "STIR"] for c in cases)
    case = cases[0]
    assert case.channels[1].shape == case.image.shape and not np.array_equal(case.channels[1], case.image)
    dataset = SliceDataset(cases[:2], SliceConfig(size=64))
    batch = dataset.__getitems__([0, 5])
    assert batch["image"].shape == (2, 2, 64, 64) and batch["seg"].shape == (2, 1, 64, 64)
    (src, dst) = dataset.boxes[0]
    assert np.array_equal(batch["image"][0, 1][dst].numpy(), np.asarray(case.channels[1][0][src]))


def test_training_follows_the_cohorts_channels(two_channel: Path, tmp_path: Path) -> None:
    from avn_study.config import TrainConfig
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun

    config = TrainConfig.from_flat({**BASE, "arm": "seg+recon+loc"})
    data = prepare_data(two_channel, config, tmp_path / "cache", tmp_path / "splits.json")
    assert data.channels == ["T1", "STIR"]
    run = TrainingRun(config, data)
    first_conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert run.config.model.in_channels == 2 and first_conv.in_channels == 2
    record = run.run_epoch()
    assert np.isfinite(record["loss_recon"]) and "val_dice" in record
    assert run.provenance()["channels"] == ["T1", "STIR"]
    with pytest.raises(DataError, match=r"in_channels=1, but the cohort has 2 channel\(s\) \(T1, STIR\)"):
        TrainingRun(config.replace(in_channels=1), data)


def test_layout_problems_of_channels_are_named(two_channel: Path, tmp_path: Path) -> None:
    broken = _copy(two_channel, tmp_path / "broken")
    (broken / "imagesTr" / "AVN_001_0001.nii.gz").unlink()
    shutil.copy(broken / "imagesTr" / "AVN_000_0001.nii.gz", broken / "imagesTr" / "AVN_000_0002.nii.gz")
    image = nib.load(broken / "imagesTr" / "AVN_002_0001.nii.gz")
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), broken / "imagesTr" / "AVN_002_0001.nii.gz")
    messages = [str(p) for p in verify_dataset(broken).errors]
    assert any("AVN_000_0002.nii.gz: extra input channel _0002: dataset.json declares 2 channel(s)" in m
               for m in messages), messages  # fmt: skip
    assert any("case 'AVN_001' lacks channel(s) _0001 (STIR)" in m for m in messages), messages
    assert any("AVN_002_0001.nii.gz: affine differs from the first channel's" in m for m in messages), messages


def _bundle(out: Path) -> Path:
    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": "seg+loc", "gating": "none", "in_channels": 2})
    torch.manual_seed(0)
    path, _ = write_bundle(out, build_model(config).eval(), config.to_flat(), {}, {"trial_id": "mc"},
                           channels=["T1", "STIR"])  # fmt: skip
    return path


def test_predict_reads_every_channel_of_a_case(two_channel: Path, tmp_path: Path, capsys) -> None:
    from avn_study.bundle.format import load_bundle

    bundle = _bundle(tmp_path / "bundle")
    assert load_bundle(bundle).channels == ["T1", "STIR"]
    images = two_channel / "imagesTr"
    assert main(["predict", str(bundle), str(images / "AVN_000_0000.nii.gz"), str(tmp_path / "one.nii.gz")]) == 0
    record = json.loads((tmp_path / "one.json").read_text())
    assert record["channels"][1].endswith("AVN_000_0001.nii.gz")
    assert nib.load(tmp_path / "one.nii.gz").shape == nib.load(images / "AVN_000_0000.nii.gz").shape
    assert main(["predict", str(bundle), str(images), str(tmp_path / "all")]) == 0
    n_cases = len(list(images.glob("*_0000.nii.gz")))
    assert len(json.loads((tmp_path / "all" / "volumes.json").read_text())["cases"]) == n_cases
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(images / "AVN_000_0000.nii.gz", lonely)
    assert main(["predict", str(bundle), str(lonely / "AVN_000_0000.nii.gz"), str(tmp_path / "x.nii.gz")]) == 2
    assert "AVN_000_0001.nii.gz: missing channel _0001 (STIR) of case 'AVN_000'" in capsys.readouterr().err


def test_evaluate_matches_channels_by_name(two_channel: Path, tmp_path: Path, capsys) -> None:
    bundle = _bundle(tmp_path / "bundle")
    out = tmp_path / "a"
    assert main(["evaluate", str(bundle), str(two_channel), "--out", str(out), "--device", "cpu"]) == 0
    swapped = _copy(two_channel, tmp_path / "swapped")  # the same scans, channels numbered the other way round
    for first in (swapped / "imagesTr").glob("*_0000.nii.gz"):
        second = first.with_name(first.name.replace("_0000", "_0001"))
        first.rename(first.with_suffix(".tmp"))
        second.rename(first)
        first.with_suffix(".tmp").rename(second)
    spec = json.loads((swapped / "dataset.json").read_text())
    spec["channel_names"] = {"0": "STIR", "1": "T1"}
    (swapped / "dataset.json").write_text(json.dumps(spec))
    assert main(["evaluate", str(bundle), str(swapped), "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert (out / "per_case.csv").read_text() == (tmp_path / "b" / "per_case.csv").read_text()
    spec["channel_names"] = {"0": "STIR", "1": "PD"}
    (swapped / "dataset.json").write_text(json.dumps(spec))
    assert main(["evaluate", str(bundle), str(swapped), "--out", str(tmp_path / "c")]) == 2
    assert "channel_names (STIR, PD) lack T1, which the bundle reads (T1, STIR)" in capsys.readouterr().err


def test_onnx_of_a_two_channel_model_takes_two_channels(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from avn_study.bundle.onnx import export_onnx
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": "unet", "in_channels": 2})
    info = export_onnx(build_model(config).eval(), tmp_path / "m.onnx", 64, channels=2)
    assert info["input"]["shape"] == ["batch", 2, 64, 64] and info["max_abs_diff_vs_torch"] < 1e-3
