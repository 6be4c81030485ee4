"""nnU-Net v2 rows: our folds in nnU-Net's splits_final.json, our metrics, paired with unet; planning once per node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from avn_study.cli.commands import _plan_text, main
from avn_study.errors import UsageError
from avn_study.study.check import read_epochs
from avn_study.study.space import load_space
from tests.conftest import Payload, small_space, write_toy_cohort

NNUNET_ROW = {"arm": "nnunet_2d", "nnunet_epochs": 2, "nnunet_iterations": 2, "nnunet_val_iterations": 1,
              "nnunet_tta": False}  # fmt: skip
ARMS = {"unet": {"schedule": "constant", "schedule_params": {}}, "nnunet-2d": NNUNET_ROW}


# ------------------------------------------------------------------ space files (no nnU-Net needed)
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"protocol": "sweep", "folds": [0]}, "an nnU-Net row configures itself and runs in stage 2 only"),
        ({"arms": {"n": {**NNUNET_ROW, "nnunet_epoch": 3}}}, "Unknown key in"),
        ({"arms": {"n": {**NNUNET_ROW, "nnunet_epoch": 3}}}, "did you mean 'nnunet_epochs'?"),
        ({"arms": {"n": {**NNUNET_ROW, "nnunet_labels": "head"}}}, "nnunet_labels must be one of with_head, necrosis"),
        ({"arms": {"n": {**NNUNET_ROW, "nnunet_iterations": 0}}}, "nnunet_iterations must be an integer >= 1, got 0"),
        ({"arms": {"n": {**NNUNET_ROW, "lr_rate": 1}}}, "Unknown key in"),
        ({"arms": {"nnunet_3d": {}}}, "Unknown arm 'nnunet_3d'"),
    ],
)
def test_bad_nnunet_rows(tmp_path: Path, changes: dict, fragment: str) -> None:
    path = small_space(tmp_path, **{"arms": ARMS, **changes})
    with pytest.raises(UsageError) as info:
        load_space(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_nnunet_row_without_the_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import avn_study.baselines.nnunet.run

    monkeypatch.setattr(avn_study.baselines.nnunet.run, "nnunet_installed", lambda: False)
    with pytest.raises(UsageError, match=r"arms.nnunet-2d: nnU-Net rows need nnU-Net v2.*avn-study\[nnunet\]"):
        load_space(small_space(tmp_path, arms=ARMS))


def test_nnunet_rows_have_no_stage1_and_all_of_stage2(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed: pip install 'avn-study[nnunet]'")
    space = load_space(small_space(tmp_path, arms=ARMS, seeds=[0, 1]))
    assert space.searched_rows == ["unet"]
    plan = space.plan()
    assert (plan["searches"], plan["stage2_trials"], plan["nnunet_trials"]) == (1, 4, 4)
    text = _plan_text(space)
    assert "stage 2: 1 rows x 2 folds x 2 seeds = 4 trials" in text
    assert "stage 2, nnU-Net rows (no search: nnU-Net configures itself): 4 trials" in text


def test_splits_final_is_our_split_patient_for_patient() -> None:
    from avn_study.baselines.nnunet.run import splits_final
    from avn_study.data.splits import make_splits

    patients = {f"C{i}": f"P{i // 2}" for i in range(12)}  # two scans per patient
    splits = make_splits(patients, k=3, seed=0, test_fraction=0.2)
    final = splits_final(splits)
    assert len(final) == 3
    for k, entry in enumerate(final):
        assert entry["val"] == sorted(splits.fold(k).val) and entry["train"] == sorted(splits.fold(k).train)
        assert not {patients[c] for c in entry["val"]} & {patients[c] for c in entry["train"]}
        assert not set(splits.test) & {*entry["val"], *entry["train"]}


# ------------------------------------------------------------------ a real nnU-Net row on the CPU
@pytest.fixture(scope="module")
def nnunet_study(sweep_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two processes prepare nnU-Net's dataset at once on one node cache, then a fair ablation with
    ``unet`` and a 2-epoch x 2-iteration ``nnunet_2d`` row runs on the same cache, and is analysed."""
    pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed: pip install 'avn-study[nnunet]'")
    work = tmp_path_factory.mktemp("nnunet")
    before = _listing(sweep_cohort)
    env = {**os.environ, "AVN_STUDY_CACHE": str(work / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    prepare = ("import sys; from avn_study.baselines.nnunet.run import prepare_dataset; "
               "print(prepare_dataset(sys.argv[1], '2d', 'with_head').preprocessed)")  # fmt: skip
    both = [subprocess.Popen([sys.executable, "-c", prepare, str(sweep_cohort)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in both]
    assert all(p.returncode == 0 for p in both), [err[-2000:] for _, err in outputs]
    preprocessed = {out.strip().splitlines()[-1] for out, _ in outputs}
    space = small_space(work, name="vs", arms=ARMS, trials=1, folds=[1])
    command = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(sweep_cohort),
               "--storage", str(work / "storage"), "--num-cpus", "2", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    study = work / "storage" / "vs"
    assert main(["analyze", str(study), "--out", str(work / "report")]) == 0  # (reads the study folder only)
    (root,) = {Path(p).parent.parent for p in preprocessed}
    return {"study": study, "report": work / "report", "nnunet_root": root, "cohort_before": before,
            "cohort_after": _listing(sweep_cohort)}  # fmt: skip


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_nnunet_never_writes_into_the_cohort(nnunet_study: dict, sweep_cohort: Path) -> None:
    """Its dataset (links, labels, plans, preprocessed data) lives in the node cache; the cohort is untouched."""
    assert nnunet_study["cohort_after"] == nnunet_study["cohort_before"]
    images = list((nnunet_study["nnunet_root"] / "raw").rglob("imagesTr/*.nii.gz"))
    assert images and all(p.is_symlink() and p.resolve().is_relative_to(sweep_cohort.resolve()) for p in images)


def _nnunet_trial(study: Path) -> Path:
    (trial,) = [p.parent for p in (study / "stage2").glob("*/params.json")
                if json.loads(p.read_text())["grid"]["_row"] == "nnunet-2d"]  # fmt: skip
    return trial


def test_planning_runs_once_per_node(nnunet_study: dict[str, Path]) -> None:
    """Two processes started together, then the study's trial: one layout, one planning, one preprocessing."""
    steps = [line.split(": ", 1)[1].split(" ")[0] for line in
             (nnunet_study["nnunet_root"] / "prepare.log").read_text().splitlines()]  # fmt: skip
    assert steps == ["raw", "planned", "preprocessed"]


def test_nnunet_folds_are_ours(nnunet_study: dict[str, Path], sweep_cohort: Path) -> None:
    """nnU-Net's splits_final.json is the study's frozen split, fold for fold and patient for patient."""
    ours = json.loads((nnunet_study["study"] / "splits.json").read_text())
    theirs = json.loads((_nnunet_trial(nnunet_study["study"]) / "nnunet" / "splits_final.json").read_text())
    patients = json.loads((sweep_cohort / "dataset.json").read_text())["patients"]
    assert len(theirs) == len(ours["folds"]) == ours["k"]
    held_out = {patients[c] for c in ours["test"]}
    for k, (entry, fold) in enumerate(zip(theirs, ours["folds"], strict=True)):
        assert sorted(entry["val"]) == sorted(fold["val"]) and sorted(entry["train"]) == sorted(fold["train"]), k
        val, train = {patients[c] for c in entry["val"]}, {patients[c] for c in entry["train"]}
        assert not val & train and not held_out & (val | train), k


def test_nnunet_cases_are_scored_by_our_metrics(nnunet_study: dict[str, Path], sweep_cohort: Path) -> None:
    """The per-case rows are case_metrics of the kept predictions on the cached grid, recomputed here."""
    from avn_study.baselines.nnunet.run import score
    from avn_study.data.cache import build_cache
    from avn_study.data.preprocess import PreprocessConfig

    trial = _nnunet_trial(nnunet_study["study"])
    rows = json.loads(next((trial / "per_case").glob("epoch_*.json")).read_text())
    config = json.loads((trial / "resolved_config.json").read_text())
    cases = {c.case_id: c for c in build_cache(sweep_cohort, PreprocessConfig(config["inplane_spacing_mm"]),
                                               Path(nnunet_study["nnunet_root"]).parent.parent)}  # fmt: skip
    predictions = {p.name.removesuffix(".nii.gz"): p for p in (trial / "nnunet" / "predictions").glob("*.nii.gz")}
    assert sorted(predictions) == sorted(r["case"] for r in rows)
    again = score(predictions, [cases[r["case"]] for r in rows], "with_head")
    for row, expected in zip(rows, again, strict=True):
        for key, value in expected.items():
            assert row[key] == value or (value != value and row[key] != row[key]), key  # NaN == NaN
    result = read_epochs(trial)[-1]
    assert result["nnunet_epochs"] == 2 and result["nnunet_iterations_per_epoch"] == 2
    assert result["training_iteration"] == 2 and result["nnunet_configuration"] == "2d"


def test_analyze_pairs_nnunet_with_unet(nnunet_study: dict[str, Path]) -> None:
    report = nnunet_study["report"]
    cases = pd.read_csv(report / "cases.csv")
    cases = cases[cases["stage"] == 2]  # (stage 1 of unet validated on the tuning fold)
    by_row = {row: set(group["patient"]) for row, group in cases.groupby("row")}
    assert by_row["nnunet-2d"] == by_row["unet"]  # the same patients, so every one is a pair
    comparison = pd.read_csv(report / "comparison.csv").set_index("row")
    assert comparison.loc["nnunet-2d", "reference"] == "unet"
    with_necrosis = cases[(cases["row"] == "unet") & (cases["has_necrosis"] == 1)]["patient"].nunique()
    assert comparison.loc["nnunet-2d", "n_pairs"] == with_necrosis
    summary = (report / "summary.md").read_text()
    assert "**nnU-Net rows** (nnunet-2d): nnU-Net v2 configures itself" in summary


def test_export_refuses_an_nnunet_row(nnunet_study: dict[str, Path], tmp_path: Path) -> None:
    from avn_study.analysis.tables import load_experiment
    from avn_study.bundle.export import select

    experiment = load_experiment(nnunet_study["study"])
    with pytest.raises(UsageError, match="row 'nnunet-2d' is an nnU-Net row"):
        select(experiment, row="nnunet-2d")
    chosen = select(experiment)
    assert chosen.trial["row"] == "unet" and any("nnU-Net rows are not exported" in n for n in chosen.notes)


def test_an_nnunet_trial_resumes_from_its_checkpoint(nnunet_study: dict[str, Path], sweep_cohort: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    """Like nnU-Net's --c: a trial restored from its epoch-0 checkpoint runs only what is left."""
    import pickle
    import shutil

    import torch

    from avn_study.baselines.nnunet.run import EpochHooks, NnUNetConfig, run_trial
    from avn_study.data.splits import make_splits

    cfg = NnUNetConfig.from_flat({**NNUNET_ROW, "n_folds": 3, "fold": 1, "inplane_spacing_mm": 4.0}, source="test")
    cache = nnunet_study["nnunet_root"].parent.parent  # the module's node cache: nothing is planned again
    saved, reported = tmp_path / "epoch0.pth", []

    def keep(record: dict, checkpoint: Path | None) -> None:
        reported.append(record["epoch"])
        if checkpoint is not None:
            shutil.copyfile(checkpoint / "checkpoint_latest.pth", saved)

    patients = json.loads((sweep_cohort / "dataset.json").read_text())["patients"]
    split = make_splits(patients, k=3, seed=0, test_fraction=0.2)  # with a held-out test patient
    first = run_trial(cfg, sweep_cohort, cache, split.to_dict(), tmp_path / "a", EpochHooks(keep), None, test=True)
    assert reported == [0] and saved.is_file()  # the last epoch is reported by the trial, with its scores
    assert torch.load(saved, weights_only=True)["current_epoch"] == 1  # tensors and plain values only
    marker = tmp_path / "unpickled"
    torch.save({"network_weights": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):  # a checkpoint carrying code is refused, never run
        run_trial(cfg, sweep_cohort, cache, split.to_dict(), tmp_path / "c", EpochHooks(keep), tmp_path / "evil.pth")
    assert not marker.exists() and reported == [0]
    reported.clear()
    second = run_trial(cfg, sweep_cohort, cache, split.to_dict(), tmp_path / "b", EpochHooks(keep), saved, test=True)
    assert reported == [] and second["record"]["epoch"] == 1  # epoch 0 was not trained again
    assert [r["case"] for r in second["val"]] == [r["case"] for r in first["val"]] == sorted(split.fold(1).val)
    assert sorted(r["case"] for r in second["test"]) == sorted(split.test) and split.test  # the test set, scored
    steps = (nnunet_study["nnunet_root"] / "prepare.log").read_text().count("planned")
    assert steps == 1


def test_vs_nnunet_space_compares_on_the_same_grid() -> None:
    pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed: pip install 'avn-study[nnunet]'")
    from avn_study.resources import shipped_space

    space = load_space(shipped_space("vs_nnunet"))
    assert {"unet", "seg+recon+loc", "nnunet-2d"} <= set(space.arms)
    assert space.searched_rows == ["unet", "seg+recon+loc"]
    assert space.protocol == "nested_ablation" and "inplane_spacing_mm" not in space.arms["nnunet-2d"]


def test_a_perfect_prediction_scores_perfectly_in_every_orientation(sweep_cohort: Path, tmp_path: Path) -> None:
    """The reference label files scored as if nnU-Net had written them (the phantom stores a third of its
    scans in other orientations than RAS): Dice 1 and HD95 0 on every necrotic case."""
    from avn_study.baselines.nnunet.run import score
    from avn_study.data.cache import build_cache
    from avn_study.data.preprocess import PreprocessConfig
    from avn_study.errors import DataError

    cases = build_cache(sweep_cohort, PreprocessConfig(inplane_spacing_mm=4.0), tmp_path / "cache")
    assert {c.meta["source"]["axcodes"] for c in cases} != {"RAS"}
    oracle = {c.case_id: sweep_cohort / "labelsTr" / f"{c.case_id}.nii.gz" for c in cases}
    rows = score(oracle, cases, "with_head")
    necrotic = [r for r in rows if r["has_necrosis"]]
    assert necrotic and all(r["dice"] == 1.0 and r["hd95_mm"] == 0.0 for r in necrotic)
    wrong = {c.case_id: oracle[cases[(i + 1) % len(cases)].case_id] for i, c in enumerate(cases)}
    with pytest.raises(DataError, match="the nnU-Net prediction has shape"):
        score(wrong, cases, "with_head")


def test_held_out_test_patients_take_no_part_in_nnunets_plans(tmp_path: Path) -> None:
    """nnU-Net fingerprints, plans and normalises from imagesTr: the split's test cases go to imagesTs,
    without labels, so its plans rest on no held-out patient."""
    import json

    from avn_study.baselines.nnunet.run import _write_raw
    from avn_study.data.layout import open_cohort

    cohort = open_cohort(write_toy_cohort(tmp_path / "cohort", n=3))
    held = frozenset({cohort.cases[0].case_id})
    _write_raw(cohort, cohort.cases, "with_head", tmp_path / "raw", held)
    images = {p.name for p in (tmp_path / "raw" / "imagesTr").iterdir()}
    assert not any(name.startswith(cohort.cases[0].case_id) for name in images) and len(images) == 2
    assert {p.name for p in (tmp_path / "raw" / "imagesTs").iterdir()} == {f"{cohort.cases[0].case_id}_0000.nii.gz"}
    assert len(list((tmp_path / "raw" / "labelsTr").iterdir())) == 2
    assert json.loads((tmp_path / "raw" / "dataset.json").read_text())["numTraining"] == 2
