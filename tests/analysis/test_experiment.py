"""Analysis of a real (smoke) fair ablation: tidy tables, report, plots, and no pickle opened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import malicious_pickle

from avn_study.analysis import analyze, load_experiment, write_analysis
from avn_study.cli.commands import main


def test_tables_have_one_row_per_trial_case_and_epoch(smoke_experiment: Path) -> None:
    exp = load_experiment(smoke_experiment)
    trials = exp.trials
    assert len(trials) == 2 * 2 + 2 * 2 * 2  # stage 1: 2 rows x 2 Optuna trials; stage 2: 2 rows x 2 folds x 2 seeds
    assert set(trials["status"]) == {"TERMINATED"}
    stage2 = trials[trials["stage"] == 2]
    assert sorted(stage2.groupby("row").size().tolist()) == [4, 4]
    assert set(zip(stage2["fold"], stage2["seed"], strict=True)) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for column in ("trial_id", "arm", "schedule", "val_dice", "best_val_dice", "train_seconds", "node",
                   "split_hash", "lr", "epochs", "stopped_early"):  # fmt: skip
        assert column in trials, column
    assert trials["split_hash"].nunique() == 1 and trials["node"].str.len().min() > 0
    # per-case rows: the validation cases of each trial's fold; one Dice per case and trial
    assert set(exp.cases.columns) >= {"trial_id", "row", "case", "patient", "dice", "hd95_mm", "has_necrosis"}
    assert exp.cases.groupby("trial_id").size().min() >= 1
    assert not exp.cases.duplicated(["trial_id", "case"]).any()
    # every trial's val_dice is the mean Dice of its cases with necrosis (recomputed from the case table)
    necrotic = exp.cases[exp.cases["has_necrosis"] > 0].groupby("trial_id")["dice"].mean()
    recomputed = trials.set_index("trial_id")["val_dice"].loc[necrotic.index]
    assert (recomputed - necrotic).abs().max() < 1e-9
    # history: one row per trial x epoch, with the loss weights of the schedule
    assert len(exp.history) == trials["epochs"].sum()
    assert {"w_seg", "loss_total", "lr"} <= set(exp.history.columns)


def test_analyze_writes_tables_figures_and_summary(smoke_experiment: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert main(["analyze", str(smoke_experiment), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| **unet** |" in out and "seg+recon+loc" in out and "summary.md" in out
    for name in ("trials", "cases", "history"):
        parquet = pd.read_parquet(tmp_path / "a" / f"{name}.parquet")
        csv = pd.read_csv(tmp_path / "a" / f"{name}.csv")
        assert len(parquet) == len(csv) > 0
    for figure in ("per_case", "learning_curves", "loss_weights"):
        assert (tmp_path / "a" / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "## Ablation table" in summary and "figures/per_case.png" in summary
    assert "not distinguishable from unet" in summary  # 2 epochs, 4 patients: nothing can be called better
    comparison = pd.read_csv(tmp_path / "a" / "comparison.csv")
    assert comparison["row"].tolist() == ["seg+recon+loc"] and comparison["n_pairs"].iloc[0] >= 1
    for figure in ("reliability", "overlays"):
        assert (tmp_path / "a" / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Calibration" in summary and "figures/overlays.png" in summary
    calibration = pd.read_csv(tmp_path / "a" / "calibration.csv")
    assert set(calibration["row"]) == {"unet", "seg+recon+loc"}
    assert calibration["ece"].between(0, 1).all() and (calibration["voxels"] > 0).all()


def test_calibration_counts_pool_to_the_reported_cases(smoke_experiment: Path) -> None:
    """The calibration table holds every evaluation case's bins, and its counts are the region's voxels."""
    exp = load_experiment(smoke_experiment)
    table = exp.calibration()
    cases = exp.evaluation_cases()
    assert set(zip(table["trial_id"], table["case"], strict=True)) == set(
        zip(cases["trial_id"].astype(str), cases["case"].astype(str), strict=True)
    )
    per_case = table.groupby(["trial_id", "case"])
    assert (per_case["bin"].nunique() == 10).all()
    assert (per_case["positive"].sum() <= per_case["count"].sum()).all()
    overlays = exp.overlays()
    assert set(overlays) == {"unet", "seg+recon+loc"}
    shared = set.intersection(*(set(v) for v in overlays.values()))
    assert shared and all(overlays["unet"][c]["ref"].any() for c in shared)  # the same necrotic slices per row


def test_statistics_use_stage_two_and_both_seeds(smoke_experiment: Path) -> None:
    analysis = analyze(smoke_experiment, n_boot=200)
    table = analysis.ablation.set_index("row")
    assert table.loc["unet", "n_seeds"] == 2 and table.loc["unet", "n_folds"] == 2
    assert analysis.reference == "unet"
    spread = analysis.spread.set_index("row")
    assert (spread["n_runs"] == 2).all()
    assert any("too few patients whose values differ" in w for w in analysis.warnings)
    # one search per row, shared by both folds and seeds: one pipeline replicate per row, p >= 1
    assert any("too few pipeline replicates for seg+recon+loc vs unet" in w for w in analysis.warnings)
    (contrast,) = analysis.comparison.itertuples()
    assert contrast.n_replicates_row == 1 and contrast.p_replicates_min == 1.0
    assert contrast.diff_ci_low == -1.0 and contrast.diff_ci_high == 1.0  # the interval says it: anything goes
    compute = analysis.compute.set_index("row")
    assert (compute["stage1_hours"] > 0).all() and (compute["stage2_hours"] > 0).all()
    assert set(compute["unit"]) == {"CPU-h"} and (compute["peak_memory_mb"] > 100).all()


def test_reference_row_can_be_chosen_and_typos_get_suggestions(smoke_experiment: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    analysis = analyze(smoke_experiment, reference="seg+recon+loc", n_boot=100)
    assert analysis.comparison["row"].tolist() == ["unet"]
    assert main(["analyze", str(smoke_experiment), "--out", str(tmp_path), "--reference", "unnet"]) == 2
    assert "did you mean 'unet'" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_analysis_opens_no_pickle(smoke_experiment: Path, tmp_path: Path) -> None:
    """A colleague's folder whose pickles would run code: analysing it must not run them."""
    copy = tmp_path / "smoke"
    shutil.copytree(smoke_experiment, copy)
    marker = tmp_path / "pwned"
    pickles = list(copy.rglob("*.pkl"))
    assert pickles  # Ray writes tuner.pkl, params.pkl, ...
    for path in pickles:
        malicious_pickle(path, marker)
    write_analysis(analyze(copy, n_boot=100), tmp_path / "out")
    assert not marker.exists()


def test_a_partial_stage_one_only_study_is_analysed_with_a_warning(smoke_experiment: Path, tmp_path: Path) -> None:
    copy = tmp_path / "partial"
    shutil.copytree(smoke_experiment, copy, ignore=shutil.ignore_patterns("stage2"))
    analysis = analyze(copy, n_boot=100)
    assert any("stage 2 has not run" in w for w in analysis.warnings)
    assert set(analysis.ablation["n_folds"]) == {1}  # each row's best stage-1 trial, on the tuning fold
    # chosen on the patients it is scored on: shown, but never given a verdict
    from avn_study.analysis.report import NO_VERDICT

    assert set(analysis.comparison["verdict"]) == {NO_VERDICT} and analysis.tuning_only


def test_damaged_results_name_the_file(smoke_experiment: Path, tmp_path: Path) -> None:
    from avn_study.errors import UsageError

    copy = tmp_path / "damaged"
    shutil.copytree(smoke_experiment, copy)
    params = next(copy.glob("stage2/*/params.json"))
    params.write_text("{not json")
    damaged = load_experiment(copy)  # excluded and named, the rest still read (docs/safety.md)
    assert len(damaged.damaged) == 1 and "params.json: not valid JSON" in damaged.damaged[0]
    assert params.parent.name.removeprefix("trial_") not in set(damaged.trials["trial_id"])
    (copy / "study.json").write_text(json.dumps({"x": 1}))
    shutil.rmtree(copy / "stage2")
    for stage in copy.glob("stage1-*"):
        shutil.rmtree(stage)
    with pytest.raises(UsageError, match="no trial folders"):
        load_experiment(copy)


def test_analyze_keeps_a_notebook_that_is_already_there(smoke_experiment: Path, tmp_path: Path) -> None:
    from avn_study.analysis.report import write_notebook

    out = tmp_path / "report"
    out.mkdir()
    (out / "ablation_report.ipynb").write_text("my own notebook")
    write_notebook(smoke_experiment, out)
    assert (out / "ablation_report.ipynb").read_text() == "my own notebook"
    fresh = write_notebook(smoke_experiment, tmp_path)
    assert str(smoke_experiment.resolve()) in fresh.read_text()
