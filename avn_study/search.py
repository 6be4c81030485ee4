"""Ray Tune's Optuna searcher, telling Optuna only final values (imported by the sweep driver only)."""

from __future__ import annotations

import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch


class FinalValueOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose trials stopped early (by ASHA) end as PRUNED at their last epoch, not COMPLETE.

    Ray's searcher tells Optuna the metric of a trial's last report as its final value, whether the
    trial ran every epoch or was stopped at a rung. Optuna's TPE and its importance evaluators then
    treat a value after 2 epochs like one after 100. Here a stopped trial is PRUNED: its per-epoch
    values stay in the study as intermediate values (which TPE ranks below finished trials, as with
    Optuna's own pruners), and only a trial that reached ``epochs`` is COMPLETE with its final value.
    """

    def __init__(self, *args: Any, epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._reported: dict[str, set[int]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        self._reported.setdefault(trial_id, set()).add(int(result.get("training_iteration", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        reached = int(result.get("training_iteration", self._epochs)) if result else self._epochs
        if result and not error and reached < self._epochs and trial_id not in self._completed_trials:
            trial = self._ot_trials[trial_id]
            value = result.get(self.metric)
            # the stopping epoch's report arrives with the completion, not as a result
            if (
                isinstance(value, int | float)
                and math.isfinite(value)
                and reached not in self._reported.get(trial_id, ())
            ):
                trial.report(float(value), reached)
            self._ot_study.tell(trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            self._reported.pop(trial_id, None)
            return
        self._reported.pop(trial_id, None)
        super().on_trial_complete(trial_id, result, error)
