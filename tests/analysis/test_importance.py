"""Parameter importance from a study's Optuna journal."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from avn_study.analysis.importance import parameter_importance


def _journal_study(root: Path, name: str, trials: int, params: tuple[str, ...]) -> None:
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip

    def objective(trial: optuna.Trial) -> float:
        values = {p: trial.suggest_float(p, 0.0, 1.0) for p in params}
        return 10 * values[params[0]] + 0.01 * sum(values.values())  # the first parameter decides

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials)


def test_the_parameter_that_drives_the_metric_is_the_important_one(tmp_path: Path) -> None:
    _journal_study(tmp_path, "tune-seg-recon-loc", 24, ("lr", "weight_decay"))
    _journal_study(tmp_path, "tune-unet", 9, ("lr", "weight_decay"))  # too few for a top of 5
    _journal_study(tmp_path, "tune-seg", 12, ("lr",))  # one parameter
    manifest = {"name": "tune"}  # a study from before the manifest listed its searches
    table = parameter_importance(tmp_path, manifest, ["unet", "seg", "seg+recon+loc"])
    full = table[table["row"] == "seg+recon+loc"].set_index("param")
    assert full.loc["lr", "importance"] > 0.8 > full.loc["weight_decay", "importance"]
    assert abs(full["importance"].sum() - 1) < 1e-6
    # Optuna's advice, at least 5 trials above the target quantile: 5 / 24 instead of 0.1
    assert full["target_quantile"].iloc[0] == pytest.approx(5 / 24) and (full["n_trials"] == 24).all()
    notes = table.set_index("row")["note"]
    assert "9 fully trained trials" in notes["unet"].iloc[0] and "by construction" in notes["seg"]
    assert parameter_importance(tmp_path / "nothing", manifest, ["unet"]).empty


def test_only_fully_trained_trials_count_and_searches_come_from_the_manifest(tmp_path: Path) -> None:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="s-unet-outer1", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for i in range(16):
        trial = study.ask({"lr": FloatDistribution(0, 1), "wd": FloatDistribution(0, 1)})
        if i % 2:  # stopped early by ASHA: pruned at its epoch, with a partly trained value
            trial.report(0.1, 3)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 10 * trial.params["lr"])
    manifest = {"stage1": [{"row": "unet", "outer": 1, "experiment": "stage1-unet-outer1",
                            "optuna_study": "s-unet-outer1"}]}  # fmt: skip
    table = parameter_importance(tmp_path, manifest, ["unet"])
    assert set(table["n_trials"]) == {8} and set(table["n_stopped"]) == {8} and set(table["outer_fold"]) == {1}
    assert table["importance"].isna().all() and "8 fully trained trials" in table["note"].iloc[0]
