"""Ray Tune's searchers and schedulers of a study (imported by the sweep driver only).

:class:`FinalValueOptunaSearch` tells Optuna only final values; :class:`RowSearch` and
:class:`RowScheduler` run the stage-1 searches of every row in one Ray experiment, each keeping its own
Optuna study and its own ASHA rungs, and start each search's stage 2 as soon as it has chosen.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
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
        if self.metric not in result:  # an epoch without an evaluation (eval_every > 1)
            return
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


@dataclass
class RowSearchRun:
    """One stage-1 search inside :class:`RowSearch`: its constant config, its own searcher and budget."""

    constants: dict[str, Any]
    searcher: Searcher | None  # None: the space has no ``search`` (every trial is the constants)
    budget: int


@dataclass
class FollowUp:
    """The stage-2 trials that wait for one stage-1 search: its grid without the chosen parameters
    (fold, seed, repeat, row, the trial's run-time meta). (Searcher states saved before the selection
    became a reference also hold the patients the search validated on; they are not read.)"""

    grid: list[dict[str, Any]]


STAGE2_OWNER = "stage2"  # RowSearch's owner key of a stage-2 trial


class RowSearch(Searcher):
    """Every stage-1 search of a study in one Ray experiment, each with its own Optuna study, and (given
    ``follow_ups``) each search's stage-2 trials as soon as that search has chosen.

    Stage-1 trials are handed out round-robin over the searches that still have budget, so every row
    starts at once and keeps its share of the cluster. Each trial's config carries ``_run`` (the search
    it belongs to); its results and completion go to that search's own searcher only, so one row's
    trials never inform another row's sampler. :class:`RowScheduler` does the same for ASHA.

    When a search's last trial ends, its choice is made by the protocol's one rule
    (:func:`~avn_study.study.results.best_trial`) and its stage-2 trials join the queue, with the
    record of what they rest on (:func:`~avn_study.study.protocol.selection_record`). ``ready``
    holds stage-2 trials that wait for nothing (rows that choose nothing, such as nnU-Net's). Stage 1
    goes first; stage-2 trials fill the slots that stage 1 no longer needs, so a row's stage 2 runs
    while other rows are still searching. A search with no finished trial releases nothing; the driver
    names it after the run (:meth:`avn_study.study.driver.Study.select`).
    """

    def __init__(self, runs: dict[str, RowSearchRun], metric: str, mode: str,
                 follow_ups: dict[str, FollowUp] | None = None,
                 ready: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        super().__init__(metric=metric, mode=mode)
        self._runs = runs
        self._follow_ups = dict(follow_ups or {})
        self._started = dict.fromkeys(runs, 0)
        self._owner: dict[str, str] = {}  # trial id -> run key (or STAGE2_OWNER)
        self._configs: dict[str, dict[str, Any]] = {}  # stage-1 trial id -> its sampled parameters
        self._order: dict[str, int] = {}  # stage-1 trial id -> its place in its search's sampling
        self._ended: dict[str, list[tuple[str, float | None, int]]] = {k: [] for k in runs}  # see best_trial
        self._queue: list[dict[str, Any]] = list(ready or [])  # stage-2 trials released, not yet handed out

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric and mode are set at construction; each run brings its own constants

    def suggest(self, trial_id: str) -> dict | None:
        open_runs = [key for key, run in self._runs.items() if self._started[key] < run.budget]
        if not open_runs:
            if self._queue:
                self._owner[trial_id] = STAGE2_OWNER
                return self._queue.pop(0)
            return None if self._follow_ups else Searcher.FINISHED  # wait for the searches still running
        key = min(open_runs, key=lambda k: self._started[k])  # the first of the least-started, in run order
        run = self._runs[key]
        sampled = run.searcher.suggest(trial_id) if run.searcher is not None else {}
        if sampled is None or sampled == Searcher.FINISHED:
            return None
        self._started[key] += 1
        self._owner[trial_id] = key
        self._configs[trial_id] = dict(sampled)
        self._order[trial_id] = self._started[key] - 1
        return {**run.constants, **sampled, "_run": key, "_sample": self._started[key] - 1}

    def _searcher(self, trial_id: str) -> Searcher | None:
        key = self._owner.get(trial_id)
        return self._runs[key].searcher if key in self._runs else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (searcher := self._searcher(trial_id)) is not None:
            searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self._owner.get(trial_id)
        if key not in self._runs:
            return  # a stage-2 trial (or one this searcher never handed out)
        if (searcher := self._runs[key].searcher) is not None:
            searcher.on_trial_complete(trial_id, result, error)
        ended = self._ended[key]
        if any(c[0] == trial_id for c in ended):
            return
        order = self._order.get(trial_id)
        if not error and result:
            ended.append((trial_id, result.get(self.metric), int(result.get("training_iteration", 0)), order))
        else:  # an errored trial is never chosen; it still counts as ended
            ended.append((trial_id, None, 0, order))
        if len(ended) == self._runs[key].budget and key in self._follow_ups:
            self._release(key)

    def _release(self, key: str) -> None:
        from avn_study.study.protocol import selection_record
        from avn_study.study.results import best_trial

        follow_up = self._follow_ups.pop(key)
        best = best_trial(self._ended[key], self.mode)
        if best is None:
            return  # nothing to re-train; the driver refuses the study with the row's name
        chosen = {k: v for k, v in {**self._runs[key].constants, **self._configs[best]}.items()
                  if not k.startswith("_")}  # fmt: skip
        record = selection_record(best, key)
        self._queue += [{**chosen, **entry, **record} for entry in follow_up.grid]

    def save(self, checkpoint_path: str) -> None:
        """The hand-out state as JSON; each search's own state as its searcher saves it (base64)."""
        subs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for key, run in self._runs.items():
                if run.searcher is not None:
                    run.searcher.save(f"{tmp}/sub")
                    subs[key] = base64.b64encode(Path(f"{tmp}/sub").read_bytes()).decode()
        state = {"started": self._started, "owner": self._owner, "subs": subs, "configs": self._configs,
                 "order": self._order,
                 "ended": self._ended, "queue": self._queue, "waiting_for": sorted(self._follow_ups)}  # fmt: skip
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._started.update(state["started"])
        self._owner.update(state["owner"])
        self._configs.update(state.get("configs", {}))
        self._order.update(state.get("order", {}))
        self._ended.update({k: [tuple(c) for c in v] for k, v in state.get("ended", {}).items()})
        if "queue" in state:  # (a state saved before stage 2 joined the experiment has neither)
            self._queue = state["queue"]
            self._follow_ups = {k: v for k, v in self._follow_ups.items() if k in state["waiting_for"]}
        with tempfile.TemporaryDirectory() as tmp:
            for key, blob in state["subs"].items():
                Path(f"{tmp}/sub").write_bytes(base64.b64decode(blob))
                self._runs[key].searcher.restore(f"{tmp}/sub")
        self._share_storage()

    def _share_storage(self) -> None:
        """One Optuna storage object for every search again: each restored searcher unpickles its own, and
        several journal storages on one file in one process can miss each other's writes (Optuna then
        fails to find the trial it has just created)."""
        shared = None
        for run in self._runs.values():
            study = getattr(run.searcher, "_ot_study", None)
            if study is None:
                continue
            if shared is None:
                shared = study._storage
            else:
                study._storage = shared


class RowScheduler(FIFOScheduler):
    """One trial scheduler (ASHA) per stage-1 search, chosen by the trial's ``_run``; stage-2 trials run
    to the end (FIFO).

    ASHA's rungs compare trials by their metric at the same epoch; a ``unet`` trial must never stop a
    ``seg+recon+loc`` trial (or one of another outer fold), so every search gets its own instance.
    """

    def __init__(self, make: Callable[[], TrialScheduler]) -> None:
        super().__init__()
        self._make = make
        self._subs: dict[str, TrialScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        return True

    def _sub(self, trial: Any) -> TrialScheduler:
        stage2 = trial.config.get("_stage") == 2  # stage 2 runs every trial to the end
        key = STAGE2_OWNER if stage2 else str(trial.config.get("_run", ""))
        if key not in self._subs:
            self._subs[key] = sub = FIFOScheduler() if stage2 else self._make()
            sub.set_search_properties(self._metric, self._mode)
        return self._subs[key]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._sub(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._sub(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"one scheduler per stage-1 search ({len(self._subs)} so far)"
