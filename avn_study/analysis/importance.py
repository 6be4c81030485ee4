"""Optuna parameter importance of a study's stage-1 searches (read from ``optuna.journal``, JSON lines).

Honest by construction:

- Only **fully trained** trials count. The sweep tells Optuna a trial's value only when it ran every
  epoch; a trial that ASHA stopped is PRUNED (see :mod:`avn_study.study.search`), so a value after a few
  epochs is never ranked against one after the last. (Studies run before that rule recorded stopped
  trials as COMPLETE; their importance mixes both, and the report says so.)
- PED-ANOVA compares the trials in the top ``target_quantile`` with all of them. Optuna advises at
  least :data:`MIN_TOP` trials in that top group; the quantile is raised to reach it (0.1 when there are
  50 or more trials) and importance is not computed when that would need more than half of the trials
  (fewer than ``2 * MIN_TOP``): the "top" would then say little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["row", "outer_fold", "study", "param", "importance", "n_trials", "n_stopped", "target_quantile",
           "evaluator", "note"]  # fmt: skip
MIN_TOP = 5  # trials above the target quantile, Optuna's advice for PedAnovaImportanceEvaluator
BASE_QUANTILE = 0.1  # Optuna's default target quantile


def searches(manifest: dict[str, Any], rows: list[str]) -> list[dict[str, Any]]:
    """The stage-1 Optuna studies of a study: ``row``, ``outer`` fold (nested) and ``optuna_study`` name."""
    if manifest.get("stage1"):
        return list(manifest["stage1"])
    from avn_study.study.folder import Stage1  # studies from before the manifest listed its searches

    prefix = str(manifest.get("name", ""))
    return [{"row": row, "outer": None, "optuna_study": Stage1(row).optuna_study(prefix)} for row in rows]


def parameter_importance(root: Path, manifest: dict[str, Any], rows: list[str]) -> pd.DataFrame:
    """Optuna's PED-ANOVA importance (fANOVA would need scikit-learn) per stage-1 search; see the module.

    Searches with too few fully trained trials, or of one parameter (importance 1 by construction),
    get a row with the reason in ``note`` instead of numbers.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from avn_study.study.folder import JOURNAL

    journal = root / JOURNAL
    if not journal.is_file():
        return pd.DataFrame(columns=COLUMNS)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = set(optuna.get_all_study_names(storage))
    out = []
    for search in searches(manifest, rows):
        name = str(search["optuna_study"])
        if name not in names:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        stopped = sum(t.state == TrialState.PRUNED for t in study.trials)
        params = sorted({p for t in complete for p in t.params})
        n = len(complete)
        quantile = max(BASE_QUANTILE, MIN_TOP / n) if n else 1.0
        base = {"row": search["row"], "outer_fold": search.get("outer"), "study": name, "n_trials": n,
                "n_stopped": stopped, "evaluator": "PED-ANOVA"}  # fmt: skip
        if n < 2 * MIN_TOP or len(params) < 2:
            reason = (f"{n} fully trained trials: PED-ANOVA needs {MIN_TOP} in the top quantile, and at least "
                      f"{2 * MIN_TOP} trials for that to be a top" if n < 2 * MIN_TOP
                      else "one searched parameter: importance is 1 by construction")  # fmt: skip
            out += [{**base, "param": p, "importance": float("nan"), "target_quantile": float("nan"), "note": reason}
                    for p in params or ["-"]]  # fmt: skip
            continue
        evaluator = PedAnovaImportanceEvaluator(target_quantile=quantile)
        scores = get_param_importances(study, evaluator=evaluator, normalize=True)
        out += [{**base, "param": p, "importance": float(v), "target_quantile": quantile, "note": ""}
                for p, v in scores.items()]  # fmt: skip
    return pd.DataFrame(out, columns=COLUMNS)
