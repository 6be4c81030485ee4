"""Sweeps on a local 2-CPU Ray: the smoke fair ablation, worker crashes, NaN trials, Ray-format output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_space

from avn_study.cli.commands import main
from avn_study.study.check import read_epochs
from avn_study.study.folder import epoch_files
from avn_study.study.results import read_trials

IDENTITY = ("row", "arm", "schedule", "stage", "fold", "seed", "split_hash", "data_fingerprint", "node_id")


@pytest.fixture(scope="module")
def smoke_study(smoke_experiment: Path) -> tuple[int, Path]:
    """The session's smoke fair ablation (`search_spaces/smoke.yaml` with seeds 0 and 1, run by the CLI in a
    subprocess; its fixture fails unless the sweep exited 0). Read-only here."""
    return 0, smoke_experiment


def test_smoke_fair_ablation_runs_both_stages(smoke_study: tuple[int, Path]) -> None:
    code, root = smoke_study
    assert code == 0
    manifest = json.loads((root / "study.json").read_text())
    stage1 = {row: read_trials(root / f"stage1-{row.replace('+', '-')}") for row in manifest["rows"]}
    assert {row: len(t) for row, t in stage1.items()} == {"unet": 2, "seg+recon+loc": 2}  # equal budgets
    stage2 = read_trials(root / "stage2")
    assert sorted((o.row, o.config["fold"], o.config["seed"]) for o in stage2) == [
        (row, fold, seed) for row in ("seg+recon+loc", "unet") for fold in (1, 2) for seed in (0, 1)
    ]  # never the tuning fold 0
    assert all(o.status == "TERMINATED" and o.epochs == 2 for o in stage2)  # stage 2 runs to the end


def test_tune_is_told_only_the_metric_and_the_epoch(smoke_study: tuple[int, Path]) -> None:
    """What the driver keeps per trial: Ray's own keys, the epoch and the study's metric (the full records
    are in the trial folders: every reported epoch has one)."""
    from ray.tune.result import AUTO_RESULT_KEYS, DONE, SHOULD_CHECKPOINT, TRIAL_ID

    _, root = smoke_study
    told = set()
    for result_file in root.glob("stage*/*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines()]
        told.update(k for line in lines for k in line)
        assert sorted(epoch_files(result_file.parent)) == [line["epoch"] for line in lines]
    ray_keys = {*AUTO_RESULT_KEYS, DONE, SHOULD_CHECKPOINT, TRIAL_ID, "experiment_tag"}
    assert told - ray_keys == {"epoch", "val_dice"}, told - ray_keys


def test_every_result_records_identity_and_per_case_metrics(smoke_study: tuple[int, Path]) -> None:
    _, root = smoke_study
    split_hash = json.loads((root / "study.json").read_text())["split_hash"]
    for result_file in root.glob("stage*/*/result.json"):
        lines = read_epochs(result_file.parent)
        for record in lines:
            assert all(key in record for key in IDENTITY), sorted(record)
            assert record["split_hash"] == split_hash
            assert "w_seg" in record and "loss_seg" in record and "val_dice" in record
        per_case = sorted((result_file.parent / "per_case").glob("epoch_*.json"))
        assert len(per_case) == len(lines)  # every evaluated epoch (ASHA may stop stage 1 trials early)
        rows = json.loads(per_case[-1].read_text())
        assert {"case", "patient", "dice", "hd95_mm", "arm", "fold"} <= set(rows[0])


def test_output_opens_with_ray_and_optuna(smoke_study: tuple[int, Path]) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune

    _, root = smoke_study
    frame = tune.ExperimentAnalysis(str(root / "stage2")).dataframe()
    assert len(frame) == 8 and set(frame["config/grid/_row"]) == {"unet", "seg+recon+loc"}
    assert frame["val_dice"].notna().all() and (frame["epoch"] == 1).all()  # what Tune is told
    assert tune.Tuner.can_restore(str(root / "stage2"))
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    study = optuna.load_study(study_name="smoke-unet", storage=storage)
    assert len(study.trials) == 2 and all("lr" in t.params for t in study.trials)


def test_best_stage1_config_is_retrained(smoke_study: tuple[int, Path]) -> None:
    _, root = smoke_study
    for row in ("unet", "seg+recon+loc"):
        stage1 = [o for o in read_trials(root / f"stage1-{row.replace('+', '-')}") if o.epochs == 2]
        best = max(stage1, key=lambda o: o.metric)
        retrained = [o for o in read_trials(root / "stage2") if o.row == row]
        assert {o.config["lr"] for o in retrained} == {best.config["lr"]}


def test_worker_crash_is_retried_from_checkpoint(ray_2cpus, sweep_cohort: Path, tmp_path: Path) -> None:
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    unet = {"unet": {"schedule": "constant", "schedule_params": {}}}
    space = load_space(small_space(tmp_path, protocol="sweep", arms=unet, search={}, trials=1, max_failures=1,
                                   scheduler={"type": "none"}))  # fmt: skip
    study = Study(space, sweep_cohort, str(tmp_path / "storage"), progress=False, fault={"kill_at_epoch": 0})
    study.prepare(resume=False)
    (trial,) = study.run().outcomes
    assert trial.status == "TERMINATED"
    assert (Path(trial.path) / ".fault-injected").read_text() == "0"  # it did die once
    records = read_epochs(Path(trial.path))
    assert [r["epoch"] for r in records] == [0, 1]  # resumed at epoch 1, not restarted: same epoch count


def test_nan_trial_errors_and_the_sweep_goes_on(ray_2cpus, sweep_cohort: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    constant = {"arm": "unet", "schedule": "constant", "schedule_params": {}}
    arms = {"ok": {**constant, "lr": 1e-3}, "diverges": {**constant, "lr": 1e30}}
    path = small_space(tmp_path, protocol="sweep", arms=arms, search={}, trials=1, max_failures=0,
                       scheduler={"type": "none"})  # fmt: skip
    code = main(["sweep", str(path), "--data", str(sweep_cohort), "--storage", str(tmp_path / "s"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 trial(s) errored after their retries" in captured.err and "row diverges" in captured.err
    assert "loss term" in captured.err and "error.txt" in captured.err
    assert "ok" in captured.out  # the healthy row finished and is in the table
    # analysis keeps the errored trial, with its reason, and leaves it out of the statistics visibly
    from avn_study.analysis import analyze

    analysis = analyze(tmp_path / "s" / "smoke", n_boot=100)
    errored = analysis.experiment.trials.query("status == 'ERROR'")
    assert errored["row"].tolist() == ["diverges"] and "loss term" in errored["error"].iloc[0]
    assert any("1 errored trial(s) are excluded" in w for w in analysis.warnings)
    assert analysis.ablation["row"].tolist() == ["ok"]


def test_existing_study_needs_resume(smoke_study: tuple[int, Path], sweep_cohort: Path,
                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    _, root = smoke_study
    space = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
    assert main(["sweep", str(space), "--data", str(sweep_cohort), "--storage", str(root.parent)]) == 2
    assert "already holds a study; use --resume" in capsys.readouterr().err


def test_uri_storage_writes_to_the_store_and_mirrors_json(ray_2cpus, sweep_cohort: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A pyarrow URI (file:// here, the same code path as s3:// or gs://): Ray writes the trials to the
    store, the study's own files are uploaded, and the JSON is mirrored locally for analysis."""
    import shutil

    from avn_study.analysis import analyze

    monkeypatch.setenv("AVN_STUDY_CACHE", str(tmp_path / "cache"))
    arms = {"unet": {"schedule": "constant", "schedule_params": {}}}
    space = small_space(tmp_path, protocol="sweep", arms=arms, scheduler={"type": "none"})
    cmd = ["sweep", str(space), "--data", str(sweep_cohort), "--storage", f"file://{tmp_path}/store", "--quiet"]
    assert main(cmd) == 0
    store = tmp_path / "store" / "smoke"
    assert {p.name for p in store.iterdir()} >= {"study.json", "space.yaml", "optuna.journal", "stage1-unet"}
    trials = sorted(store.glob("stage1-unet/trial_*"))
    assert len(trials) == 2 and all(any(t.glob("checkpoint_*")) and any(t.glob("per_case/*.json")) for t in trials)
    (mirror,) = (tmp_path / "cache" / "studies").iterdir()
    assert not list(mirror.rglob("checkpoint_*")) and not list(mirror.rglob("*.pkl"))  # JSON only
    assert len(analyze(mirror, n_boot=50).experiment.cases) > 0
    assert main(["export", str(mirror), "--out", str(tmp_path / "bundle")]) == 2  # no checkpoints in a mirror
    shutil.rmtree(mirror)  # the mirror is disposable: --resume downloads what it needs
    assert main([*cmd, "--resume"]) == 0
    assert (mirror / "study.json").is_file() and sorted(mirror.glob("stage1-unet/trial_*/result.json"))
    assert main(cmd) == 2  # an existing study in the store is not overwritten


def test_control_rows_run_through_a_sweep_and_report_their_size(ray_2cpus, sweep_cohort: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from avn_study.analysis import analyze
    from avn_study.analysis.report import ablation_markdown

    constant = {"schedule": "constant", "schedule_params": {}}
    arms = {"unet+head": constant, "cascade": constant, "seg+loc/no-gate": {**constant, "arm": "seg+loc",
            "gating": "none"}, "unet/wide": {**constant, "arm": "unet", "base_channels": 6}}  # fmt: skip
    groups = {"Is it the head label?": ["unet+head"], "Controls": ["cascade", "seg+loc/no-gate", "unet/wide"]}
    path = small_space(tmp_path, protocol="sweep", arms=arms, groups=groups, search={}, trials=1,
                       scheduler={"type": "none"})  # fmt: skip
    assert main(["sweep", str(path), "--data", str(sweep_cohort), "--storage", str(tmp_path / "s"), "--quiet"]) == 0
    analysis = analyze(tmp_path / "s" / "smoke", reference="unet+head", n_boot=100)
    sizes = analysis.experiment.trials.set_index("row")["n_parameters"]
    assert sizes["unet/wide"] > sizes["unet+head"] and sizes.notna().all()
    table = ablation_markdown(analysis)
    assert "| *Is it the head label?* |" in table and "| *Controls* |" in table and " k |" in table
