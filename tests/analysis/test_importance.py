"""Parameter importance from a study's Optuna journal."""

from __future__ import annotations

from pathlib import Path

import optuna
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
    _journal_study(tmp_path, "tune-unet", 2, ("lr", "weight_decay"))  # too few trials
    _journal_study(tmp_path, "tune-seg", 8, ("lr",))  # one parameter
    table = parameter_importance(tmp_path, ["unet", "seg", "seg+recon+loc"], "tune")
    full = table[table["row"] == "seg+recon+loc"].set_index("param")["importance"]
    assert full["lr"] > 0.8 > full["weight_decay"] and abs(full.sum() - 1) < 1e-6
    notes = table.set_index("row")["note"]
    assert "2 completed trials" in notes["unet"].iloc[0] and "by construction" in notes["seg"]
    assert parameter_importance(tmp_path / "nothing", ["unet"], "tune").empty
