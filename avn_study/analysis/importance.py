"""Optuna parameter importance of a study's stage-1 searches (read from ``optuna.journal``, JSON lines)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["row", "study", "param", "importance", "n_trials", "evaluator", "note"]


def parameter_importance(root: Path, rows: list[str], study_prefix: str, min_trials: int = 4) -> pd.DataFrame:
    """Optuna's PED-ANOVA importance (fANOVA would need scikit-learn) per row's study, over completed trials.

    Rows whose study has fewer than ``min_trials`` completed trials, or a search of one parameter
    (importance 1 by construction), get a row with the reason in ``note`` instead of numbers.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from avn_study.sweep import slug

    journal = root / "optuna.journal"
    if not journal.is_file():
        return pd.DataFrame(columns=COLUMNS)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = set(optuna.get_all_study_names(storage))
    out = []
    for row in rows:
        name = f"{study_prefix}-{slug(row)}"
        if name not in names:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        params = sorted({p for t in complete for p in t.params})
        base = {"row": row, "study": name, "n_trials": len(complete), "evaluator": "PED-ANOVA"}
        if len(complete) < min_trials or len(params) < 2:
            reason = (f"{len(complete)} completed trials (< {min_trials})" if len(complete) < min_trials
                      else "one searched parameter: importance is 1 by construction")  # fmt: skip
            out += [{**base, "param": p, "importance": float("nan"), "note": reason} for p in params or ["-"]]
            continue
        scores = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
        out += [{**base, "param": p, "importance": float(v), "note": ""} for p, v in scores.items()]
    return pd.DataFrame(out, columns=COLUMNS)
