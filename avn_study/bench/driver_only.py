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
from pathlib import Path
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


def bench_driver_only(work: Path, gpus: int = 64, per_gpu: int = 4, epoch_s: float = 60.0,
                      shape: dict[str, Any] | None = None, patients: int = 40) -> dict[str, Any]:  # fmt: skip
    """``ablation.yaml``'s shape (as ``bench cluster`` runs it; ``shape`` overrides keys, e.g. ``trials``) with
    concurrent rows on ``gpus x per_gpu`` slots, driven by the real Study's searcher and scheduler in
    simulated time (see the module docstring); with the scheduling's own ceiling
    (:func:`~avn_study.bench.cluster.model_utilisation`) and the driver's peak memory."""
    from ray.tune.schedulers import FIFOScheduler

    from avn_study.bench.cluster import StandIn, _bench_study, bench_cohort, bench_space, model_utilisation
    from avn_study.bench.footprint import peak_rss_mb

    slots = gpus * per_gpu
    study = _bench_study(work, bench_space(per_gpu, shape), bench_cohort(work, patients), True, epoch_s,
                         name="driver-only")  # fmt: skip
    study.prepare(resume=False)
    try:
        search, scheduler, planned = study.shared_search()
        scheduler = scheduler or FIFOScheduler()
        scheduler.set_search_properties(study.space.metric, study.space.mode)
        stand_ins: dict[int, StandIn] = {}

        def stand_in(config: dict[str, Any]) -> StandIn:
            if id(config) not in stand_ins:
                stand_ins[id(config)] = StandIn(config, str(config.get("_row")), epoch_s)
            return stand_ins[id(config)]

        epochs = stand_in(search._runs[next(iter(search._runs))].constants).epochs
        run = simulate(search, scheduler, slots, epochs, study.space.metric,
                       lambda c, e: stand_in(c).epoch_s(e), lambda c, e: stand_in(c).value(e))  # fmt: skip
    finally:
        study.close()
    ceiling = model_utilisation(study.space, slots)["utilisation"]
    return {"run": run, "planned": planned, "ceiling": ceiling, "driver_rss_mb": peak_rss_mb(), "epoch_s": epoch_s}


def driver_only_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for :func:`avn_study.bench.benches.print_table`."""
    run: DriverRun = result["run"]
    share = run.utilisation / result["ceiling"]
    return [
        ("driver only: utilisation", f"{run.utilisation:.3f}",
         f"{run.slots} slots, {run.trials} trials ({result['planned']} planned), {run.results} results, "
         f"simulated wall {run.wall_s / 3600:.1f} h at {result['epoch_s']:g} s per unet epoch"),
        ("the scheduling's own ceiling (model)", f"{result['ceiling']:.3f}",
         f"driver only / ceiling = {share:.3f} (target >= 0.9: {'met' if share >= 0.9 else 'missed'})"),
        ("driver time", f"{run.driver_s:.1f} s",
         f"{run.driver_calls} calls; {run.start_rate:.0f} trial starts per driver-second"),
        ("driver peak RSS", f"{result['driver_rss_mb']:.0f} MB", "this process: searchers, Optuna studies, schedulers"),
    ]  # fmt: skip
