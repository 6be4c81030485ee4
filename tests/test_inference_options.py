"""Inference options (flip TTA, post-processing) and fold-ensemble bundles: exact definitions, the bundle
format (version 2), refusals, and ``export --ensemble`` from a real study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import ARCH, make_bundle, without_checksums

from avn_study.bundle.format import InferenceOptions, load_bundle
from avn_study.bundle.predict import postprocess, resolve_options, slice_probabilities
from avn_study.cli.commands import main
from avn_study.errors import DataError, UsageError


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tta") / "b", seed=2)


def _slices(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_flip_tta_is_the_mean_with_the_mirrored_prediction(bundle_dir: Path) -> None:
    from avn_study.training.validation import predict_slices

    bundle = load_bundle(bundle_dir)
    x, cpu = _slices(), torch.device("cpu")
    plain = predict_slices(bundle.model, x, cpu)
    mirrored = predict_slices(bundle.model, torch.flip(x, dims=[2]), cpu)
    got = slice_probabilities(bundle, x, cpu, tta="flip")
    for key in ("seg", "loc"):
        expected = (plain[key].astype(np.float64) + mirrored[key][:, ::-1]) / 2
        assert np.allclose(got[key], expected, atol=1e-6), key
    assert not np.allclose(got["seg"], plain["seg"], atol=1e-6)  # the mirror changes something
    # equivariance: the TTA prediction of a mirrored scan is the mirrored TTA prediction
    flipped = slice_probabilities(bundle, torch.flip(x, dims=[2]), cpu, tta="flip")
    assert np.allclose(flipped["seg"], got["seg"][:, ::-1], atol=1e-6)
    assert all(np.array_equal(slice_probabilities(bundle, x, cpu)[k], plain[k]) for k in plain)  # none: unchanged


def test_postprocessing_restricts_to_the_head_and_drops_small_components() -> None:
    necrosis = np.zeros((20, 20, 20), bool)
    necrosis[2:8, 2:8, 2:8] = True  # 216 voxels of 8 mm^3: 1.728 ml
    necrosis[15, 15, 15] = True  # 0.008 ml
    loc = np.zeros(necrosis.shape, np.float32)
    loc[:10] = 0.9
    spacing = (2.0, 2.0, 2.0)
    assert postprocess(necrosis, loc, spacing, InferenceOptions()).sum() == 217
    assert postprocess(necrosis, loc, spacing, InferenceOptions(restrict_to_head=True)).sum() == 216
    kept = postprocess(necrosis, None, spacing, InferenceOptions(min_component_ml=0.01))
    assert kept.sum() == 216 and not kept[15, 15, 15]
    assert postprocess(necrosis, None, spacing, InferenceOptions(min_component_ml=1.728)).sum() == 216  # >= keeps
    assert postprocess(necrosis, None, spacing, InferenceOptions(min_component_ml=1.8)).sum() == 0


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"tta": "rotate"}, "tta must be one of none, flip"),
        ({"min_component_ml": -1.0}, "min_component_ml must be a finite number >= 0"),
        ({"min_component_ml": float("nan")}, "min_component_ml must be a finite number >= 0"),
    ],
)
def test_bad_inference_options_are_usage_errors(bundle_dir: Path, changes: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        resolve_options(load_bundle(bundle_dir), **changes)


def test_restrict_to_head_needs_a_loc_branch(tmp_path: Path, tiny_phantom: Path, capsys) -> None:
    unet = make_bundle(tmp_path / "unet", arm="unet")
    image = next((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))
    assert main(["predict", str(unet), str(image), str(tmp_path / "o.nii.gz"), "--restrict-to-head"]) == 2
    assert (
        "restrict_to_head needs a localisation branch, and this bundle's arm 'unet' has none" in capsys.readouterr().err
    )


def test_bundle_defaults_are_used_recorded_and_overridden(tmp_path: Path, tiny_phantom: Path) -> None:
    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": "seg+loc", "gating": "none"})
    torch.manual_seed(0)
    options = InferenceOptions(tta="flip", restrict_to_head=True, min_component_ml=0.05)
    path, _ = write_bundle(tmp_path / "b", build_model(config).eval(), config.to_flat(), {}, {"trial_id": "x"},
                           inference=options)  # fmt: skip
    bundle = load_bundle(path)
    assert bundle.inference == options and bundle.config["format_version"] >= 2  # (2 added the options)
    image = next((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))
    assert main(["predict", str(path), str(image), str(tmp_path / "a.nii.gz")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["inference"] == options.to_json()
    assert main(["predict", str(path), str(image), str(tmp_path / "b.nii.gz"), "--tta", "none",
                 "--no-restrict-to-head", "--min-component-ml", "0"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["inference"] == InferenceOptions().to_json() and record["models"] == 1
    config_json = json.loads((path / "config.json").read_text())
    config_json["inference"]["tta"] = "spin"
    (path / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(DataError, match="key 'inference': tta must be one of none, flip"):
        load_bundle(path)


def test_a_version_1_bundle_still_loads(bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    old = Path(shutil.copytree(bundle_dir, tmp_path / "v1"))
    config = json.loads((old / "config.json").read_text())
    config["format_version"] = 1
    del config["inference"]
    (old / "config.json").write_text(json.dumps(config))
    assert load_bundle(old).inference == InferenceOptions()


# ------------------------------------------------------------------------------------------ ensembles
@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": "seg+loc", "gating": "none"})
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(config).eval())
    members = [(m, {"trial_id": f"t{i}", "fold": i, "seed": 0}) for i, m in enumerate(models[1:], start=1)]
    path, _ = write_bundle(tmp_path_factory.mktemp("ens") / "b", models[0], config.to_flat(), {}, {"trial_id": "t0"},
                           members=members)  # fmt: skip
    return path


def test_an_ensemble_predicts_the_mean_of_its_members(ensemble_dir: Path) -> None:
    from avn_study.training.validation import predict_slices

    bundle = load_bundle(ensemble_dir)
    assert len(bundle.models) == 3 and (ensemble_dir / "ensemble" / "member_02.safetensors").is_file()
    x, cpu = _slices(1), torch.device("cpu")
    each = [predict_slices(m, x, cpu) for m in bundle.models]
    got = slice_probabilities(bundle, x, cpu)
    assert np.allclose(got["seg"], np.mean([e["seg"] for e in each], axis=0), atol=1e-7)
    both = slice_probabilities(bundle, x, cpu, tta="flip")  # 3 models x 2 views
    mirrored = [predict_slices(m, torch.flip(x, dims=[2]), cpu)["seg"][:, ::-1] for m in bundle.models]
    assert np.allclose(both["seg"], np.mean([e["seg"] for e in each] + mirrored, axis=0), atol=1e-6)


def test_a_tampered_ensemble_is_refused(ensemble_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(ensemble_dir, tmp_path / "copy"))
    config = json.loads((copy / "config.json").read_text())
    config["ensemble"][2]["file"] = "../elsewhere.safetensors"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="member files must be"):
        load_bundle(copy)
    copy2 = Path(shutil.copytree(ensemble_dir, tmp_path / "copy2"))
    other = make_bundle(tmp_path / "wide", base_channels=8)
    shutil.copy(other / "model.safetensors", copy2 / "ensemble" / "member_01.safetensors")
    with pytest.raises(DataError, match=r"member_01\.safetensors: SHA-256 .* differs from the"):
        load_bundle(copy2)
    without_checksums(copy2)  # behind the checksums: the shapes
    with pytest.raises(DataError, match=r"member_01\.safetensors: the weights do not fit the model"):
        load_bundle(copy2)
    copy3 = Path(shutil.copytree(ensemble_dir, tmp_path / "copy3"))
    (copy3 / "ensemble" / "member_02.safetensors").unlink()
    (copy3 / "ensemble" / "member_02.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(DataError, match="outside the bundle"):
        load_bundle(copy3)


def test_export_ensemble_bundles_every_trial_of_the_best_configuration(
    smoke_experiment: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "ensemble"
    assert main(["export", str(smoke_experiment), "--out", str(out), "--ensemble", "--tta", "flip"]) == 0
    printed = capsys.readouterr().out
    bundle = load_bundle(out)
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["configuration"]["n"]
    assert n >= 2 and len(bundle.models) == n == metrics["ensemble"]["members"]
    assert f"fold ensemble: all {n} trial(s)" in printed
    members = bundle.config["ensemble"]
    ids = {str(t["trial_id"]) for t in metrics["configuration"]["trials"]}
    assert {m.get("trial_id", metrics["chosen_trial"]["trial_id"]) for m in members} == ids
    assert bundle.inference.tta == "flip"
    # the chosen trial is described by its own checkpoint, as in a single-model bundle (not by a member's)
    assert main(["export", str(smoke_experiment), "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["chosen_trial"] == single["chosen_trial"] and metrics["chosen_trial"]["checkpoint_value"] is not None
    assert main(["export", str(smoke_experiment), "--out", str(tmp_path / "x"), "--ensemble", "--onnx"]) == 2
    assert "--onnx writes one model" in capsys.readouterr().err
