"""``avn-study export``: the selection rule, the bundle's contents, ONNX, no pickle opened, and a bundle
that reproduces its trial's validation metrics through ``avn-study predict``."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import malicious_pickle

from avn_study.bundle import export as export
from avn_study.bundle.export import SELECTION_RULE, choose_checkpoint, select
from avn_study.cli.commands import main
from avn_study.errors import AvnError, UsageError


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def exported(smoke_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default export: the best configuration over all rows."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    assert main(["export", str(smoke_experiment), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported_multitask(smoke_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multitask row's best, with ONNX (three outputs: seg, loc, recon)."""
    out = tmp_path_factory.mktemp("export") / "multitask"
    assert main(["export", str(smoke_experiment), "--out", str(out), "--arm", "seg+recon+loc", "--onnx"]) == 0
    return out


def read(bundle: Path, name: str) -> dict:
    return json.loads((bundle / name).read_text())


# ------------------------------------------------------------------------------------------ selection
def test_export_picks_the_best_mean_over_folds(exported: Path, smoke_experiment: Path) -> None:
    from avn_study.analysis import load_experiment

    experiment = load_experiment(smoke_experiment)
    stage2 = experiment.trials[(experiment.trials["stage"] == 2) & (experiment.trials["status"] == "TERMINATED")]
    means = stage2.groupby("row")["val_dice"].mean()
    metrics = read(exported, "metrics.json")
    conf = metrics["configuration"]
    assert metrics["rule"] == SELECTION_RULE and metrics["stage"] == 2 and metrics["metric"] == "val_dice"
    assert conf["row"] == means.idxmax() and conf["mean"] == pytest.approx(means.max())
    row = stage2[stage2["row"] == conf["row"]]
    assert conf["n"] == len(row) == 4  # 2 folds x 2 seeds
    assert conf["sd"] == pytest.approx(row["val_dice"].std())
    assert sorted(t["value"] for t in conf["trials"]) == pytest.approx(sorted(row["val_dice"]))
    assert [r["row"] for r in metrics["ranking"]] == list(means.sort_values(ascending=False).index)
    chosen = metrics["chosen_trial"]
    best = row.loc[row["val_dice"].idxmax()]
    assert chosen["trial_id"] == best["trial_id"] and chosen["value"] == pytest.approx(best["val_dice"])
    stored = json.loads((Path(best["path"]) / "per_case" / f"epoch_{chosen['checkpoint_epoch']:03d}.json").read_text())
    assert [c["case"] for c in chosen["per_case"]] == [c["case"] for c in stored]
    assert [c["dice"] for c in chosen["per_case"]] == [c["dice"] for c in stored]

    provenance = read(exported, "provenance.json")
    assert provenance["trial_id"] == best["trial_id"] and provenance["study"] == "smoke"
    assert provenance["split_hash"] == experiment.manifest["split_hash"] == best["split_hash"]
    assert provenance["data_fingerprint"] == best["data_fingerprint"] != ""
    assert (smoke_experiment / provenance["checkpoint"] / "model.safetensors").is_file()
    assert provenance["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", provenance["git_commit"])
    assert {"torch", "numpy", "nibabel", "ray", "avn-study"} <= set(provenance["versions"])
    assert datetime.fromisoformat(provenance["exported_at"]).tzinfo is not None
    config = read(exported, "config.json")
    assert config["model"]["arm"] == conf["row"] and config["preprocessing"]["inplane_spacing_mm"] == 4.0
    assert config["preprocessing"]["slice_size"] == 64 and config["labels"]["necrosis"] == 2


def test_rule_is_in_the_docstring_and_the_help(capsys: pytest.CaptureFixture) -> None:
    assert words(SELECTION_RULE) in words(export.__doc__ or "")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert words(SELECTION_RULE) in words(capsys.readouterr().out)


def fake_experiment(tmp_path: Path, rows: list[dict], protocol: str = "fair_ablation") -> SimpleNamespace:
    """An Experiment-like object over trial folders that hold only resolved_config.json."""
    records = []
    for i, r in enumerate(rows):
        path = tmp_path / f"trial_{i:02d}"
        path.mkdir()
        config = {"arm": r["row"], "lr": r.get("lr", 1e-3), "fold": r.get("fold", 0), "seed": r.get("seed", 0)}
        (path / "resolved_config.json").write_text(json.dumps(config))
        records.append({"trial_id": f"t{i:02d}", "stage": 2, "status": "TERMINATED", "stopped_early": False,
                        "fold": 0, "seed": 0, "repeat": 0, "hd95_mm": 1.0, **r, "path": str(path)})  # fmt: skip
    trials = pd.DataFrame(records)
    return SimpleNamespace(trials=trials, rows=list(dict.fromkeys(trials["row"])), metric="val_dice", mode="max",
                           protocol=protocol, root=tmp_path)  # fmt: skip


def test_a_lucky_fold_does_not_win(tmp_path: Path) -> None:
    experiment = fake_experiment(tmp_path, [
        {"row": "a", "fold": 0, "val_dice": 0.9}, {"row": "a", "fold": 1, "val_dice": 0.1},  # mean 0.5
        {"row": "b", "fold": 0, "val_dice": 0.6}, {"row": "b", "fold": 1, "val_dice": 0.6},  # mean 0.6
        {"row": "b", "fold": 2, "val_dice": math.nan},  # not a candidate
        {"row": "a", "fold": 2, "val_dice": 0.99, "status": "ERROR"},  # not a candidate
    ])  # fmt: skip
    sel = select(experiment)
    assert sel.best.row == "b" and sel.best.mean == pytest.approx(0.6) and len(sel.best.trials) == 2
    assert sel.trial["trial_id"] == "t02"  # tie at 0.6: the lower trial id
    assert [c.row for c in sel.configurations] == ["b", "a"]
    assert select(experiment, row="a").trial["trial_id"] == "t00"
    low = select(experiment, metric="hd95_mm")  # lower is better; all tie at 1.0: the row listed first
    assert low.mode == "min" and low.best.row == "a"
    with pytest.raises(UsageError, match=r"Unknown row \(--arm\) 'bb'; did you mean 'b'"):
        select(experiment, row="bb")
    with pytest.raises(UsageError, match=r"Unknown metric \(--metric\) 'val_dise'; did you mean 'val_dice'\?"):
        select(experiment, metric="val_dise")


def test_sweep_rule_skips_asha_stopped_trials(tmp_path: Path) -> None:
    experiment = fake_experiment(tmp_path, [
        {"row": "a", "lr": 1e-3, "stage": 1, "val_dice": 0.7},
        {"row": "a", "lr": 2e-3, "stage": 1, "val_dice": 0.95, "stopped_early": True},
        {"row": "a", "lr": 3e-3, "stage": 1, "val_dice": 0.5},
    ], protocol="sweep")  # fmt: skip
    sel = select(experiment)
    assert sel.stage == 1 and sel.trial["trial_id"] == "t00" and sel.best.config["lr"] == 1e-3
    assert len(sel.configurations) == 2  # one per sampled configuration, the stopped one left out
    experiment.trials["status"] = "ERROR"
    with pytest.raises(AvnError, match="no finished trial with a finite val_dice"):
        select(experiment)


def test_checkpoint_of_the_final_epoch_or_the_best_kept(tmp_path: Path) -> None:
    from avn_study.training.checkpoint import save_checkpoint

    model = torch.nn.Linear(1, 1)
    for index, history in enumerate([[{"epoch": 0, "val_dice": 0.4}], [{"epoch": 0}, {"epoch": 1, "val_dice": 0.3}]]):
        save_checkpoint(tmp_path / f"checkpoint_{index:06d}", model, {}, {"history": history})
    folder, record, note = choose_checkpoint({"path": str(tmp_path), "eval_epoch": 1}, "val_dice", "max")
    assert folder.name == "checkpoint_000001" and record["epoch"] == 1 and note == ""
    shutil.rmtree(tmp_path / "checkpoint_000001")  # Ray kept only the best epoch
    folder, record, note = choose_checkpoint({"path": str(tmp_path), "eval_epoch": 1}, "val_dice", "max")
    assert folder.name == "checkpoint_000000" and "did not keep the checkpoint of epoch 1" in note
    shutil.rmtree(tmp_path / "checkpoint_000000")
    with pytest.raises(AvnError, match="kept no checkpoint"):
        choose_checkpoint({"path": str(tmp_path), "eval_epoch": 1}, "val_dice", "max")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--arm", "unte"], "Unknown row (--arm) 'unte'; did you mean 'unet'? Available: seg+recon+loc, unet"),
        (["--metric", "val_dise"], "Unknown metric (--metric) 'val_dise'"),
    ],
)
def test_bad_arguments_exit_2(
    smoke_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], fragment: str
) -> None:
    assert main(["export", str(smoke_experiment), "--out", str(tmp_path / "b"), *extra]) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_existing_output_and_missing_study(
    exported: Path, smoke_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", str(smoke_experiment), "--out", str(exported)]) == 2
    assert "already exists; choose another path or pass --overwrite to replace a bundle" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "no such folder" in capsys.readouterr().err
    copy = Path(shutil.copytree(exported, tmp_path / "again"))
    assert main(["export", str(smoke_experiment), "--out", str(copy), "--overwrite"]) == 0
    assert read(copy, "metrics.json")["chosen_trial"] == read(exported, "metrics.json")["chosen_trial"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# ------------------------------------------------------------------------------------------ safety
def test_export_never_opens_ray_pickles(smoke_experiment: Path, tmp_path: Path) -> None:
    study = Path(shutil.copytree(smoke_experiment, tmp_path / "study"))
    marker = tmp_path / "pwned"
    pickles = sorted(study.rglob("*.pkl"))
    assert {p.name for p in pickles} >= {"tuner.pkl", "params.pkl"} and any(
        p.name.startswith("searcher-state") for p in pickles
    )
    for trial in study.glob("stage*/trial_*"):
        pickles.append(trial / "error.pkl")
    for path in pickles:
        malicious_pickle(path, marker)
    probe = tmp_path / "probe"  # the payload does run when unpickled
    pickle.loads(malicious_pickle(tmp_path / "probe.pkl", probe).read_bytes())
    assert probe.exists()
    assert main(["export", str(study), "--out", str(tmp_path / "bundle")]) == 0
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ ONNX
def test_onnx_matches_pytorch(exported_multitask: Path) -> None:
    import onnxruntime

    from avn_study.bundle.format import load_bundle

    bundle = load_bundle(exported_multitask)
    info = bundle.config["onnx"]
    assert info["outputs"] == ["seg", "loc", "recon"] and info["max_abs_diff_vs_torch"] <= 1e-4
    session = onnxruntime.InferenceSession(str(exported_multitask / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["seg", "loc", "recon"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch axis
    x = torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = bundle.model(x)
    for name, value in zip(["seg", "loc", "recon"], session.run(None, {"image": x.numpy()}), strict=True):
        assert value.shape == (5, 1, 64, 64)
        np.testing.assert_allclose(value, expected[name].numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ reproduction
@pytest.mark.parametrize("which", ["exported", "exported_multitask"])
def test_bundle_reproduces_the_trial_validation_metrics(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Rule: the trial's per-case metrics are computed in training space (RAS, resampled in-plane to
    the training spacing), so that is where the bundle must reproduce them, from the raw NIfTI files;
    the native-space label maps that ``predict`` writes are that prediction resampled back to each
    input's grid, whose Dice against the native label files differs by the resampling."""
    from avn_study.bundle.format import load_bundle
    from avn_study.bundle.predict import predict_volume
    from avn_study.data.cache import build_cache
    from avn_study.data.nifti import load_ras
    from avn_study.metrics.case import case_metrics

    bundle_dir = request.getfixturevalue(which)
    bundle = load_bundle(bundle_dir)
    cohort = Path(bundle.provenance["data"])
    expected = {c["case"]: c for c in bundle.metrics["chosen_trial"]["per_case"]}
    assert len(expected) == 2  # the fold's validation cases
    cached = {c.case_id: c for c in build_cache(cohort, bundle.preprocess, tmp_path / "cache")}
    inputs = tmp_path / "val"
    inputs.mkdir()
    for case in expected:
        (inputs / f"{case}_0000.nii.gz").symlink_to(cohort / "imagesTr" / f"{case}_0000.nii.gz")
    assert main(["predict", str(bundle_dir), str(inputs), str(tmp_path / "out"), "--device", "cpu"]) == 0
    margin = bundle.config["preprocessing"]["loc_margin_mm"]
    for case, reference in expected.items():
        image, geometry = load_ras(cohort / "imagesTr" / f"{case}_0000.nii.gz")
        prediction = predict_volume(bundle, image, geometry)
        truth = cached[case]
        extra = {}
        if "loc" in prediction.grid:
            extra.update(pred_loc=prediction.grid["loc"] >= 0.5, ref_loc=np.asarray(truth.head_dist) <= margin)
        if prediction.recon is not None:
            extra.update(recon=prediction.recon, recon_ref=prediction.slices[:, 0].numpy())
        got = case_metrics(prediction.grid["seg"] >= bundle.threshold, np.asarray(truth.label) == 2,
                           prediction.spacing, **extra)  # fmt: skip
        for key in ("dice", "pred_volume_ml", "hd95_mm", "lesion_fp", "loc_dice", "recon_psnr"):
            if key in reference:
                assert got[key] == pytest.approx(reference[key], abs=1e-3, nan_ok=True), (case, key)
        written = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        label = nib.load(cohort / "labelsTr" / f"{case}.nii.gz")
        assert written.shape == label.shape and np.allclose(written.affine, label.affine)
        native = nib.as_closest_canonical(written).get_fdata()
        assert np.array_equal(native, prediction.labels)  # the CLI wrote what the API predicted
        # resampling moves voxels but cannot create or erase a whole prediction of this size
        assert ((native == 2).sum() == 0) == ((prediction.grid["seg"] >= bundle.threshold).sum() == 0)
