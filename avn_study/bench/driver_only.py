"""``avn-study bench cluster --driver-only``: a study's own driver at a cluster's scale, without Ray's workers.

On a small machine a Ray-backed bench measures how fast the machine starts worker processes (about
0.65 trial starts per second on 2 cores), not the protocol. This mode runs the study's real driver
pieces, the ones ``concurrent_rows`` hands to Ray Tune (:class:`~avn_study.study.search.RowSearch`:
every stage-1 search with its own Optuna study, and each search's stage-2 trials once it has chosen;
:class:`~avn_study.study.search.RowScheduler`: ASHA per search), against stand-in trials in simulated
time. A trial holds its slot for its epochs (the stand-in's durations), and every call into the driver
costs the simulated clock what it cost here in wall time: the driver is one thread, so its calls queue
and a slow driver leaves slots empty. Utilisation = the trials' epoch time / (slots x simulated wall),
comparable with :func:`~avn_study.bench.cluster.model_utilisation`, the same scheduling with a driver
that costs nothing.

Ray Tune's own controller (its result handling, its experiment-state snapshots) is not in this figure;
the Ray-backed bench measures its per-trial state (``experiment state``), which grows linearly in the
trials.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class SimTrial:
    """What a searcher and a scheduler read of a Ray trial: its id and its config."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"


@dataclass(frozen=True)
class DriverRun:
    """One simulated study: its figures (see the module docstring)."""

    slots: int
    trials: int
    results: int  # epoch reports the driver handled
    wall_s: float  # simulated
    busy_s: float  # the trials' epoch time
    driver_s: float  # wall time spent in the driver's calls
    driver_calls: int

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.slots * self.wall_s) if self.wall_s else float("nan")

    @property
    def start_rate(self) -> float:
        """Trial starts per second of driver time (what the driver alone could sustain)."""
        return self.trials / self.driver_s if self.driver_s else float("inf")


class _Driver:
    """The driver's clock: calls run one at a time, each taking the wall time it takes here."""

    def __init__(self) -> None:
        self.free_at, self.spent, self.calls = 0.0, 0.0, 0

    def call(self, at: float, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """``fn(*args)`` handled no earlier than ``at``: (its result, the simulated time it is done)."""
        start = time.perf_counter()
        out = fn(*args)
        cost = time.perf_counter() - start
        self.spent, self.calls = self.spent + cost, self.calls + 1
        self.free_at = max(at, self.free_at) + cost
        return out, self.free_at


def simulate(search: Any, scheduler: Any, slots: int, epochs: int, metric: str,
             epoch_s: Callable[[dict[str, Any], int], float],
             value: Callable[[dict[str, Any], int], float]) -> DriverRun:  # fmt: skip
    """Run ``search`` and ``scheduler`` (a Ray Tune searcher and trial scheduler) on ``slots`` in simulated
    time until the searcher is finished; ``epoch_s(config, epoch)`` and ``value(config, epoch)`` are the
    stand-in trial's epoch duration and metric."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    driver, ids = _Driver(), itertools.count()
    events: list[tuple[float, int, SimTrial, int]] = []  # (epoch end, tie-break, trial, epoch)
    running, trials, results, busy, finished, now = 0, 0, 0, 0.0, False, 0.0

    def fill(at: float) -> None:
        nonlocal running, trials, finished
        while running < slots and not finished:
            trial_id = f"{next(ids):08x}"
            config, at = driver.call(at, search.suggest, trial_id)
            if config == Searcher.FINISHED:
                finished = True
            if config is None or finished:
                return  # (None: stage-2 trials wait for a search still running)
            trial = SimTrial(trial_id, config)
            _, at = driver.call(at, scheduler.on_trial_add, None, trial)
            running, trials = running + 1, trials + 1
            heapq.heappush(events, (at + epoch_s(config, 0), next(ids), trial, 0))

    fill(0.0)
    while events:
        end, _, trial, epoch = heapq.heappop(events)
        busy += epoch_s(trial.config, epoch)
        results += 1
        result = {metric: value(trial.config, epoch), "epoch": epoch, "training_iteration": epoch + 1}
        decision, at = driver.call(end, scheduler.on_trial_result, None, trial, result)
        _, at = driver.call(at, search.on_trial_result, trial.trial_id, result)
        if decision == TrialScheduler.STOP or epoch + 1 == epochs:
            trial.status = "TERMINATED"
            _, at = driver.call(at, search.on_trial_complete, trial.trial_id, result)
            _, at = driver.call(at, scheduler.on_trial_complete, None, trial, result)
            running -= 1
            now = max(now, at)
            fill(at)
        else:
            heapq.heappush(events, (at + epoch_s(trial.config, epoch + 1), next(ids), trial, epoch + 1))
        now = max(now, at)
    return DriverRun(slots, trials, results, now, busy, driver.spent, driver.calls)
